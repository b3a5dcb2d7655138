"""The filter stage's table (data/filtered/filtered.csv) as the stages after it read it.

One reader for all of them: a FIFO under the table's name is refused before it is opened (opening one waits
forever for a writer), a file larger than any table the filter writes is refused unread, a header naming a column
twice is refused (pandas would rename the second ``Effusion.1`` and the readers would use the first), and text that
is not CSV is one line naming the file. ``check_split_table`` holds the table to what the filter guarantees and
prepare relies on: at least one image, a known split, each film one the filter's rules on labels and views keep
(``FilmRules``, the filter's own), 0/1 class columns that are what the row's Finding Labels say, each image once,
usable patient ids, each patient in one split, compared as the filter compares them (``0005`` and `` 5 `` are
patient 5): a patient in two splits leaks train films into the test scores. Its messages name the line each row
starts on in the file (a quoted cell may hold a newline, so that is not always the row's number plus 2).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing

import pandas as pd

from cxr_diffusion.data.nih import (
    SEXES, DataError, FilmRules, canonical_patient_ids, patient_id_problem, split_labels, unknown_labels, whole_numbers,
)
from cxr_diffusion.io import require_regular_file
from cxr_diffusion.safe_text import shown_value

FILTER_FIX = "rerun the filter stage (`dvc repro filter`)"
LABEL_VALUES = (0, 1)
# All 112,120 NIH rows with 15 class columns are about 15 MB; a larger file is not one the filter wrote, and
# pandas holds several times a file's size while parsing it (a sparse 1 GB file took 4.3 GB).
MAX_TABLE_BYTES = 64 << 20


def read_filtered_csv(path: str | os.PathLike, error: type[Exception] = DataError, **read_csv_options) -> pd.DataFrame:
    """``pd.read_csv(path, **read_csv_options)``; a folder, FIFO or device, a column named twice in the header, or
    text pandas cannot parse (a column of ``usecols`` missing included) is ``error``, one line naming ``path``. A
    missing or unreadable file is the OSError, which the stage boundary reports naming the file ("no such file",
    "permission denied")."""
    status = require_regular_file(path, error, FILTER_FIX)
    if status.st_size > MAX_TABLE_BYTES:
        raise error(f"{path}: {status.st_size / 2**20:,.0f} MB, more than the {MAX_TABLE_BYTES >> 20} MB of any table "
                    f"the filter writes (all of NIH is about 15 MB); {FILTER_FIX}")
    try:
        with closing(_records(path)) as records:
            header_line, header = next(records, (1, []))
    except (ValueError, csv.Error) as problem:  # UnicodeDecodeError is a ValueError
        raise error(_unreadable(path, problem)) from None
    names = [name.strip() for name in header]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # pandas would rename the second (Effusion.1), and every reader here would take the first
        raise error(f"{path}: line {header_line}: column(s) {', '.join(shown_value(name) for name in repeated)} "
                    f"appear more than once in the header, and the filter writes each column once; {FILTER_FIX}")
    try:
        return pd.read_csv(path, **read_csv_options)
    except ValueError as problem:  # ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors
        raise error(_unreadable(path, problem)) from None


def _unreadable(path: str | os.PathLike, problem: Exception) -> str:
    return f"{path}: not a readable CSV file ({' '.join(str(problem).split())[:200]}); {FILTER_FIX}"


def _blank(record: list[str]) -> bool:
    """A line pandas skips as blank (``skip_blank_lines``): nothing on it, or only spaces and tabs."""
    return not record or (len(record) == 1 and not record[0].strip(" \t"))


def _records(path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """(the line it starts on, its fields) for each non-blank CSV record of ``path``, the header first: the lines an
    editor shows, where a quoted cell holding a newline spans two."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        before = 0
        for record in reader:
            if not _blank(record):
                yield before + 1, record
            before = reader.line_num


class _RowLines:
    """Where each row of a table read from ``path`` starts in the file, as an editor numbers lines; the file is
    read again only when a message needs a line. Where that reading does not find the table's rows (a table not
    read from ``path`` as it is now), a row is named by its number and its image instead."""

    def __init__(self, path: str | os.PathLike, table: pd.DataFrame):
        self._path, self._table = path, table
        self._starts: list[int] | None = None
        self._read = False

    def line(self, row: int) -> int | None:
        if not self._read:
            self._read = True
            try:
                starts = [line for line, _ in _records(self._path)][1:]  # the header is no row
            except (OSError, ValueError, csv.Error):
                starts = None
            self._starts = starts if starts is not None and len(starts) == len(self._table) else None
        return None if self._starts is None else self._starts[row]

    def at(self, row: int) -> str:
        """``line 9``, or ``row 8 (image '...')`` when the line is unknown."""
        line = self.line(row)
        if line is not None:
            return f"line {line}"
        image = self._table["Image Index"].iat[row] if "Image Index" in self._table.columns else None
        return f"row {row + 1}" + ("" if image is None else f" (image {shown_value(image)})")

    def pair(self, first: int, second: int) -> str:
        """``lines 3 and 22``, or ``rows 2 and 21`` when the lines are unknown."""
        lines = (self.line(first), self.line(second))
        if None in lines:
            return f"rows {first + 1} and {second + 1}"
        return f"lines {lines[0]} and {lines[1]}"


def check_split_table(path: str | os.PathLike, table: pd.DataFrame, rules: FilmRules,
                      splits: Sequence[str]) -> pd.DataFrame:
    """``table`` with its class columns as ints and its patient ids canonical, once it holds only what the filter
    writes; else a ``DataError`` naming ``path``, the line and the column. ``rules`` are the filter's rules on a
    film's labels and view (``filter.film_rules``); its ``members`` map each class column to the NIH labels it
    stands for. ``table`` has every column (checked by the caller), read as text from ``path``. The splits are
    checked first: the later messages name a row's split, known good by then."""
    table = table.reset_index(drop=True)
    if table.empty:
        raise DataError(f"{path}: no images (a header and no rows), and the filter never writes an empty table; "
                        f"{FILTER_FIX}")
    lines = _RowLines(path, table)
    unknown = ~table["split"].isin(splits)
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: {lines.at(row)}, column 'split': {shown_value(table.at[row, 'split'])} is "
                        f"not one of {list(splits)}; {FILTER_FIX}")
    labels = table.copy()
    for name in rules.members:
        values = whole_numbers(table[name])
        bad = ~values.isin(LABEL_VALUES).fillna(False).astype(bool)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: {lines.at(row)}, column {name!r}: {shown_value(table.at[row, name])} is "
                            f"not a label (0 or 1); {FILTER_FIX}")
        labels[name] = values.astype("int64")
    findings = table["Finding Labels"].map(split_labels)
    _check_films_keep_the_filter_rules(path, table, findings, rules, lines)
    _check_ages_in_range(path, table, rules, lines)
    _check_sexes(path, table, lines)
    _check_classes_follow_the_findings(path, labels, findings, rules, lines)
    _check_each_image_once(path, table, lines)
    labels["Patient ID"] = _usable_patient_ids(path, table["Patient ID"], lines)
    _check_each_patient_in_one_split(path, labels, lines)
    return labels


def _check_films_keep_the_filter_rules(path: str | os.PathLike, table: pd.DataFrame, findings: pd.Series,
                                       rules: FilmRules, lines: _RowLines) -> None:
    """Each film is one the filter keeps by its rules on labels and views: an edited row the filter would reject
    (a finding outside the classes with filter.allow_other_labels false, a label NIH does not have, another view)
    would be trained and scored as one of the study's films."""
    broken = [rules.first_broken(labels, view) for labels, view in zip(findings, table["View Position"])]
    row = next((row for row, reason in enumerate(broken) if reason is not None), None)
    if row is None:
        return
    reason, labels, written = broken[row], findings.iat[row], shown_value(table.at[row, "Finding Labels"])
    if reason == "view":
        column, what = "View Position", (f"{shown_value(table.at[row, 'View Position'])} is not one of filter.views "
                                         f"{list(rules.views)}")
    else:
        column, what = "Finding Labels", {
            "unknown_label": f"{written} holds {'|'.join(unknown_labels(labels))}, which is not an NIH label",
            "contradictory_labels": f"{written} puts No Finding beside a finding",
            "no_class_of_interest": f"{written} give none of the classes {list(rules.members)}",
            "labels_outside_classes": f"{written} carry {'|'.join(rules.outside_classes(labels))}, in none of the "
                                      f"classes {list(rules.members)}, and filter.allow_other_labels is false",
        }[reason]
    raise DataError(f"{path}: {lines.at(row)}, image {shown_value(table.at[row, 'Image Index'])}, column {column!r}: "
                    f"{what}; the filter rejects such a film (its rule {reason}): {FILTER_FIX}")


def _check_ages_in_range(path: str | os.PathLike, table: pd.DataFrame, rules: FilmRules, lines: _RowLines) -> None:
    """Each Patient Age is a whole number in the filter's range (its rules invalid_age and age_out_of_range): the
    subgroup results band the films by it."""
    ages = whole_numbers(table["Patient Age"])
    broken = (ages.isna() | rules.ages_out_of_range(ages)).to_numpy().nonzero()[0]
    if len(broken):
        row = int(broken[0])
        raise DataError(f"{path}: {lines.at(row)}, image {shown_value(table.at[row, 'Image Index'])}, column "
                        f"'Patient Age': {shown_value(table.at[row, 'Patient Age'])} is not a whole number in "
                        f"filter.age_min..age_max ({rules.ages[0]}..{rules.ages[1]}); the filter rejects such a film: "
                        f"{FILTER_FIX}")


def _check_sexes(path: str | os.PathLike, table: pd.DataFrame, lines: _RowLines) -> None:
    """Each Patient Gender is one NIH writes (the filter's rule invalid_sex): the subgroups compare M and F."""
    if "Patient Gender" not in table.columns:
        return
    broken = (~table["Patient Gender"].isin(SEXES)).to_numpy().nonzero()[0]
    if len(broken):
        row = int(broken[0])
        raise DataError(f"{path}: {lines.at(row)}, image {shown_value(table.at[row, 'Image Index'])}, column "
                        f"'Patient Gender': {shown_value(table.at[row, 'Patient Gender'])} is not M or F; the filter "
                        f"rejects such a film: {FILTER_FIX}")


def _check_classes_follow_the_findings(path: str | os.PathLike, table: pd.DataFrame, findings: pd.Series,
                                       rules: FilmRules, lines: _RowLines) -> None:
    """Each class column is 1 exactly where the row's Finding Labels count toward its class, as the filter sets it."""
    classes = findings.map(rules.classes_of)
    for name in rules.members:
        derived = classes.map(lambda found, wanted=name: int(wanted in found))
        differs = (table[name] != derived).to_numpy().nonzero()[0]
        if len(differs):
            row = int(differs[0])
            raise DataError(f"{path}: {lines.at(row)}, column {name!r}: {table.at[row, name]}, but its Finding "
                            f"Labels {shown_value(table.at[row, 'Finding Labels'])} make it {derived.iat[row]}; "
                            f"{FILTER_FIX}")


def _usable_patient_ids(path: str | os.PathLike, patient_ids: pd.Series, lines: _RowLines) -> pd.Series:
    """The ids as the filter writes them (``canonical_patient_ids``), once each is one it accepts."""
    canonical = canonical_patient_ids(patient_ids)
    problems = canonical.map(patient_id_problem)
    if problems.notna().any():
        row = int(problems.notna().to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: {lines.at(row)}, column 'Patient ID': {shown_value(patient_ids.iat[row])} is "
                        f"not an id the filter writes ({shown_value(problems.iat[row], 120)}); {FILTER_FIX}")
    return canonical


def check_each_image_once(path: str | os.PathLike, table: pd.DataFrame, error: type[Exception] = DataError,
                          key: Callable[[str], str] | None = None) -> None:
    """An ``error`` naming the image and the lines it is on when ``table`` (read from ``path``, with its
    ``Image Index`` column) lists an image twice: for the stages that read the table without ``check_split_table``.
    ``key``: how the stage matches a name to its data (ELIXR's ids, for one, are matched with and without
    ``.png``), so two names it would take for one image count as the same image."""
    table = table.reset_index(drop=True)
    _check_each_image_once(path, table, _RowLines(path, table), error, key)


def _check_each_image_once(path: str | os.PathLike, table: pd.DataFrame, lines: _RowLines,
                           error: type[Exception] = DataError, key: Callable[[str], str] | None = None) -> None:
    names = table["Image Index"] if key is None else table["Image Index"].map(key)
    repeated = names.duplicated(keep=False).to_numpy().nonzero()[0]
    if len(repeated):
        same = names.to_numpy()[repeated] == names.iat[int(repeated[0])]
        first, second = (int(row) for row in repeated[same][:2])
        spelled = [table.at[row, "Image Index"] for row in (first, second)]
        shown = shown_value(spelled[0]) + ("" if spelled[0] == spelled[1] else f" (as {shown_value(spelled[1])})")
        raise error(f"{path}: image {shown} is on {lines.pair(first, second)}; the "
                    f"filter lists each image once: {FILTER_FIX}")


def _check_each_patient_in_one_split(path: str | os.PathLike, table: pd.DataFrame, lines: _RowLines) -> None:
    first_split = table.groupby("Patient ID", sort=False)["split"].transform("first")
    elsewhere = (table["split"] != first_split).to_numpy().nonzero()[0]
    if len(elsewhere):
        row = int(elsewhere[0])
        patient = table.at[row, "Patient ID"]
        first = int((table["Patient ID"] == patient).to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: patient {shown_value(patient)} is in split {table.at[first, 'split']!r} ("
                        f"{lines.at(first)}) and {table.at[row, 'split']!r} ({lines.at(row)}); the filter puts each "
                        f"patient in one split, or train films leak into the test scores: {FILTER_FIX}")

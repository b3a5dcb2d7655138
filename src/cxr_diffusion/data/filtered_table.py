"""The filter stage's table (data/filtered/filtered.csv) as the stages after it read it.

One reader for all of them: a FIFO under the table's name is refused before it is opened (opening one waits
forever for a writer), a file larger than any table the filter writes is refused unread, and text that is
not CSV is one line naming the file. ``check_split_table`` holds the table to what the filter guarantees and
prepare relies on: at least one image, a known split, 0/1 class columns that are what the row's Finding
Labels say (at least one class, never No Finding beside a finding), each image once, usable patient ids,
each patient in one split, compared as the filter compares them (``0005`` and `` 5 `` are patient 5):
a patient in two splits leaks train films into the test scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from cxr_diffusion.data.nih import DataError, canonical_patient_ids, patient_id_problem, split_labels, whole_numbers
from cxr_diffusion.nih_labels import NO_FINDING
from cxr_diffusion.io import require_regular_file
from cxr_diffusion.safe_text import shown_value

FILTER_FIX = "rerun the filter stage (`dvc repro filter`)"
LABEL_VALUES = (0, 1)
_HEADER_LINES = 1  # row 0 of the table is line 2 of the file
# All 112,120 NIH rows with 15 class columns are about 15 MB; a larger file is not one the filter wrote, and
# pandas holds several times a file's size while parsing it (a sparse 1 GB file took 4.3 GB).
MAX_TABLE_BYTES = 64 << 20


def read_filtered_csv(path: str | os.PathLike, error: type[Exception] = DataError, **read_csv_options) -> pd.DataFrame:
    """``pd.read_csv(path, **read_csv_options)``; a folder, FIFO or device, or text pandas cannot parse (a column
    of ``usecols`` missing included) is ``error``, one line naming ``path``. A missing or unreadable file is the
    OSError, which the stage boundary reports naming the file ("no such file", "permission denied")."""
    status = require_regular_file(path, error, FILTER_FIX)
    if status.st_size > MAX_TABLE_BYTES:
        raise error(f"{path}: {status.st_size / 2**20:,.0f} MB, more than the {MAX_TABLE_BYTES >> 20} MB of any table "
                    f"the filter writes (all of NIH is about 15 MB); {FILTER_FIX}")
    try:
        return pd.read_csv(path, **read_csv_options)
    except ValueError as problem:  # ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: not a readable CSV file ({' '.join(str(problem).split())[:200]}); "
                    f"{FILTER_FIX}") from None


def line_of(row: int) -> int:
    """The file line of table row ``row`` (0-based, after the header)."""
    return row + _HEADER_LINES + 1


def check_split_table(path: str | os.PathLike, table: pd.DataFrame, members: dict[str, tuple[str, ...]],
                      splits: Sequence[str]) -> pd.DataFrame:
    """``table`` with its class columns as ints and its patient ids canonical, once it holds only what the filter
    writes; else a ``DataError`` naming ``path``, the line and the column. ``members`` maps each class column to
    the NIH labels it stands for (``FilterConfig.class_members``). ``table`` has every column (checked by the
    caller), read as text. The splits are checked first: the later messages name a row's split, known good by
    then."""
    table = table.reset_index(drop=True)
    if table.empty:
        raise DataError(f"{path}: no images (a header and no rows), and the filter never writes an empty table; "
                        f"{FILTER_FIX}")
    unknown = ~table["split"].isin(splits)
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: line {line_of(row)}, column 'split': {shown_value(table.at[row, 'split'])} is "
                        f"not one of {list(splits)}; {FILTER_FIX}")
    labels = table.copy()
    for name in members:
        values = whole_numbers(table[name])
        bad = ~values.isin(LABEL_VALUES).fillna(False).astype(bool)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: line {line_of(row)}, column {name!r}: {shown_value(table.at[row, name])} is "
                            f"not a label (0 or 1); {FILTER_FIX}")
        labels[name] = values.astype("int64")
    _check_classes_follow_the_findings(path, labels, members)
    _check_each_image_once(path, table)
    labels["Patient ID"] = _usable_patient_ids(path, table["Patient ID"])
    _check_each_patient_in_one_split(path, labels)
    return labels


def _check_classes_follow_the_findings(path: str | os.PathLike, table: pd.DataFrame,
                                       members: dict[str, tuple[str, ...]]) -> None:
    """Each class column is 1 exactly where the row's Finding Labels name one of its labels, as the filter sets
    it; a row with no class, or with No Finding beside a finding, is one the filter rejects."""
    findings = table["Finding Labels"].map(split_labels)
    contradictory = findings.map(lambda labels: NO_FINDING in labels and len(set(labels)) > 1).to_numpy().nonzero()[0]
    if len(contradictory):
        row = int(contradictory[0])
        raise DataError(f"{path}: line {line_of(row)}, column 'Finding Labels': "
                        f"{shown_value(table.at[row, 'Finding Labels'])} puts No Finding beside a finding, which the "
                        f"filter rejects; {FILTER_FIX}")
    for name, labels in members.items():
        derived = findings.map(lambda found, wanted=labels: int(any(label in found for label in wanted)))
        differs = (table[name] != derived).to_numpy().nonzero()[0]
        if len(differs):
            row = int(differs[0])
            raise DataError(f"{path}: line {line_of(row)}, column {name!r}: {table.at[row, name]}, but its Finding "
                            f"Labels {shown_value(table.at[row, 'Finding Labels'])} make it {derived.iat[row]}; "
                            f"{FILTER_FIX}")
    none = (table[list(members)].sum(axis=1) == 0).to_numpy().nonzero()[0]
    if len(none):
        row = int(none[0])
        raise DataError(f"{path}: line {line_of(row)}: Finding Labels {shown_value(table.at[row, 'Finding Labels'])} "
                        f"give none of the classes {list(members)}, and the filter keeps only images with one; "
                        f"{FILTER_FIX}")


def _usable_patient_ids(path: str | os.PathLike, patient_ids: pd.Series) -> pd.Series:
    """The ids as the filter writes them (``canonical_patient_ids``), once each is one it accepts."""
    canonical = canonical_patient_ids(patient_ids)
    problems = canonical.map(patient_id_problem)
    if problems.notna().any():
        row = int(problems.notna().to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: line {line_of(row)}, column 'Patient ID': {shown_value(patient_ids.iat[row])} is "
                        f"not an id the filter writes ({shown_value(problems.iat[row], 120)}); {FILTER_FIX}")
    return canonical


def _check_each_image_once(path: str | os.PathLike, table: pd.DataFrame) -> None:
    repeated = table["Image Index"].duplicated(keep=False).to_numpy().nonzero()[0]
    if len(repeated):
        name = table.at[int(repeated[0]), "Image Index"]
        first, second = (int(row) for row in repeated[table["Image Index"].to_numpy()[repeated] == name][:2])
        raise DataError(f"{path}: image {shown_value(name)} is on lines {line_of(first)} and {line_of(second)}; the "
                        f"filter lists each image once: {FILTER_FIX}")


def _check_each_patient_in_one_split(path: str | os.PathLike, table: pd.DataFrame) -> None:
    first_split = table.groupby("Patient ID", sort=False)["split"].transform("first")
    elsewhere = (table["split"] != first_split).to_numpy().nonzero()[0]
    if len(elsewhere):
        row = int(elsewhere[0])
        patient = table.at[row, "Patient ID"]
        first = int((table["Patient ID"] == patient).to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: patient {shown_value(patient)} is in split {table.at[first, 'split']!r} (line "
                        f"{line_of(first)}) and {table.at[row, 'split']!r} (line {line_of(row)}); the filter puts each "
                        f"patient in one split, or train films leak into the test scores: {FILTER_FIX}")

"""The filter stage's table (data/filtered/filtered.csv) as the stages after it read it.

One reader for all of them: a FIFO under the table's name is refused before it is opened (opening one waits
forever for a writer), and text that is not CSV is one line naming the file. ``check_split_table``
holds the table to what the filter guarantees and prepare relies on: 0/1 labels, a known split, each image
once, each patient in one split (a patient in two splits leaks train films into the test scores).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from cxr_diffusion.data.nih import DataError, whole_numbers
from cxr_diffusion.io import require_regular_file
from cxr_diffusion.safe_text import shown_value

FILTER_FIX = "rerun the filter stage (`dvc repro filter`)"
LABEL_VALUES = (0, 1)
_HEADER_LINES = 1  # row 0 of the table is line 2 of the file


def read_filtered_csv(path: str | os.PathLike, error: type[Exception] = DataError, **read_csv_options) -> pd.DataFrame:
    """``pd.read_csv(path, **read_csv_options)``; a folder, FIFO or device, or text pandas cannot parse (a column
    of ``usecols`` missing included) is ``error``, one line naming ``path``. A missing or unreadable file is the
    OSError, which the stage boundary reports naming the file ("no such file", "permission denied")."""
    require_regular_file(path, error, FILTER_FIX)
    try:
        return pd.read_csv(path, **read_csv_options)
    except ValueError as problem:  # ParserError, EmptyDataError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: not a readable CSV file ({' '.join(str(problem).split())[:200]}); "
                    f"{FILTER_FIX}") from None


def line_of(row: int) -> int:
    """The file line of table row ``row`` (0-based, after the header)."""
    return row + _HEADER_LINES + 1


def check_split_table(path: str | os.PathLike, table: pd.DataFrame, classes: Sequence[str],
                      splits: Sequence[str]) -> pd.DataFrame:
    """``table`` with its class columns as ints, once it holds only what the filter writes; else a ``DataError``
    naming ``path``, the line and the column. ``table`` has every column (checked by the caller), read as text.
    The splits are checked first: the later messages name a row's split, known good by then."""
    table = table.reset_index(drop=True)
    unknown = ~table["split"].isin(splits)
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: line {line_of(row)}, column 'split': {shown_value(table.at[row, 'split'])} is "
                        f"not one of {list(splits)}; {FILTER_FIX}")
    labels = table.copy()
    for name in classes:
        values = whole_numbers(table[name])
        bad = ~values.isin(LABEL_VALUES).fillna(False).astype(bool)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: line {line_of(row)}, column {name!r}: {shown_value(table.at[row, name])} is "
                            f"not a label (0 or 1); {FILTER_FIX}")
        labels[name] = values.astype("int64")
    _check_each_image_once(path, table)
    _check_each_patient_in_one_split(path, table)
    return labels


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

"""The dataset stage's ``image_paths.csv`` (Image Index -> path) as the filter and prepare read it.

One reader for both: a folder, FIFO or device under the file's name is refused before it is opened (opening a
FIFO waits forever for a writer), a file larger than any index the dataset stage writes is refused unread, and
everything else that is not the two-column CSV the dataset stage writes (an empty or binary file, text that is
not UTF-8, a repeated column, a row with more or fewer fields than the header, no ``Image Index`` or ``path``
column) is one line naming the file. Every cell is read as the text written there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cxr_diffusion.data.nih import DataError, read_csv_text
from cxr_diffusion.io import require_regular_file
from cxr_diffusion.safe_text import visible_text

IMAGE_PATHS_COLUMNS: tuple[str, ...] = ("Image Index", "path")
DATASET_FIX = "rerun the dataset stage (`dvc repro -f dataset`)"
# All 112,120 NIH images with absolute paths into a download are about 10 MB; a file this large is not one the
# dataset stage wrote, and parsing holds several times a file's size.
MAX_IMAGE_PATHS_BYTES = 128 << 20
_EXPECTED = f"the dataset stage's image_paths.csv, columns {list(IMAGE_PATHS_COLUMNS)}; {DATASET_FIX}"


def read_image_paths(path: str | os.PathLike) -> pd.DataFrame:
    """The table of ``path``: ``Image Index`` and ``path`` (and any other column) as text, in file order. A header
    with no rows is an empty table (a download whose images are all missing). Anything else unusable is a
    one-line ``DataError`` naming ``path``; a missing or unreadable file is the OSError, which the stage boundary
    reports naming the file."""
    path = Path(path)
    status = require_regular_file(path, DataError, DATASET_FIX)
    if status.st_size > MAX_IMAGE_PATHS_BYTES:
        raise DataError(f"{path}: {status.st_size / 2**20:,.0f} MB, more than the {MAX_IMAGE_PATHS_BYTES >> 20} MB of "
                        f"any image_paths.csv the dataset stage writes (all of NIH is about 10 MB); {DATASET_FIX}")
    table = read_csv_text(path, _EXPECTED, rows_required=False)
    missing = [name for name in IMAGE_PATHS_COLUMNS if name not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (found {list(table.columns)[:10]}); expected {_EXPECTED}")
    twice = table["Image Index"].duplicated(keep=False)
    if twice.any():  # two paths for one image: which one is the image?
        image = table["Image Index"][twice].iloc[0]
        rows = [int(row) + 1 for row in table.index[table["Image Index"] == image][:2]]
        raise DataError(f"{path}: image {visible_text(image, 80)!r} is listed twice (data rows {rows[0]} and "
                        f"{rows[1]}); {DATASET_FIX}")
    return table

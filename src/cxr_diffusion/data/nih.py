"""The NIH ChestX-ray14 layout: metadata CSV columns, safe image names, and indexing a download."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr_diffusion.errors import UserError
from cxr_diffusion.config import NIH_LABELS, NO_FINDING

# Columns the pipeline needs, as spelled in Data_Entry_2017.csv and Data_Entry_2017_v2020.csv.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position",
)
# The full published header (v2020 spelling); the phantom writes exactly this.
NIH_HEADER: tuple[str, ...] = REQUIRED_COLUMNS + (
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)
METADATA_FILENAMES: tuple[str, ...] = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
OFFICIAL_SPLIT_FILES: dict[str, str] = {"train_val": "train_val_list.txt", "test": "test_list.txt"}

# An Image Index is a bare file name: never a path, never something that walks out of the root.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\.(png|jpg|jpeg)$", re.IGNORECASE)


class DataError(UserError, ValueError):
    """Input data is unusable as given; the message names the file (and row or column) and the fix."""


def is_safe_image_index(name: object) -> bool:
    """True for a bare image file name such as ``00000001_000.png`` (no directories, no ``..``)."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


def read_metadata_csv(path: str | Path) -> pd.DataFrame:
    """Read an NIH-format metadata CSV; a missing required column is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata CSV not found")
    try:
        frame = pd.read_csv(path, dtype={"Image Index": str, "Finding Labels": str, "View Position": str,
                                         "Patient Gender": str}, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from error
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {missing}. An NIH-format metadata CSV needs "
            f"{list(REQUIRED_COLUMNS)} (as in Data_Entry_2017_v2020.csv)."
        )
    for column in ("Follow-up #", "Patient ID", "Patient Age"):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame.index[numbers.isna()]
        if len(bad):
            row = int(bad[0])
            raise DataError(f"{path}: row {row + 2} ({frame.at[row, 'Image Index']}): column '{column}' "
                            f"is {frame.at[row, column]!r}, expected a number")
        frame[column] = numbers.astype(int)
    return frame


def split_labels(finding_labels: str) -> tuple[str, ...]:
    """``'Effusion|Infiltration'`` -> ``('Effusion', 'Infiltration')``; ``'No Finding'`` stays itself."""
    return tuple(part.strip() for part in str(finding_labels).split("|") if part.strip())


def unknown_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(label for label in labels if label not in NIH_LABELS)


def is_no_finding(labels: tuple[str, ...]) -> bool:
    return labels == (NO_FINDING,)


@dataclass(frozen=True)
class NihIndex:
    """What a download holds: rows with an image on disk, rows without, and files no row names."""

    metadata_csv: Path
    image_paths: pd.DataFrame   # Image Index, path (absolute)
    missing: list[str]          # Image Index values with no file
    unexpected: list[str]       # image files that no metadata row names (relative to the root)
    official_lists: dict[str, Path]


def find_metadata_csv(root: Path) -> Path:
    for name in METADATA_FILENAMES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no NIH metadata CSV found; expected one of {list(METADATA_FILENAMES)} there "
                    f"(set dataset.nih_root to the folder of your NIH ChestX-ray14 download)")


def index_nih_root(root: str | Path) -> NihIndex:
    """Index an NIH ChestX-ray14 download in its published layout, without copying any image."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"dataset.nih_root: {root} is not a directory (point it at your NIH ChestX-ray14 download)")
    metadata_csv = find_metadata_csv(root)
    metadata = read_metadata_csv(metadata_csv)
    on_disk: dict[str, Path] = {}
    unexpected: list[str] = []
    for path in sorted(root.glob("images*/images/*")) + sorted(root.glob("images/*")):
        if not path.is_file():
            continue
        if path.name in on_disk:
            unexpected.append(str(path.relative_to(root)))  # a second copy of the same image name
            continue
        on_disk[path.name] = path
    named = set(metadata["Image Index"])
    unexpected += [str(p.relative_to(root)) for name, p in on_disk.items() if name not in named]
    found = [(name, str(on_disk[name])) for name in metadata["Image Index"] if name in on_disk]
    missing = [name for name in metadata["Image Index"] if name not in on_disk]
    lists = {key: root / name for key, name in OFFICIAL_SPLIT_FILES.items() if (root / name).is_file()}
    return NihIndex(
        metadata_csv=metadata_csv,
        image_paths=pd.DataFrame(found, columns=["Image Index", "path"]).drop_duplicates("Image Index"),
        missing=missing,
        unexpected=sorted(unexpected),
        official_lists=lists,
    )


def read_image_list(path: Path) -> set[str]:
    """One Image Index per line (NIH's train_val_list.txt / test_list.txt)."""
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}

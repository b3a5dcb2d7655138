"""The NIH ChestX-ray14 layout: metadata CSV columns, safe image names, and indexing a download."""

from __future__ import annotations

import csv
import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import lies_inside, require_regular_file
from cxr_diffusion.nih_labels import NIH_LABELS, NO_FINDING

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
_SAFE_PATIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_DIGITS = re.compile(r"[0-9]+")
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,18}")  # 18 digits always fit an int64
_SNIFF_BYTES = 8192  # read before parsing, to tell a binary file from a CSV
_ARROW_TEXT = "string[pyarrow]"


class DataError(UserError, ValueError):
    """Input data is unusable as given; the message names the file (and row or column) and the fix."""


def is_safe_image_index(name: object) -> bool:
    """True for a bare image file name such as ``00000001_000.png`` (no directories, no ``..``)."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


def read_csv_text(path: str | Path, expected: str, *, rows_required: bool = True) -> pd.DataFrame:
    """Every cell of a CSV as the text written there (nothing becomes NaN or a number); the first line is the header.

    A file that is not a well-formed CSV is a one-line ``DataError`` naming it (and the line), where pandas
    would raise a multi-line traceback or quietly pad short rows: an empty or binary file, text that is
    not UTF-8, a row whose field count differs from the header's, a repeated column, no data rows (unless
    ``rows_required`` is false: a header alone is then an empty table).
    ``expected`` says what the file should be (``"... such as Data_Entry_2017_v2020.csv"``). A ``.gz``
    file is read through gzip (torchxrayvision ships the NIH metadata so).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); expected {expected}")
    opener = gzip.open if path.suffix == ".gz" else open
    binary = DataError(f"{path}: not a text CSV (binary data); expected {expected}")
    try:
        with opener(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise binary from error
    if b"\x00" in head:  # NUL never occurs in a text CSV; it is the mark of an image, zip or xlsx
        raise binary
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:  # -sig: Excel's byte-order mark
            rows = [record for record in csv.reader(handle) if record]  # blank lines skipped, as pandas does
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8 CSV (expected {expected})") from error
    except csv.Error as error:  # e.g. a field over csv's 128 KiB limit
        raise DataError(f"{path}: not a well-formed CSV ({error}); expected {expected}") from error
    except (OSError, EOFError, zlib.error) as error:  # a .gz that breaks off mid-stream
        raise binary from error
    if not rows:
        raise DataError(f"{path}: no header line; expected {expected}")
    if any("\x00" in cell for record in rows for cell in record):  # past the sniffed head, csv keeps NUL in a cell
        raise binary
    header = [name.strip() for name in rows[0]]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: column(s) {repeated} appear more than once in the header; expected {expected}")
    if len(rows) == 1 and rows_required:
        raise DataError(f"{path}: a header but no rows; expected {expected}")
    ragged = next((i for i, record in enumerate(rows) if len(record) != len(header)), None)
    if ragged is not None:
        raise DataError(f"{path}: line {_line_of_record(path, opener, ragged)} has {len(rows[ragged])} fields but "
                        f"the header has {len(header)}; quote values that contain commas, or remove the extra fields")
    return pd.DataFrame(rows[1:], columns=header, dtype=object)


def _line_of_record(path: Path, opener, record: int) -> int:
    """The line (1-based, as an editor shows it) on which non-blank CSV record ``record`` ends."""
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        seen = -1
        for fields in reader:
            seen += bool(fields)
            if seen == record:
                return reader.line_num
    raise AssertionError("record not found on a second read")


def canonical_patient_ids(values: pd.Series) -> pd.Series:
    """The text that identifies each patient: ``Patient ID`` is an identifier, never a number.

    Surrounding spaces go. An id of digits only loses its leading zeros (``"0001"`` -> ``"1"``): NIH
    writes plain integers (``1`` ... ``30805`` in Data_Entry_2017_v2020.csv, never zero-padded, while
    Image Index pads to 8 digits), and a spreadsheet or a zero-padding script that rewrites ``1`` as
    ``0001`` must not split one patient in two across the patient-level split. Any other id is kept as
    written: ``7.9`` is not patient 7, ``P00123`` is ``P00123``. An int (a table built in code) is its
    decimal text; a missing value (None, NaN) is ``""``, which the filter rejects.
    """
    if pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype("int64").astype(str).astype(object)
    if pd.api.types.infer_dtype(values, skipna=False) != "string":
        values = values.map(_patient_id_text)
    text = values.astype(_ARROW_TEXT).str.strip()  # arrow: 20x faster than Python str ops on NIH's 112k rows
    digits = text.str.fullmatch(_DIGITS.pattern)
    text[digits] = text[digits].str.lstrip("0").replace("", "0")
    return text.astype(object)


def _patient_id_text(value: object) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def patient_id_problem(patient_id: str) -> str | None:
    """Why a canonical Patient ID cannot be used, or None. Only letters, digits, ``_ . -``, starting with a
    letter or digit: so a written CSV never has to alter an id to stop a spreadsheet running it as a
    formula (``-5``, ``=1+1``, ``@x``), and an id survives every CSV round trip unchanged."""
    if not patient_id:
        return "Patient ID is empty"
    if not _SAFE_PATIENT_ID.fullmatch(patient_id):
        return f"Patient ID is {patient_id!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit"
    return None


def patient_sort_key(patient_id: str) -> tuple[int, int, str]:
    """Numeric order for NIH's digit ids (``"2"`` before ``"10"``), then other ids in text order; the split's
    seeded shuffle starts from this order, so NIH's splits are the ones the integer ids gave."""
    if _DIGITS.fullmatch(patient_id):
        return (0, len(patient_id), patient_id)
    return (1, 0, patient_id)


def whole_numbers(values: pd.Series) -> pd.Series:
    """Each value as an int (nullable ``Int64``) where it is a whole number: ``"12"``, ``" -3 "``, ``"+5"``, ``12``;
    else <NA>: ``"7.9"``, ``"1e400"``, ``"abc"``, ``""``, floats, more than 18 digits. Strict on purpose:
    pandas would read ``7.9`` as a float and a cast to int would make it 7."""
    if pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype("Int64")
    if pd.api.types.infer_dtype(values, skipna=False) != "string":
        return pd.Series([_whole_number(v) for v in values], index=values.index, dtype="Int64")
    text = values.astype(_ARROW_TEXT).str.strip()
    whole = text.str.fullmatch(_WHOLE_NUMBER.pattern)
    numbers = pd.Series(pd.NA, index=values.index, dtype="Int64")
    numbers[whole] = pd.to_numeric(text[whole]).astype("Int64")
    return numbers


def _whole_number(value: object) -> int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        return int(value)
    return None


def read_metadata_csv(path: str | Path) -> pd.DataFrame:
    """Read an NIH-format metadata CSV. Every column is the text as written, except three:

    ``Patient ID``: text, see ``canonical_patient_ids`` (a bad id stays, for the filter to reject).
    ``Follow-up #`` and ``Patient Age``: an int where the text is a whole number (``-3`` included), else
    the text as written. One impossible age or follow-up is one bad row of 112,120, so the filter lists it
    as a reject naming the value (``invalid_age``, ``invalid_follow_up``) instead of refusing the whole
    download here; the column is int64 when every row is a whole number (NIH's own files).
    A missing file or column, or a file that is not a CSV (see ``read_csv_text``) is a one-line ``DataError``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata CSV not found")
    frame = read_csv_text(path, "an NIH-format metadata CSV such as Data_Entry_2017_v2020.csv")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {missing}. An NIH-format metadata CSV needs "
            f"{list(REQUIRED_COLUMNS)} (as in Data_Entry_2017_v2020.csv)."
        )
    frame["Patient ID"] = canonical_patient_ids(frame["Patient ID"])
    for column in ("Follow-up #", "Patient Age"):
        numbers = whole_numbers(frame[column])
        if numbers.notna().all():
            frame[column] = numbers.astype("int64")
        else:
            frame[column] = [text if number is pd.NA else int(number)
                             for text, number in zip(frame[column], numbers.astype(object))]
    return frame


def split_labels(finding_labels: str) -> tuple[str, ...]:
    """``'Effusion|Infiltration'`` -> ``('Effusion', 'Infiltration')``; ``'No Finding'`` stays itself."""
    return tuple(part.strip() for part in str(finding_labels).split("|") if part.strip())


def unknown_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(label for label in labels if label not in NIH_LABELS)


def is_no_finding(labels: tuple[str, ...]) -> bool:
    return labels == (NO_FINDING,)


def puts_no_finding_beside_a_finding(labels: tuple[str, ...]) -> bool:
    return NO_FINDING in labels and len(set(labels)) > 1


@dataclass(frozen=True)
class FilmRules:
    """The filter's rules on what one film's own row says: its Finding Labels, View Position and Patient Age.

    The filter rejects a metadata row that breaks one (each rule is a reason of ``filter.REJECT_REASONS``), and
    ``filtered_table.check_split_table`` refuses a filtered table that holds such a row (an edited table): one
    set of rules for both, so the two cannot drift apart. ``filter.film_rules`` makes it from ``FilterConfig``.
    """

    members: dict[str, tuple[str, ...]]  # class -> the NIH labels it stands for (FilterConfig.class_members())
    views: tuple[str, ...]               # filter.views
    allow_other_labels: bool             # filter.allow_other_labels
    ages: tuple[int, int]                # (filter.age_min, filter.age_max), both kept

    @cached_property
    def classes_by_label(self) -> dict[str, tuple[str, ...]]:
        """NIH label -> the classes it counts toward (merged classes may share a label)."""
        by_label: dict[str, list[str]] = {}
        for name, labels in self.members.items():
            for label in labels:
                by_label.setdefault(label, []).append(name)
        return {label: tuple(names) for label, names in by_label.items()}

    def classes_of(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """The classes a film with these Finding Labels counts toward, sorted: its 1s in the class columns."""
        return tuple(sorted({name for label in labels for name in self.classes_by_label.get(label, ())}))

    def keeps_view(self, view: object) -> bool:
        return view in self.views

    def ages_out_of_range(self, ages: pd.Series) -> pd.Series:
        """True where a (parsed, nullable) age lies outside ``ages``; False where it is missing."""
        return ((ages < self.ages[0]) | (ages > self.ages[1])).fillna(False).astype(bool)

    def outside_classes(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """The labels that count toward no class, when ``allow_other_labels`` is false (else none: they are kept)."""
        if self.allow_other_labels:
            return ()
        return tuple(label for label in labels if label not in self.classes_by_label)

    def first_broken(self, labels: tuple[str, ...], view: object) -> str | None:
        """The reason the filter rejects a film with these Finding Labels and View Position for, of these rules: the
        first broken in the order the filter applies them (other rules run between them there); else None."""
        if unknown_labels(labels):
            return "unknown_label"
        if puts_no_finding_beside_a_finding(labels):
            return "contradictory_labels"
        if not self.keeps_view(view):
            return "view"
        if not self.classes_of(labels):
            return "no_class_of_interest"
        if self.outside_classes(labels):
            return "labels_outside_classes"
        return None


@dataclass(frozen=True)
class NihIndex:
    """What a download holds: rows with an image on disk, rows without, and files no row names."""

    metadata_csv: Path
    image_paths: pd.DataFrame   # Image Index, path (absolute)
    missing: list[str]          # Image Index values with no file
    unexpected: list[str]       # image files that no metadata row names (relative to the root)
    official_lists: dict[str, Path]


def _own_file(root: Path, name: str) -> Path | None:
    """``root / name`` when it is a file of the download: one linked from outside it is refused (its bytes
    would be copied into data/dataset, the DVC cache and remote), as images linked outside are rejected."""
    path = root / name
    if not path.is_file():
        return None
    if not lies_inside(path, root):
        raise DataError(f"{path}: links to {os.path.realpath(path)}, outside dataset.nih_root ({root}); copy the "
                        f"file into the download instead of linking it")
    return path


SEXES = ("M", "F")  # NIH's Patient Gender values


def find_metadata_csv(root: Path) -> Path:
    for name in METADATA_FILENAMES:
        if _own_file(root, name) is not None:
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
    lists = {key: root / name for key, name in OFFICIAL_SPLIT_FILES.items() if _own_file(root, name) is not None}
    return NihIndex(
        metadata_csv=metadata_csv,
        image_paths=pd.DataFrame(found, columns=["Image Index", "path"]).drop_duplicates("Image Index"),
        missing=missing,
        unexpected=sorted(unexpected),
        official_lists=lists,
    )


MAX_IMAGE_LIST_BYTES = 64 << 20


def read_image_list(path: Path) -> set[str]:
    """One Image Index per line (NIH's train_val_list.txt / test_list.txt), read as UTF-8 text: a regular file of
    at most ``MAX_IMAGE_LIST_BYTES`` (NIH's lists are 1.1 and 0.4 MB), refused unread otherwise."""
    fix = f"restore NIH's {path.name} in dataset.nih_root and rerun `dvc repro -f dataset`"
    size = require_regular_file(path, DataError, fix).st_size
    if size > MAX_IMAGE_LIST_BYTES:
        raise DataError(f"{path}: {size:,} bytes, more than the {MAX_IMAGE_LIST_BYTES >> 20} MB an image list of "
                        f"NIH's 112,120 images can take; {fix}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Notepad, Excel) is no part of the first name
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}); it must list one "
                        f"Image Index per line: restore NIH's {path.name} in dataset.nih_root and rerun "
                        f"`dvc repro -f dataset`") from None
    return {line.strip() for line in text.splitlines() if line.strip()}

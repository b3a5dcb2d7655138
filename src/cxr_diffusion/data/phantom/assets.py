"""Real data files the phantom renderer builds on, read from the `torchxrayvision` pip package.

The package ships NIH ChestX-ray14 metadata, the NIH expert bounding boxes and a set of hand-drawn
lung masks. We only read those files: importing the package itself would pull in torchvision,
which this project does not depend on, so its folder is located with `importlib.util.find_spec`.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from cxr_diffusion.errors import UserError

NIH_METADATA_FILE = "Data_Entry_2017_v2020.csv.gz"
NIH_BOXES_FILE = "BBox_List_2017.csv.gz"
LUNG_MASKS_FILE = "semantic_masks_v7labs_lungs.zip"

# NIH boxes are drawn on the 1024 x 1024 release images.
NIH_BOX_IMAGE_SIZE = 1024.0
# The box list spells one finding differently from the metadata labels.
_BOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}

# A usable lung mask covers a plausible share of the image: masks that are empty, a speck, or
# most of the frame (an inverted or mislabelled file) would give the phantom no lungs to draw.
MIN_LUNG_FRACTION = 0.05
MAX_LUNG_FRACTION = 0.70
# Each of the two lungs must be a real region, not a stray blob left by JPEG artefacts.
MIN_COMPONENT_FRACTION = 0.01

_INSTALL_HINT = "pip install --no-deps torchxrayvision"


class PhantomAssetError(UserError, RuntimeError):
    """A data file of the torchxrayvision package is missing or damaged; reinstalling it fixes that."""


def torchxrayvision_data_dir() -> Path:
    """The `data/` folder inside the installed torchxrayvision package (never imported)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise PhantomAssetError(
            "The phantom dataset reads data files shipped in the torchxrayvision package, which is not "
            f"installed. Install it without its dependencies: `{_INSTALL_HINT}`."
        )
    data_dir = Path(spec.origin).parent / "data"
    if not data_dir.is_dir():
        raise PhantomAssetError(f"{data_dir}: torchxrayvision is installed but has no data folder; "
                           f"reinstall it with `{_INSTALL_HINT}`.")
    return data_dir


def _data_file(name: str) -> Path:
    path = torchxrayvision_data_dir() / name
    if not path.is_file():
        raise PhantomAssetError(f"{path}: missing from the torchxrayvision package; reinstall it with "
                           f"`{_INSTALL_HINT}`.")
    return path


def nih_metadata_csv() -> Path:
    """The real NIH ChestX-ray14 metadata (112,120 rows, v2020 header), gzip-compressed."""
    return _data_file(NIH_METADATA_FILE)


# ---------------------------------------------------------------------------------------------
# Lung masks


@dataclass(frozen=True)
class LungMaskLoad:
    """Masks that passed the checks, plus how many zip entries were skipped and why."""

    masks: np.ndarray  # bool (N, size, size)
    names: tuple[str, ...]
    skipped_unreadable: int
    skipped_degenerate: int


# The set's largest entry is 38 KB and its largest mask 26.7 million pixels (about 5200 x 5200): an entry
# beyond these bounds is counted unreadable before it is inflated or decoded.
MAX_MASK_ENTRY_BYTES = 16 << 20
MAX_MASK_PIXELS = 8192 * 8192


def _decode_mask(data: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))  # what the set holds; no other PIL plugin runs
    if image.width * image.height > MAX_MASK_PIXELS:
        raise ValueError(f"{image.width}x{image.height} pixels, more than any lung mask of the set")
    # JPEG can decode straight at a reduced scale, which makes loading several times faster.
    image.draft("L", (2 * size, 2 * size))
    gray = image.convert("L")
    # PNGs cannot draft; a box reduction first keeps the final filtered resize cheap.
    factor = min(gray.size) // (2 * size)
    if factor > 1:
        gray = gray.reduce(factor)
    gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(gray) > 127


def _is_two_lungs(mask: np.ndarray) -> bool:
    fraction = float(mask.mean())
    if not MIN_LUNG_FRACTION <= fraction <= MAX_LUNG_FRACTION:
        return False
    labels, count = ndimage.label(mask)
    if count < 2:
        return False
    areas = np.bincount(labels.ravel())[1:] / mask.size
    return int((areas >= MIN_COMPONENT_FRACTION).sum()) >= 2


def _clean_lungs(mask: np.ndarray) -> np.ndarray:
    """The two largest regions with their holes filled: annotation specks and gaps are not anatomy."""
    labels, _ = ndimage.label(mask)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    # Fill each lung on its own, so the mediastinum between two touching lungs stays open.
    first, second = np.argsort(areas)[-2:]
    return ndimage.binary_fill_holes(labels == first) | ndimage.binary_fill_holes(labels == second)


@lru_cache(maxsize=4)
def load_lung_mask_set(size: int) -> LungMaskLoad:
    """Every usable mask of the v7labs lung set at ``size`` x ``size``, in sorted entry order."""
    if size < 16:
        raise ValueError(f"lung mask size must be at least 16 pixels, got {size}")
    masks, names = [], []
    unreadable = degenerate = 0
    path = _data_file(LUNG_MASKS_FILE)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:  # a truncated download or a damaged install
        raise PhantomAssetError(f"{path}: not a readable zip file ({error}); reinstall it with "
                                f"`{_INSTALL_HINT}`.") from None
    with archive:
        for name in sorted(archive.namelist()):
            if name.endswith("/"):
                continue
            if archive.getinfo(name).file_size > MAX_MASK_ENTRY_BYTES:  # read whole below: bounded first
                unreadable += 1
                continue
            try:
                mask = _decode_mask(archive.read(name), size)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, EOFError,
                    zipfile.BadZipFile, zlib.error):
                unreadable += 1
                continue
            if not _is_two_lungs(mask):
                degenerate += 1
                continue
            masks.append(_clean_lungs(mask))
            names.append(name)
    if not masks:
        raise PhantomAssetError(f"{path}: no usable lung mask ({unreadable} unreadable, "
                           f"{degenerate} degenerate); reinstall torchxrayvision with `{_INSTALL_HINT}`.")
    stacked = np.stack(masks)
    stacked.setflags(write=False)  # shared through the cache: nobody may edit it in place
    return LungMaskLoad(stacked, tuple(names), unreadable, degenerate)


def load_lung_masks(size: int) -> np.ndarray:
    """Real lung masks, bool (N, size, size); True = lung. Read-only and cached per size."""
    return load_lung_mask_set(size).masks


# ---------------------------------------------------------------------------------------------
# Finding boxes


@dataclass(frozen=True)
class FindingBoxStats:
    """The expert boxes of one finding, normalised to [0, 1] image coordinates (x right, y down)."""

    finding: str
    centers: np.ndarray  # float (n, 2): box centre x, y
    sizes: np.ndarray  # float (n, 2): box width, height

    def __len__(self) -> int:
        return len(self.centers)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One real box (centre, size) drawn at random."""
        index = int(rng.integers(len(self.centers)))
        return self.centers[index].copy(), self.sizes[index].copy()


@lru_cache(maxsize=1)
def finding_box_stats() -> dict[str, FindingBoxStats]:
    """The NIH expert boxes (8 findings), grouped by finding name as the metadata spells it."""
    path = _data_file(NIH_BOXES_FILE)
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    try:
        with gzip.open(path, "rt", newline="") as handle:
            reader = csv.reader(handle)
            next(reader)  # header: Image Index,Finding Label,Bbox [x,y,w,h],,,
            for row_number, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    x, y, w, h = (float(value) for value in row[2:6])
                except ValueError:
                    raise PhantomAssetError(f"{path}: row {row_number}: box {row[2:6]} is not four numbers; "
                                            f"reinstall it with `{_INSTALL_HINT}`.") from None
                label = _BOX_LABEL_ALIASES.get(row[1].strip(), row[1].strip())
                boxes.setdefault(label, []).append((x, y, w, h))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error, StopIteration) as error:
        # gzip.BadGzipFile is an OSError; a truncated file ends in EOFError; an empty one has no header
        reason = " ".join(str(error).split()) or type(error).__name__
        raise PhantomAssetError(f"{path}: not a readable gzip CSV ({reason}); reinstall it with "
                                f"`{_INSTALL_HINT}`.") from None
    stats = {}
    for label, rows in sorted(boxes.items()):
        array = np.clip(np.asarray(rows, dtype=np.float64) / NIH_BOX_IMAGE_SIZE, 0.0, 1.0)
        centers = array[:, :2] + array[:, 2:] / 2
        centers.setflags(write=False)
        sizes = array[:, 2:].copy()
        sizes.setflags(write=False)
        stats[label] = FindingBoxStats(label, centers, sizes)
    return stats


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomAssets:
    """Everything real the renderer draws from."""

    lung_masks: np.ndarray  # bool (N, size, size)
    box_stats: dict[str, FindingBoxStats]


def load_phantom_assets(mask_size: int = 256) -> PhantomAssets:
    return PhantomAssets(lung_masks=load_lung_masks(mask_size), box_stats=finding_box_stats())

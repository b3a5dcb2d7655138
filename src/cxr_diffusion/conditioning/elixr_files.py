"""The published ELIXR file formats: find, scan and read them (and write them, for stand-ins and tests).

Three layouts are read:
- The published snapshot (Hugging Face ``Yasintuncer/nih-cxr14-elixr``), read from its root: a
  ``datasets.json`` whose ``datasets`` mapping nests one entry per dataset (a node with
  ``"type": "dataset"``; its nested name, e.g. ``elixrb/img_emb``, is its folder) listing its
  ``features`` with dtype and shape. Each dataset folder holds HDF5 shards ``<name>_1.h5`` ...
  ``<name>_12.h5`` (numeric order) with an ``Image Index`` dataset (``b"00000001_000.png"``) and the
  feature arrays. ``elixr.dataset`` and ``elixr.feature`` pick one image feature.
- The older HDF5 shards: an ``embeddings`` dataset, (N, tokens, dim) or flattened (N, tokens * dim),
  and an ``image_ids`` dataset of byte strings without ``.png`` (a folder, searched recursively, may
  also hold snapshot-style shards with ``Image Index`` and ``elixr.feature`` but no ``datasets.json``).
- Parquet files: an ``Image Index`` column (with or without ``.png``) and one embedding column,
  ``embedding`` or ``img_emb``, holding a flat list of floats or a list of per-token lists.

A feature's row becomes (tokens, dim): the last axis is dim and every leading axis is flattened into
tokens, so ELIXR-B ``img_emb`` [32, 768] is used as is, ``contrastive_img_emb`` [128] is one token
and ELIXR-C ``Embedding`` [1, 8, 8, 1376] is 64 tokens of 1376. Only ids and shapes are read here at
scan time; embeddings are read block by block (``iter_embedding_blocks``).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_diffusion.assets.standin_marker import standin_attribute
from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.io import lies_inside, read_json, require_regular_file
from cxr_diffusion.safe_text import visible_text

HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
HDF5_EMBEDDINGS, HDF5_IDS = "embeddings", "image_ids"
ID_COLUMN = "Image Index"  # the id in the filtered table, in Parquet files and in snapshot shards
PARQUET_EMBEDDING_COLUMNS: tuple[str, ...] = ("embedding", "img_emb")
SNAPSHOT_INDEX = "datasets.json"
# Bounds on what a file may declare, checked before anything is allocated: ELIXR-B rows are 32 x 768 and
# ELIXR-C rows 64 x 1376; a million tokens per row would make a terabyte store at nih-512.
MAX_TOKENS, MAX_DIM = 1024, 8192
MAX_SIZE = MAX_TOKENS * MAX_DIM  # any one declared axis
MAX_ROWS = 10_000_000  # per file: NIH ChestX-ray14 has 112,120 images; ids are read whole at scan time
MAX_ID_BYTES = 256  # a fixed-width id ("00000001_000.png" is 16 bytes)
MAX_ID_COLUMN_BYTES = 64 << 20  # ids are read whole at scan time: 112,120 NIH ids of 16 bytes are 1.8 MB
MAX_CHUNK_BYTES = 64 << 20  # HDF5 decompresses a whole chunk per read: a 4 MB file may declare 4 GB chunks
# A dataset or feature name with one of these words (split on '/' and '_') is a text-tower output.
TEXT_WORDS: frozenset[str] = frozenset({"txt", "text"})


def normalize_image_id(value: str | bytes) -> str:
    """The NIH Image Index for an id as the files spell it: ``b"00000001_000"`` -> ``"00000001_000.png"``."""
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    text = text.strip()
    if not text:
        raise DataError("empty image id; every embedding row needs its NIH Image Index (e.g. 00000001_000)")
    # Older shards drop the extension; the filtered table keeps it. An existing one (any case) is kept.
    return text if text.lower().endswith(".png") else f"{text}.png"


def shard_sort_key(path: Path) -> tuple:
    """Order shards by the integer after the last ``_`` of the name (``_10`` after ``_9``), then by name."""
    match = re.fullmatch(r"(.*)_(\d+)", path.stem)
    return (match.group(1), int(match.group(2)), path.name) if match else (path.stem, -1, path.name)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of a snapshot dataset as ``datasets.json`` declares it (per row, no batch axis)."""
    name: str
    dtype: str | None
    shape: tuple[int, ...] | None  # None: not declared, or variable (``[-1]``)
    shape_problem: str | None = None  # why the declared shape is unusable; an error only if this feature is read


@dataclass(frozen=True)
class ElixrFile:
    """One scanned file: its image ids in row order and where its embeddings live."""
    path: Path
    image_ids: tuple[str, ...]     # normalized (``.png`` added), in row order
    shape: tuple[int, int] | None  # (tokens, dim); None only for an empty Parquet file of nested lists
    column: str                    # the HDF5 dataset or Parquet column holding the embeddings
    standin: bool = False          # the file says it is a stand-in (an HDF5 ``standin`` attribute)

    @property
    def is_hdf5(self) -> bool:
        return self.path.suffix.lower() in HDF5_SUFFIXES


@dataclass(frozen=True)
class ElixrSource:
    """The scanned files behind ``elixr.path`` and which layout, dataset and feature they came from."""
    files: list[ElixrFile]
    layout: str            # "snapshot" (datasets.json) or "files" (older shards, Parquet)
    dataset: str | None    # snapshot dataset read; None for "files"
    feature: str | None    # snapshot feature read; None for "files"
    info: dict             # datasets.json's "info" (e.g. the stand-in's label); {} for "files"

    @property
    def is_standin(self) -> bool:
        """The snapshot's index or any of its shards says it is a stand-in, not ELIXR."""
        return bool(self.info.get("standin")) or any(file.standin for file in self.files)


def scan_elixr_source(config: ElixrConfig) -> ElixrSource:
    """Find and scan the files at ``config.path``: the snapshot via ``datasets.json`` when present."""
    root = Path(config.path)
    expected = tuple(config.shape) if config.shape is not None else None
    if root.is_dir() and (root / SNAPSHOT_INDEX).is_file():
        offered, info = read_snapshot_index(root)
        spec = select_feature(root, offered, info, config.dataset, config.feature)
        files = [_scan_hdf5(p, expected, config.feature, declared=spec.shape, dataset=config.dataset)
                 for p in find_snapshot_shards(root, config.dataset)]
        return ElixrSource(files, "snapshot", config.dataset, config.feature, info)
    if root.is_dir() and (root / config.dataset).is_dir():
        # A snapshot without its datasets.json (e.g. a partial download): the dataset folder is still known.
        files = [_scan_hdf5(p, expected, config.feature, declared=None, dataset=config.dataset)
                 for p in find_snapshot_shards(root, config.dataset)]
        return ElixrSource(files, "snapshot", config.dataset, config.feature, {})
    files = [scan_elixr_file(p, expected, config.feature) for p in find_elixr_files(root)]
    return ElixrSource(files, "files", None, None, {})


def find_elixr_files(path: str | Path) -> list[Path]:
    """The HDF5 and Parquet files at ``path`` (one file, or a folder searched recursively), in shard order."""
    path = Path(path)
    suffixes = HDF5_SUFFIXES + PARQUET_SUFFIXES
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise DataError(f"{path}: not an ELIXR file; expected one of {list(suffixes)}")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: does not exist; set elixr.path to the ELIXR snapshot root (or a folder or file "
                        f"of ELIXR-B embeddings)")
    # Hidden folders are skipped: a Hugging Face download keeps lock and metadata files in `.cache/`.
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: (p.parent.parts, shard_sort_key(p)))
    if not files:
        raise DataError(f"{path}: no ELIXR files found; expected HDF5 shards ({', '.join(HDF5_SUFFIXES)}) with "
                        f"'{HDF5_EMBEDDINGS}' and '{HDF5_IDS}', Parquet files with '{ID_COLUMN}' and one of "
                        f"{list(PARQUET_EMBEDDING_COLUMNS)}, or the published snapshot ({SNAPSHOT_INDEX} at its root)")
    for file in files:
        _check_inside(file, path, "the ELIXR folder", "copy the file itself into the folder")
    return files


def find_snapshot_shards(root: Path, dataset: str) -> list[Path]:
    """The HDF5 shards of one snapshot dataset, ``<name>_1.h5`` ... in numeric order."""
    folder = root / dataset
    if not folder.is_dir():
        raise DataError(f"{folder}: the folder of dataset '{dataset}' is missing from the snapshot at {root}; "
                        f"is the download complete?")
    shards = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES
                     and not p.name.startswith(".")), key=shard_sort_key)
    for shard in shards:
        _check_inside(shard, root, "the snapshot", "copy the shard itself into the snapshot")
    if not shards:
        raise DataError(f"{folder}: no HDF5 shards ({', '.join(HDF5_SUFFIXES)}) for dataset '{dataset}'; "
                        f"is the download complete?")
    return shards


def _check_inside(path: Path, root: Path, where: str, fix: str) -> None:
    """``path``, links followed, must lie in ``root`` (or its Hugging Face cache's ``blobs/``).

    A link may point anywhere (another user's files, a private export): what elixr.path names is the
    only place a run may read, so a file reached through a link out of it is refused before it is opened.
    """
    if not lies_inside(path, root):
        raise DataError(f"{path}: lies outside {where} at {root} (it links to {path.resolve()}); {fix}")


# ----------------------------------------------------------------------------- datasets.json

def read_snapshot_index(root: Path) -> tuple[dict[str, dict[str, FeatureSpec]], dict]:
    """``({dataset name: {feature name: spec}}, info)`` from ``root/datasets.json``, at any nesting depth."""
    path = root / SNAPSHOT_INDEX
    _check_inside(path, root, "the snapshot", f"copy {SNAPSHOT_INDEX} itself into the snapshot")
    try:
        index = read_json(path, "download the ELIXR snapshot's datasets.json again (or rerun `dvc repro -f "
                                "elixr_standin` for the stand-in)", kind=object)
    except OSError as error:
        raise DataError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(index, dict) or not isinstance(index.get("datasets"), dict):
        raise DataError(f"{path}: expected an object with a 'datasets' mapping (found "
                        f"{sorted(index) if isinstance(index, dict) else type(index).__name__})")
    offered: dict[str, dict[str, FeatureSpec]] = {}

    def visit(node: dict, name: str) -> None:
        if node.get("type") == "dataset":
            offered[name] = _parse_features(path, name, node.get("features"))
            return
        for key, child in node.items():
            if isinstance(child, dict):
                visit(child, f"{name}/{key}" if name else str(key))

    visit(index["datasets"], "")
    if not offered:
        raise DataError(f"{path}: no entry with \"type\": \"dataset\" under 'datasets'; is this the ELIXR snapshot?")
    info = index.get("info")
    return offered, info if isinstance(info, dict) else {}


def select_feature(root: Path, offered: dict[str, dict[str, FeatureSpec]], info: dict, dataset: str,
                   feature: str) -> FeatureSpec:
    """The spec of ``dataset``/``feature``; a missing one or a text embedding is an error listing the offer."""
    where = root / SNAPSHOT_INDEX
    standin = " (the in-pipeline stand-in; set elixr.path to the published snapshot for the others)" \
        if info.get("standin") else ""
    if dataset not in offered:
        raise DataError(f"{where}: no dataset '{dataset}' (elixr.dataset){standin}; it offers "
                        f"{describe_offer(offered)}")
    if feature not in offered[dataset] or feature == ID_COLUMN:
        raise DataError(f"{where}: dataset '{dataset}' has no embedding feature '{feature}' (elixr.feature)"
                        f"{standin}; the snapshot offers {describe_offer(offered)}")
    _refuse_text(f"{where}: elixr.dataset '{dataset}', elixr.feature '{feature}'", dataset, feature,
                 describe_offer(offered, images_only=True))
    spec = offered[dataset][feature]
    if spec.shape_problem:
        raise DataError(f"{where}: feature '{feature}' of dataset '{dataset}' declares {spec.shape_problem}; "
                        f"download datasets.json again")
    return spec


def describe_offer(offered: dict[str, dict[str, FeatureSpec]], images_only: bool = False) -> str:
    """One line: ``elixrc: Embedding [1, 8, 8, 1376]; elixrb/img_emb: img_emb [32, 768]; ...``."""
    parts = []
    for dataset, features in offered.items():
        listed = [f"{name} {list(spec.shape) if spec.shape is not None else '[?]'}" for name, spec in features.items()
                  if name != ID_COLUMN and not (images_only and is_text_embedding(dataset, name))]
        if listed:
            parts.append(f"{dataset}: {', '.join(listed)}")
    return "; ".join(parts) or "no embedding features"


def is_text_embedding(dataset: str, feature: str) -> bool:
    """True for ELIXR-B text-tower outputs (``elixrb/txt_emb``, ``contrastive_txt_emb``): not image embeddings."""
    words = {word.lower() for part in f"{dataset}/{feature}".split("/") for word in part.split("_")}
    return bool(words & TEXT_WORDS)


def _refuse_text(what: str, dataset: str, feature: str, images: str) -> None:
    if is_text_embedding(dataset, feature):
        raise DataError(f"{what} is a text embedding (ELIXR-B's text tower, stored per image), not an embedding of "
                        f"the image, so it cannot condition the elixr branch; choose an image feature: {images}")


def _parse_features(path: Path, dataset: str, features: object) -> dict[str, FeatureSpec]:
    """Accept ``{name: {dtype, shape}}`` (or ``{name: dtype}``) and ``[{name, dtype, shape}, ...]``."""
    if isinstance(features, dict):
        items = [(name, value) for name, value in features.items()]
    elif isinstance(features, list):
        if not all(isinstance(value, dict) and isinstance(value.get("name"), str) for value in features):
            raise DataError(f"{path}: dataset '{dataset}' lists 'features' without a 'name' in every entry")
        items = [(value["name"], value) for value in features]
    else:
        raise DataError(f"{path}: dataset '{dataset}' has no 'features' mapping or list (found {features!r})")
    specs = {}
    for name, value in items:
        value = {"dtype": value} if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise DataError(f"{path}: feature '{name}' of dataset '{dataset}' is {value!r}; expected {{dtype, shape}}")
        shape, problem = _declared_shape(value.get("shape"))
        dtype = value.get("dtype")
        specs[str(name)] = FeatureSpec(str(name), str(dtype) if dtype is not None else None, shape, problem)
    return specs


def _declared_shape(shape: object) -> tuple[tuple[int, ...] | None, str | None]:
    """A declared per-row shape as the reference loader reads it: a list of sizes or a bare int; ``[-1]``,
    ``[]`` or nothing for a variable-length or scalar column. Anything else is kept as a problem, raised only
    when that feature is the one read."""
    if shape is None or shape == [] or shape == [-1]:
        return None, None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = [shape]
    if isinstance(shape, list) and all(isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_SIZE
                                       for size in shape):
        return tuple(shape), None
    return None, f"shape {visible_text(repr(shape), 60)}, not a list of sizes 1 to {MAX_SIZE}"


# ----------------------------------------------------------------------------- scanning and reading

def scan_elixr_file(path: Path, expected: tuple[int, int] | None, feature: str | None = None) -> ElixrFile:
    """Read a file's ids and embedding shape (not its embeddings); the shape must match ``expected`` if set.

    An HDF5 file in the older layout uses ``embeddings``; otherwise ``Image Index`` and ``feature``.
    """
    if path.suffix.lower() in HDF5_SUFFIXES:
        return _scan_hdf5(path, expected, feature, declared=None, dataset=None)
    with _damaged_file_errors(path, "Parquet"):
        return _scan_parquet(path, expected)


def iter_embedding_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                          chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)`` float32 blocks of at most ``chunk_rows`` rows covering ``rows``.

    Blocks that contain none of ``rows`` are never read.
    """
    reader = _hdf5_blocks if file.is_hdf5 else _parquet_blocks
    with _damaged_file_errors(file.path, "HDF5" if file.is_hdf5 else "Parquet"):
        yield from reader(file, shape, np.asarray(rows, dtype=np.int64), chunk_rows)


@contextlib.contextmanager
def _damaged_file_errors(path: Path, kind: str) -> Iterator[None]:
    """One DataError naming ``path`` for what h5py and pyarrow raise on a damaged (bit-flipped, cut) file.

    h5py raises RuntimeError or KeyError on a broken object header and OSError on a failed read;
    pyarrow raises OSError or ArrowInvalid on a broken page. An OSError with an errno (permissions,
    a full disk) is the machine's, not the file's, and passes through.
    """
    try:
        yield
    except DataError:
        raise
    except (OSError, RuntimeError, KeyError, pa.ArrowException) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"{path}: damaged {kind} file ({reason}); download it again (or rerun the stage that "
                        f"wrote it)") from None


# ----------------------------------------------------------------------------- HDF5

def _open_hdf5(path: Path) -> h5py.File:
    _check_regular_file(path, "HDF5")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 file ({error})") from error


def _hdf5_datasets(handle: h5py.File) -> list[str]:
    found: list[str] = []
    handle.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
    return found


def _scan_hdf5(path: Path, expected: tuple[int, int] | None, feature: str | None,
               declared: tuple[int, ...] | None, dataset: str | None) -> ElixrFile:
    """Ids and (tokens, dim) of one shard; a shard of snapshot ``dataset`` must hold ``Image Index`` + ``feature``."""
    snapshot = dataset is not None
    with _damaged_file_errors(path, "HDF5"), _open_hdf5(path) as handle:
        def has(name: str | None) -> bool:
            return name is not None and isinstance(handle.get(name), h5py.Dataset)

        if not snapshot and has(HDF5_EMBEDDINGS) and has(HDF5_IDS):
            column, id_column = HDF5_EMBEDDINGS, HDF5_IDS
        elif has(ID_COLUMN) and has(feature) and feature != ID_COLUMN:
            _refuse_text(f"{path}: elixr.feature '{feature}'", dataset or "", feature,
                         "an image feature of the same files (e.g. img_emb)")
            column, id_column = feature, ID_COLUMN
        elif snapshot:
            raise DataError(f"{path}: expected datasets '{ID_COLUMN}' and '{feature}' (elixr.feature), found "
                            f"{_hdf5_datasets(handle)}; is this shard from the same snapshot?")
        else:
            raise DataError(f"{path}: expected datasets '{HDF5_EMBEDDINGS}' and '{HDF5_IDS}' (older layout), or "
                            f"'{ID_COLUMN}' and '{feature}' (elixr.feature), found {_hdf5_datasets(handle)}; "
                            f"is this an ELIXR embedding shard?")
        _check_stored_in_file(path, handle, id_column, kinds="SOU", what="image ids (text)")
        _check_stored_in_file(path, handle, column, kinds="f", what="floating-point embeddings")
        values, raw_ids = handle[column], handle[id_column][()]
        if raw_ids.ndim == 2 and raw_ids.shape[1] == 1:
            raw_ids = raw_ids[:, 0]
        if raw_ids.ndim != 1 or not values.shape or len(raw_ids) != values.shape[0]:
            raise DataError(f"{path}: '{id_column}' has shape {raw_ids.shape} but '{column}' has shape "
                            f"{values.shape}; each embedding row needs one id")
        row = _declared_row(path, column, tuple(values.shape[1:]), declared)
        shape = _checked_shape(path, f"dataset '{column}'", row, expected, flat_is_one_token=column != HDF5_EMBEDDINGS)
        image_ids = tuple(_normalized(path, number, value) for number, value in enumerate(raw_ids))
        standin = standin_attribute(handle.attrs, path)
    return ElixrFile(path, image_ids, shape, column, standin)


def _check_stored_in_file(path: Path, handle: h5py.File, name: str, kinds: str, what: str) -> None:
    """``name`` must be a dataset stored in this file, written, of a dtype kind in ``kinds``.

    HDF5 can make a dataset read from elsewhere: an external link (another file), external raw storage
    (any file, e.g. /etc/passwd read as floats) or a virtual dataset (a map over other files). A snapshot
    shard holds its data itself, so each is refused; so is a dataset never written (HDF5 answers its fill
    value for every row) and one of another dtype (ints, bools, complex or strings would be cast silently).
    """
    parts = name.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        link = handle.get("/".join(parts[:depth]), getlink=True)
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise DataError(f"{path}: '{name}' is {kind}; a shard must hold its data itself (download it again)")
    dataset = handle[name]
    if dataset.shape is None or not dataset.shape:  # a NULL dataspace (h5py.Empty) or a scalar holds no rows
        raise DataError(f"{path}: '{name}' holds no rows (shape {dataset.shape}); is this an ELIXR shard?")
    if dataset.shape[0] > MAX_ROWS:
        raise DataError(f"{path}: '{name}' declares {dataset.shape[0]:,} rows, more than a shard holds "
                        f"(NIH ChestX-ray14 has 112,120 images in all); is this an ELIXR shard?")
    if dataset.is_virtual or dataset.external:
        source = "a virtual dataset over other files" if dataset.is_virtual else "stored in external files"
        raise DataError(f"{path}: '{name}' is {source}; a shard must hold its data itself (download it again)")
    if dataset.size and (dataset.id.get_storage_size() == 0 or _unwritten_chunks(dataset)):
        raise DataError(f"{path}: '{name}' was never written, in whole or in part (HDF5 would give its fill value "
                        f"for those rows); the shard is incomplete: download it again")
    if dataset.dtype.kind not in kinds or dataset.dtype.names is not None:
        raise DataError(f"{path}: '{name}' holds {dataset.dtype}, expected {what}; is this an ELIXR shard?")
    if dataset.dtype.kind in "SU" and dataset.dtype.itemsize > MAX_ID_BYTES:  # read whole at scan time
        raise DataError(f"{path}: '{name}' holds ids {dataset.dtype.itemsize:,} bytes wide (an NIH id is 16); "
                        f"is this an ELIXR shard?")
    if dataset.dtype.kind in "SU" and dataset.shape[0] * dataset.dtype.itemsize > MAX_ID_COLUMN_BYTES:
        raise DataError(f"{path}: '{name}' holds {dataset.shape[0] * dataset.dtype.itemsize:,} bytes of ids, more "
                        f"than {MAX_ID_COLUMN_BYTES >> 20} MB (all 112,120 NIH ids take 1.8 MB); is this an ELIXR shard?")
    chunk = math.prod(dataset.chunks) * dataset.dtype.itemsize if dataset.chunks else 0
    if chunk > MAX_CHUNK_BYTES:
        raise DataError(f"{path}: '{name}' is stored in chunks of {chunk:,} bytes (shape {dataset.chunks}), more "
                        f"than {MAX_CHUNK_BYTES >> 20} MB, each decompressed whole on every read; is this an ELIXR "
                        f"shard?")


def _unwritten_chunks(dataset: h5py.Dataset) -> bool:
    """True when a chunked dataset has chunks that were never written (only their fill value exists)."""
    if dataset.chunks is None:
        return False
    expected = math.prod(math.ceil(size / chunk) for size, chunk in zip(dataset.shape, dataset.chunks))
    return dataset.id.get_num_chunks() < expected


def _declared_row(path: Path, column: str, row: tuple[int, ...], declared: tuple[int, ...] | None) -> tuple[int, ...]:
    """The row shape to use: the file's, checked against datasets.json's (which also unflattens a flat row)."""
    if declared is None or row == declared:
        return row
    if _without_leading_ones(row) == _without_leading_ones(declared) or (len(row) == 1 and row[0] == math.prod(declared)):
        return declared
    raise DataError(f"{path}: '{column}' holds rows of shape {list(row)} but {SNAPSHOT_INDEX} declares "
                    f"{list(declared)}; is this shard from the same snapshot?")


def _without_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(1, 8, 8, 1376)`` -> ``(8, 8, 1376)``: a leading batch-of-one axis is not part of the layout."""
    first = next((i for i, size in enumerate(shape) if size != 1), len(shape))
    return tuple(shape[first:])


def _hdf5_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                 chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    with _open_hdf5(file.path) as handle:
        dataset = handle[file.column]
        for first in np.unique(rows // chunk_rows) * chunk_rows:
            block = dataset[int(first):int(first) + chunk_rows]
            yield int(first), np.asarray(block, dtype=np.float32).reshape(len(block), *shape)


# ----------------------------------------------------------------------------- Parquet

def _open_parquet(path: Path, read_dictionary: list[str] | None = None) -> pq.ParquetFile:
    _check_regular_file(path, "Parquet")
    try:
        return pq.ParquetFile(path, read_dictionary=read_dictionary)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _scan_parquet(path: Path, expected: tuple[int, int] | None) -> ElixrFile:
    parquet = _open_parquet(path)
    columns = parquet.schema_arrow.names
    found = [c for c in columns if c in PARQUET_EMBEDDING_COLUMNS]  # a name twice is two columns: which is meant?
    if columns.count(ID_COLUMN) != 1 or len(found) != 1:
        raise DataError(f"{path}: expected columns '{ID_COLUMN}' and exactly one of "
                        f"{list(PARQUET_EMBEDDING_COLUMNS)}, found {columns}")
    column = found[0]
    _check_parquet_footer(path, parquet)
    _check_declared_values(path, parquet.metadata, column, math.prod(expected) if expected else MAX_SIZE)
    raw_ids = _read_parquet_ids(path)
    image_ids = tuple(_normalized(path, row, value) for row, value in enumerate(raw_ids))
    shape = None
    if raw_ids:
        first = next(parquet.iter_batches(batch_size=1, columns=[column])).column(0)
        shape = _checked_shape(path, f"column '{column}'", _list_shape(path, column, first), expected)
        if expected is None:  # now the row size is known: no later row may be larger
            _check_declared_values(path, parquet.metadata, column, math.prod(shape))
    elif expected is not None:
        shape = expected
    return ElixrFile(path, image_ids, shape, column)


def _check_declared_values(path: Path, metadata: pq.FileMetaData, column: str, values_per_row: int) -> None:
    """Each row group's embedding values, as the footer declares them, before one is decoded: at most
    ``values_per_row`` a row. Arrow decodes a row whole, so a few KB of zstd holding millions of zeros in one
    row would be allocated in full (and a scan turns row 0 into Python floats) before its length is checked.
    The footer counts a null or empty list as one value, so a row never needs fewer than one."""
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        declared = sum(row_group.column(number).num_values for number in range(row_group.num_columns)
                       if row_group.column(number).path_in_schema.split(".")[0] == column)
        if declared > row_group.num_rows * max(values_per_row, 1):
            raise DataError(f"{path}: row group {group} declares {declared:,} values in column '{column}' for "
                            f"{row_group.num_rows:,} rows, more than {values_per_row:,} a row (elixr.shape, or the "
                            f"first row's, or at most {MAX_TOKENS} x {MAX_DIM}); is this an ELIXR shard?")


def _check_parquet_footer(path: Path, parquet: pq.ParquetFile) -> None:
    """The HDF5 shard bounds, from the footer before a row is read.

    Ids are read whole at scan time, and a few KB of zstd can hold millions of rows or ids of many MB
    each: arrow would allocate all of it. So the rows declared and the id column's uncompressed size
    must be what a shard can hold, and the ids must be text (a nested column would be read whole too).
    """
    metadata = parquet.metadata
    rows = metadata.num_rows
    if rows > MAX_ROWS:
        raise DataError(f"{path}: declares {rows:,} rows, more than a shard holds (NIH ChestX-ray14 has 112,120 "
                        f"images in all); is this an ELIXR shard?")
    id_type = parquet.schema_arrow.field(ID_COLUMN).type
    id_type = id_type.value_type if pa.types.is_dictionary(id_type) else id_type
    if not any(test(id_type) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                          pa.types.is_large_binary)):
        raise DataError(f"{path}: column '{ID_COLUMN}' holds {id_type}, expected image ids (text); is this an "
                        f"ELIXR shard?")
    stored = sum(metadata.row_group(group).column(number).total_uncompressed_size
                 for group in range(metadata.num_row_groups) for number in range(metadata.num_columns)
                 if metadata.row_group(group).column(number).path_in_schema == ID_COLUMN)
    _check_id_bytes(path, stored)


def _read_parquet_ids(path: Path) -> list:
    """The id column as Python values, after checking each id's width and their total size as HDF5's are.

    The column is read dictionary-encoded, as it is stored: one wide id repeated over every row costs its
    width once, not once per row, until the checks have passed.
    """
    ids = _open_parquet(path, read_dictionary=[ID_COLUMN]).read(columns=[ID_COLUMN]).column(0)
    widest, total = 0, 0
    for chunk in ids.chunks:
        if pa.types.is_dictionary(chunk.type):
            lengths = pc.binary_length(chunk.dictionary)
            total += pc.sum(lengths.take(chunk.indices)).as_py() or 0
        else:
            lengths = pc.binary_length(chunk)
            total += pc.sum(lengths).as_py() or 0
        widest = max(widest, pc.max(lengths).as_py() or 0)
    if widest > MAX_ID_BYTES:
        raise DataError(f"{path}: column '{ID_COLUMN}' holds ids {widest:,} bytes wide (an NIH id is 16); is this "
                        f"an ELIXR shard?")
    _check_id_bytes(path, total)
    return ids.to_pylist()


def _check_id_bytes(path: Path, size: int) -> None:
    """HDF5's bound on a whole id column, for Parquet: ids are read whole at scan time."""
    if size > MAX_ID_COLUMN_BYTES:
        raise DataError(f"{path}: column '{ID_COLUMN}' holds {size:,} bytes of ids, more than "
                        f"{MAX_ID_COLUMN_BYTES >> 20} MB (all 112,120 NIH ids take 1.8 MB); is this an ELIXR shard?")


def _is_list_type(data_type: pa.DataType) -> bool:
    return pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type)


def _list_shape(path: Path, column: str, first_row: pa.Array) -> tuple[int, ...]:
    """The shape of the first row, from the column's type (its nesting) and list lengths, never as Python values:
    (tokens * dim,) for a flat list, (tokens, dim) for a list of lists (dim: the first token's)."""
    if not _is_list_type(first_row.type):
        raise DataError(f"{path}: column '{column}' is {first_row.type}, expected a list of floats (or of lists)")
    inner = first_row.type.value_type
    nested = _is_list_type(inner)
    leaf = inner.value_type if nested else inner
    if not pa.types.is_floating(leaf):  # strings, ints, bools or deeper lists would be cast or fail on read
        raise DataError(f"{path}: column '{column}' is {first_row.type}, expected a list of floats (or of lists of "
                        f"floats)")
    if first_row.null_count:
        raise DataError(f"{path}: row 0 of column '{column}' is empty (null); every row needs an embedding")
    length = pc.list_value_length(first_row)[0].as_py()
    if not nested:
        return (length,)
    tokens = pc.list_flatten(first_row)
    if tokens.null_count:
        raise _null_token(path, column, 0)
    return (length, pc.list_value_length(tokens)[0].as_py() if length else 0)


def _null_token(path: Path, column: str, row: int) -> DataError:
    return DataError(f"{path}: row {row} of column '{column}' has a null token; every token needs its dim values "
                     f"(a list of floats)")


def _parquet_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                    chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    parquet = _open_parquet(file.path)
    starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
    for group in range(parquet.num_row_groups):
        if not ((rows >= starts[group]) & (rows < starts[group + 1])).any():
            continue
        first = int(starts[group])
        for batch in parquet.iter_batches(batch_size=chunk_rows, row_groups=[group], columns=[file.column]):
            yield first, _parquet_batch_array(file, shape, batch.column(0), first)
            first += batch.num_rows


def _parquet_batch_array(file: ElixrFile, shape: tuple[int, int], values: pa.Array, first: int) -> np.ndarray:
    """(n, tokens, dim) float32 from a list column, after checking every row has the right length."""
    tokens, dim = shape
    if values.null_count:
        row = first + int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{file.path}: row {row} of column '{file.column}' is null; every row needs an embedding")
    # A flat row holds tokens * dim floats; a nested one holds `tokens` lists of `dim`.
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    nested = _is_list_type(values.type.value_type)
    want = tokens if nested else tokens * dim
    inner = pc.list_flatten(values)
    if nested:
        row_of_token = np.cumsum(lengths)  # the row holding token t is searchsorted(row_of_token, t, "right")
        if inner.null_count:
            token = int(np.flatnonzero(inner.is_null().to_numpy(zero_copy_only=False))[0])
            raise _null_token(file.path, file.column, first + int(np.searchsorted(row_of_token, token, "right")))
        inner_lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        bad_inner = np.flatnonzero(inner_lengths != dim)
        if len(bad_inner):
            bad_row = int(np.searchsorted(row_of_token, bad_inner[0], side="right"))
            raise DataError(f"{file.path}: row {first + bad_row} of column '{file.column}' has a token of length "
                            f"{inner_lengths[bad_inner[0]]}, expected {dim} (shape {shape})")
        inner = pc.list_flatten(inner)
    bad = np.flatnonzero(lengths != want)
    if len(bad):
        raise DataError(f"{file.path}: row {first + int(bad[0])} of column '{file.column}' has "
                        f"{lengths[bad[0]]} {'tokens' if nested else 'values'}, expected {want} (shape {shape})")
    array = inner.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return array.reshape(len(values), tokens, dim)


# ----------------------------------------------------------------------------- shared checks

def _check_regular_file(path: Path, kind: str) -> None:
    """Refuse a FIFO, device or folder under a shard's name unopened: opening a FIFO waits forever for a writer."""
    try:
        require_regular_file(path, DataError, f"an ELIXR shard is a plain {kind} file: point elixr.path at the "
                                              f"downloaded files")
    except OSError as error:
        raise DataError(f"{path}: not a readable {kind} file ({error})") from error


def _checked_shape(path: Path, what: str, found: tuple[int, ...], expected: tuple[int, int] | None,
                   flat_is_one_token: bool = False) -> tuple[int, int]:
    """(tokens, dim) of one file's rows: the last axis is dim, leading axes are flattened into tokens.

    A flat row is reshaped to ``expected`` (elixr.shape) when set; otherwise it is one token of a
    snapshot feature (``flat_is_one_token``) or, in the older layout, an error asking for elixr.shape.
    """
    if not found or min(found) <= 0:
        raise DataError(f"{path}: {what} holds rows of shape {tuple(found)}; expected (tokens, dim), flat, "
                        f"or (..., dim)")
    if math.prod(found[:-1]) > MAX_TOKENS or found[-1] > (MAX_DIM if len(found) >= 2 else MAX_SIZE):
        raise DataError(f"{path}: {what} holds rows of shape {tuple(found)}: more than {MAX_TOKENS} tokens or "
                        f"{MAX_DIM} values per token, far beyond any ELIXR output (32 x 768, 64 x 1376); "
                        f"is this an ELIXR shard?")
    if len(found) >= 2:
        shape = (math.prod(found[:-1]), int(found[-1]))
        if expected is not None and shape != expected:
            as_tokens = f" = {shape} (tokens, dim)" if len(found) > 2 else ""
            raise DataError(f"{path}: {what} holds rows of shape {tuple(found)}{as_tokens}, but elixr.shape is "
                            f"{expected}; fix elixr.shape (null: from the files) or use the matching files")
        return shape
    if expected is None:
        if flat_is_one_token:
            if found[0] > MAX_DIM:
                raise DataError(f"{path}: {what} holds flat rows of {found[0]} values: more than {MAX_DIM} for one "
                                f"token; set elixr.shape to [tokens, dim] if they are several")
            return (1, int(found[0]))
        raise DataError(f"{path}: {what} is flat ({found[0]} values per row); set elixr.shape to "
                        f"[tokens, dim] (ELIXR-B: [32, 768]) so it can be reshaped")
    if found[0] != expected[0] * expected[1]:
        raise DataError(f"{path}: {what} has {found[0]} values per row, which is not elixr.shape {expected} "
                        f"({expected[0] * expected[1]} values); fix elixr.shape or use the matching files")
    return expected


def _normalized(path: Path, row: int, value: object) -> str:
    if not isinstance(value, (str, bytes)):
        raise DataError(f"{path}: row {row} has image id {value!r}; expected a string such as 00000001_000")
    try:
        return normalize_image_id(value)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: row {row}: image id is not UTF-8 ({error})") from error
    except DataError as error:
        raise DataError(f"{path}: row {row}: {error}") from error

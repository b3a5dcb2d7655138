"""Pre-extracted ELIXR-B embeddings: read the published files and join them to the filtered table.

Two layouts are accepted:
- HDF5 shards (as published for NIH ChestX-ray14): an ``embeddings`` dataset, (N, tokens, dim) or
  flattened (N, tokens * dim), and an ``image_ids`` dataset of byte strings without ``.png``.
- Parquet files: an ``Image Index`` column (with or without ``.png``) and one embedding column,
  ``embedding`` or ``img_emb``, holding a flat list of floats or a list of per-token lists.

A full NIH set is about 4.7 GB of float32, so nothing here holds it at once: ids are scanned first
(they are small), then embeddings are copied chunk by chunk into the condition store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.conditioning.store import ConditionStoreWriter
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.io import atomic_path, write_csv, write_json

HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
HDF5_EMBEDDINGS, HDF5_IDS = "embeddings", "image_ids"
PARQUET_ID_COLUMN = "Image Index"
PARQUET_EMBEDDING_COLUMNS: tuple[str, ...] = ("embedding", "img_emb")
CHUNK_ROWS = 1024  # rows read at once: 1024 x 32 x 768 float32 is ~100 MB, well under the 2 GB budget
REJECT_REASONS: tuple[str, ...] = ("missing_embedding", "non_finite")
MAX_IDS_IN_MESSAGE = 5  # an error lists this many example ids, then the count


def normalize_image_id(value: str | bytes) -> str:
    """The NIH Image Index for an id as the files spell it: ``b"00000001_000"`` -> ``"00000001_000.png"``."""
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    text = text.strip()
    if not text:
        raise DataError("empty image id; every embedding row needs its NIH Image Index (e.g. 00000001_000)")
    # Published shards drop the extension; the filtered table keeps it. An existing one (any case) is kept.
    return text if text.lower().endswith(".png") else f"{text}.png"


def find_elixr_files(path: str | Path) -> list[Path]:
    """The HDF5 and Parquet files at ``path`` (one file, or a folder searched recursively), sorted."""
    path = Path(path)
    suffixes = HDF5_SUFFIXES + PARQUET_SUFFIXES
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise DataError(f"{path}: not an ELIXR file; expected one of {list(suffixes)}")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: does not exist; set elixr.path to a folder (or file) of ELIXR-B embeddings")
    # Hidden folders are skipped: a Hugging Face download keeps lock and metadata files in `.cache/`.
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no ELIXR files found; expected HDF5 shards ({', '.join(HDF5_SUFFIXES)}) with "
                        f"'{HDF5_EMBEDDINGS}' and '{HDF5_IDS}', or Parquet files with '{PARQUET_ID_COLUMN}' and "
                        f"one of {list(PARQUET_EMBEDDING_COLUMNS)}")
    return files


@dataclass(frozen=True)
class ElixrFile:
    """One scanned file: its image ids in row order and where its embeddings live."""
    path: Path
    image_ids: tuple[str, ...]     # normalized (``.png`` added), in row order
    shape: tuple[int, int] | None  # (tokens, dim); None only for an empty Parquet file of nested lists
    column: str                    # the HDF5 dataset or Parquet column holding the embeddings

    @property
    def is_hdf5(self) -> bool:
        return self.path.suffix.lower() in HDF5_SUFFIXES


def scan_elixr_file(path: Path, expected: tuple[int, int] | None) -> ElixrFile:
    """Read a file's ids and embedding shape (not its embeddings); the shape must match ``expected`` if set."""
    if path.suffix.lower() in HDF5_SUFFIXES:
        return _scan_hdf5(path, expected)
    return _scan_parquet(path, expected)


def iter_embedding_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                          chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)`` float32 blocks of at most ``chunk_rows`` rows covering ``rows``.

    Blocks that contain none of ``rows`` are never read.
    """
    reader = _hdf5_blocks if file.is_hdf5 else _parquet_blocks
    yield from reader(file, shape, np.asarray(rows, dtype=np.int64), chunk_rows)


def write_elixr_hdf5_shard(path: str | Path, image_ids: list[str], embeddings: np.ndarray) -> Path:
    """Write a shard in the published layout, atomically: float32 (N, tokens, dim) and ids without ``.png``."""
    path = Path(path)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 3:
        raise DataError(f"{path}: embeddings must be (N, tokens, dim), got shape {embeddings.shape}")
    if len(image_ids) != len(embeddings):
        raise DataError(f"{path}: {len(image_ids)} image ids for {len(embeddings)} embeddings")
    bare = [_strip_png(normalize_image_id(i)) for i in image_ids]
    width = max((len(b.encode("utf-8")) for b in bare), default=1)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset(HDF5_EMBEDDINGS, data=embeddings)
            handle.create_dataset(HDF5_IDS, data=np.array([b.encode("utf-8") for b in bare], dtype=f"S{width}"))
    return path


def build_elixr_store(filtered_csv: Path, config: ElixrConfig, out_dir: Path, rejects_csv: Path,
                      metrics_path: Path | None, source_label: str) -> dict:
    """Join the filtered table to the ELIXR files by image id and write a condition store at ``out_dir``.

    One store row per kept image, in the order of the filtered table. Images without an embedding or
    with non-finite values are dropped (listed in ``rejects_csv``) or, with ``on_missing: error``, fail
    the stage. Returns the metrics, also written to ``metrics_path`` when given.
    """
    if config.path is None:
        raise DataError("elixr.path is null: set it to the folder of ELIXR-B files (or use the stand-in stage)")
    names = _read_filtered_names(Path(filtered_csv))
    expected = tuple(config.shape) if config.shape is not None else None
    files = [scan_elixr_file(p, expected) for p in find_elixr_files(config.path)]
    shape = _common_shape(files, expected)
    located = _locate_ids(files)

    wanted = {normalize_image_id(n) for n in names}
    missing = [n for n in names if normalize_image_id(n) not in located]
    if missing and config.on_missing == "error":
        raise DataError(f"{filtered_csv}: {len(missing)} filtered image(s) have no ELIXR embedding in "
                        f"{config.path}, e.g. {missing[:MAX_IDS_IN_MESSAGE]}; point elixr.path at the full set "
                        f"or set elixr.on_missing: drop")
    candidates = [n for n in names if normalize_image_id(n) in located]

    meta = {"branch": "elixr", "source": source_label, "files": [str(f.path) for f in files]}
    non_finite: list[str] = []
    if candidates:
        non_finite = _write_store(out_dir, files, located, candidates, shape, config, meta, excluded=set())
        if non_finite:
            # Rare: a retry without those rows keeps the store one row per kept image.
            again = _write_store(out_dir, files, located, candidates, shape, config, meta, set(non_finite))
            if again:
                raise DataError(f"{config.path}: values changed while reading ({again[:MAX_IDS_IN_MESSAGE]}); rerun")

    rejects = [(n, "missing_embedding") for n in missing] + [(n, "non_finite") for n in non_finite]
    order = {n: i for i, n in enumerate(names)}
    rejects.sort(key=lambda item: order[item[0]])
    write_csv(rejects_csv, pd.DataFrame(rejects, columns=["Image Index", "reason"]))
    dropped = {reason: sum(1 for _, r in rejects if r == reason) for reason in REJECT_REASONS}
    metrics = {"images_in": len(names), "written": len(candidates) - len(non_finite),
               "dropped_by_reason": dropped, "unused_embeddings": sum(1 for i in located if i not in wanted),
               "files": len(files), "shape": list(shape) if shape else None, "source": source_label}
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    if metrics["written"] == 0:
        raise DataError(f"{filtered_csv}: none of its {len(names)} image(s) has a usable ELIXR embedding in "
                        f"{config.path} (see {rejects_csv}); check that elixr.path holds this dataset")
    return metrics


# ----------------------------------------------------------------------------- joining and copying

def _read_filtered_names(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: filtered table not found; run the filter stage first")
    columns = list(pd.read_csv(path, nrows=0).columns)
    if PARQUET_ID_COLUMN not in columns:
        raise DataError(f"{path}: no '{PARQUET_ID_COLUMN}' column (found {columns}); pass the filter stage's output")
    names = pd.read_csv(path, usecols=[PARQUET_ID_COLUMN], dtype=str, keep_default_na=False)[PARQUET_ID_COLUMN]
    seen: dict[str, int] = {}
    for row, name in enumerate(names):
        if not name.strip():
            raise DataError(f"{path}: row {row + 2} has an empty '{PARQUET_ID_COLUMN}'")
        key = normalize_image_id(name)
        if key in seen:
            raise DataError(f"{path}: '{name}' appears on rows {seen[key] + 2} and {row + 2}; the filtered table "
                            f"must list each image once")
        seen[key] = row
    return list(names)


def _common_shape(files: list[ElixrFile], expected: tuple[int, int] | None) -> tuple[int, int] | None:
    """Every file must hold the same (tokens, dim); ``expected`` was already checked per file."""
    first = next((f for f in files if f.shape is not None), None)
    for file in files:
        if file.shape is not None and file.shape != first.shape:
            raise DataError(f"{file.path}: embeddings are {file.shape} (tokens, dim) but {first.path} has "
                            f"{first.shape}; all ELIXR files must come from the same model")
    return expected if expected is not None else (first.shape if first else None)


def _locate_ids(files: list[ElixrFile]) -> dict[str, tuple[int, int]]:
    """image id -> (file number, row); an id in two places is an error (which one would be right?)."""
    located: dict[str, tuple[int, int]] = {}
    for number, file in enumerate(files):
        for row, image_id in enumerate(file.image_ids):
            if image_id in located:
                other, other_row = located[image_id]
                raise DataError(f"image id {image_id} appears twice: {files[other].path} (row {other_row}) and "
                                f"{file.path} (row {row}); remove the duplicate file or row")
            located[image_id] = (number, row)
    return located


class _RowsNotFinite(Exception):
    def __init__(self, names: list[str]):
        super().__init__(f"{len(names)} rows with non-finite values")
        self.names = names


def _write_store(out_dir: Path, files: list[ElixrFile], located: dict[str, tuple[int, int]],
                 candidates: list[str], shape: tuple[int, int], config: ElixrConfig, meta: dict,
                 excluded: set[str]) -> list[str]:
    """Copy the embeddings of ``candidates`` minus ``excluded`` into a store at ``out_dir``.

    Returns the candidates whose values are not finite; when there are any, no store is written
    (its row count was fixed before they were seen) and the caller retries without them.
    """
    kept = [n for n in candidates if n not in excluded]
    try:
        with ConditionStoreWriter(out_dir, len(kept), *shape, dtype=config.dtype) as writer:
            bad = _copy_rows(writer, files, located, kept, shape, strict=config.on_missing == "error")
            if bad:
                raise _RowsNotFinite(bad)
            writer.finish(kept, np.arange(len(kept)), meta)
    except _RowsNotFinite as found:
        return found.names
    return []


def _copy_rows(writer: ConditionStoreWriter, files: list[ElixrFile], located: dict[str, tuple[int, int]],
               kept: list[str], shape: tuple[int, int], strict: bool) -> list[str]:
    """Stream each file's wanted rows into store rows 0..len(kept)-1; return the non-finite names.

    After the first non-finite row nothing more is written (that store is discarded) but the scan
    goes on, so one retry drops them all.
    """
    plan: dict[int, list[tuple[int, int]]] = {}  # file number -> [(source row, store row)]
    for store_row, name in enumerate(kept):
        number, row = located[normalize_image_id(name)]
        plan.setdefault(number, []).append((row, store_row))
    bad: list[tuple[int, str]] = []
    for number, pairs in sorted(plan.items()):
        pairs.sort()
        source = np.array([p[0] for p in pairs], dtype=np.int64)
        target = np.array([p[1] for p in pairs], dtype=np.int64)
        for first, block in iter_embedding_blocks(files[number], shape, source, CHUNK_ROWS):
            inside = (source >= first) & (source < first + len(block))
            local, rows_out = source[inside] - first, target[inside]
            finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)[local]
            for row_in, row_out in zip(local[~finite], rows_out[~finite]):
                if strict:
                    raise DataError(f"{files[number].path}: row {first + row_in} ({kept[row_out]}) has NaN or "
                                    f"infinite values; fix the file or set elixr.on_missing: drop")
                bad.append((int(row_out), kept[row_out]))
            if not bad:
                _write_runs(writer, block, local, rows_out)
            del block
    return [name for _, name in sorted(bad)]


def _write_runs(writer: ConditionStoreWriter, block: np.ndarray, local: np.ndarray, rows_out: np.ndarray) -> None:
    """Write rows that are consecutive in both the block and the store as one slice each."""
    if len(local) == 0:
        return
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(rows_out) != 1)) + 1
    for run_in, run_out in zip(np.split(local, breaks), np.split(rows_out, breaks)):
        writer.write(int(run_out[0]), block[run_in[0]:run_in[-1] + 1])


def _strip_png(image_id: str) -> str:
    return image_id[:-4] if image_id.lower().endswith(".png") else image_id


# ----------------------------------------------------------------------------- HDF5

def _open_hdf5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 file ({error})") from error


def _hdf5_datasets(handle: h5py.File) -> list[str]:
    found: list[str] = []
    handle.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
    return found


def _scan_hdf5(path: Path, expected: tuple[int, int] | None) -> ElixrFile:
    with _open_hdf5(path) as handle:
        if not all(isinstance(handle.get(k), h5py.Dataset) for k in (HDF5_EMBEDDINGS, HDF5_IDS)):
            raise DataError(f"{path}: expected datasets '{HDF5_EMBEDDINGS}' and '{HDF5_IDS}', found "
                            f"{_hdf5_datasets(handle)}; is this an ELIXR-B embedding shard?")
        dataset, raw_ids = handle[HDF5_EMBEDDINGS], handle[HDF5_IDS][()]
        shape = _checked_shape(path, f"dataset '{HDF5_EMBEDDINGS}'", dataset.shape[1:], expected)
        if raw_ids.ndim != 1 or len(raw_ids) != dataset.shape[0]:
            raise DataError(f"{path}: '{HDF5_IDS}' has shape {raw_ids.shape} but '{HDF5_EMBEDDINGS}' has "
                            f"{dataset.shape[0]} rows; each embedding row needs one id")
        image_ids = tuple(_normalized(path, row, value) for row, value in enumerate(raw_ids))
    return ElixrFile(path, image_ids, shape, HDF5_EMBEDDINGS)


def _hdf5_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                 chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    with _open_hdf5(file.path) as handle:
        dataset = handle[file.column]
        for first in np.unique(rows // chunk_rows) * chunk_rows:
            block = dataset[int(first):int(first) + chunk_rows]
            yield int(first), np.asarray(block, dtype=np.float32).reshape(len(block), *shape)


# ----------------------------------------------------------------------------- Parquet

def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _scan_parquet(path: Path, expected: tuple[int, int] | None) -> ElixrFile:
    parquet = _open_parquet(path)
    columns = parquet.schema_arrow.names
    found = [c for c in PARQUET_EMBEDDING_COLUMNS if c in columns]
    if PARQUET_ID_COLUMN not in columns or len(found) != 1:
        raise DataError(f"{path}: expected columns '{PARQUET_ID_COLUMN}' and exactly one of "
                        f"{list(PARQUET_EMBEDDING_COLUMNS)}, found {columns}")
    column = found[0]
    raw_ids = parquet.read(columns=[PARQUET_ID_COLUMN]).column(0).to_pylist()
    image_ids = tuple(_normalized(path, row, value) for row, value in enumerate(raw_ids))
    shape = None
    if raw_ids:
        first = next(parquet.iter_batches(batch_size=1, columns=[column])).column(0)
        shape = _checked_shape(path, f"column '{column}'", _list_shape(path, column, first), expected)
    elif expected is not None:
        shape = expected
    return ElixrFile(path, image_ids, shape, column)


def _list_shape(path: Path, column: str, values: pa.Array) -> tuple[int, ...]:
    """The nesting of the first row: (tokens * dim,) for a flat list, (tokens, dim) for a list of lists."""
    if not pa.types.is_list(values.type) and not pa.types.is_large_list(values.type) \
            and not pa.types.is_fixed_size_list(values.type):
        raise DataError(f"{path}: column '{column}' is {values.type}, expected a list of floats (or of lists)")
    row = values[0].as_py()
    if row is None:
        raise DataError(f"{path}: row 0 of column '{column}' is empty (null); every row needs an embedding")
    if row and isinstance(row[0], list):
        return (len(row), len(row[0]))
    return (len(row),)


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
    flat = values.type.value_type
    nested = pa.types.is_list(flat) or pa.types.is_large_list(flat) or pa.types.is_fixed_size_list(flat)
    want = tokens if nested else tokens * dim
    inner = pc.list_flatten(values)
    if nested:
        inner_lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        bad_inner = np.flatnonzero(inner_lengths != dim)
        if len(bad_inner):
            bad_row = int(np.searchsorted(np.cumsum(lengths), bad_inner[0], side="right"))
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

def _checked_shape(path: Path, what: str, found: tuple[int, ...],
                   expected: tuple[int, int] | None) -> tuple[int, int]:
    """(tokens, dim) of one file's rows, from (tokens, dim) or a flat (tokens * dim,) with ``expected``."""
    if len(found) == 2:
        if expected is not None and tuple(found) != expected:
            raise DataError(f"{path}: {what} holds rows of shape {tuple(found)}, but elixr.shape is {expected}; "
                            f"fix elixr.shape or use the matching files")
        return (int(found[0]), int(found[1]))
    if len(found) != 1:
        raise DataError(f"{path}: {what} holds rows of shape {tuple(found)}; expected (tokens, dim) or flat")
    if expected is None:
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

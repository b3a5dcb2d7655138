"""ELIXR embeddings -> condition store: join the published files to the filtered table by image id.

The files themselves (the published snapshot with its ``datasets.json``, older HDF5 shards, Parquet)
are found by ``conditioning/elixr_files.py`` and read by its format readers. A full NIH set is GBs of
float32, so nothing here holds it at once: ids are scanned first (they are small), then the embeddings are streamed
block by block twice, cast to the store's dtype: once to find the rows that are not finite there, once
to copy the others into a store of exactly that many rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.conditioning.elixr_files import iter_embedding_blocks, scan_elixr_source
from cxr_diffusion.conditioning.elixr_format import ID_COLUMN, ElixrFile, normalize_image_id
from cxr_diffusion.conditioning.store import ConditionStoreWriter
from cxr_diffusion.data.filtered_table import check_each_image_once, read_filtered_csv
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.io import write_csv, write_json

CHUNK_ROWS = 1024  # rows read at once: 1024 x 32 x 768 float32 is ~100 MB, well under the 2 GB budget
CHUNK_BYTES = 128 << 20  # and at most this much float32 per block (ELIXR-C rows are 64 x 1376: 381 rows)
REJECT_REASONS: tuple[str, ...] = ("missing_embedding", "non_finite", "all_zero")
MAX_IDS_IN_MESSAGE = 5  # an error lists this many example ids, then the count


def build_elixr_store(filtered_csv: Path, config: ElixrConfig, out_dir: Path, rejects_csv: Path,
                      metrics_path: Path | None, source_label: str) -> dict:
    """Join the filtered table to the ELIXR files by image id and write a condition store at ``out_dir``.

    One store row per kept image, in the order of the filtered table. Images without an embedding or
    with non-finite values are dropped (listed in ``rejects_csv``) or, with ``on_missing: error``, fail
    the stage. Returns the metrics, also written to ``metrics_path`` when given. A run that fails writes
    none of its outputs, so the last good store, rejects and metrics stay in place.
    """
    if config.path is None:
        raise DataError("elixr.path is null: set it to the ELIXR snapshot root (or use the stand-in stage)")
    names = _read_filtered_names(Path(filtered_csv))
    expected = tuple(config.shape) if config.shape is not None else None
    source = scan_elixr_source(config)
    if source.is_standin and source_label == "elixr":
        # The label comes from the files, not from which param named them: a stand-in is never reported as ELIXR.
        print(f"embed_elixr: {config.path} is a stand-in snapshot (its files say so), NOT ELIXR; "
              f"it is labelled elixr_standin in the metrics and the report", flush=True)
        source_label = "elixr_standin"
    files = source.files
    shape = _common_shape(files, expected)
    located = _locate_ids(files)

    wanted = {normalize_image_id(n) for n in names}
    missing = [n for n in names if normalize_image_id(n) not in located]
    if missing and config.on_missing == "error":
        raise DataError(f"{filtered_csv}: {len(missing)} filtered image(s) have no ELIXR embedding in "
                        f"{config.path}, e.g. {missing[:MAX_IDS_IN_MESSAGE]}; point elixr.path at the full set "
                        f"or set elixr.on_missing: drop")
    candidates = [n for n in names if normalize_image_id(n) in located]

    what = {"layout": source.layout, "dataset": source.dataset, "feature": source.feature}
    meta = {"branch": "elixr", "source": source_label, **what, "files": [str(f.path) for f in files]}
    non_finite: list[str] = []
    all_zero: list[str] = []
    if candidates:
        non_finite, all_zero = _unusable(files, located, candidates, shape, config.dtype,
                                         strict=config.on_missing == "error")
    unusable = {*non_finite, *all_zero}
    kept = [n for n in candidates if n not in unusable]
    rejects = [(n, "missing_embedding") for n in missing] + [(n, "non_finite") for n in non_finite] + \
        [(n, "all_zero") for n in all_zero]
    dropped = {reason: sum(1 for _, r in rejects if r == reason) for reason in REJECT_REASONS}
    _refuse_empty_store(filtered_csv, config, len(names), kept, dropped)

    _check_disk_space(out_dir, len(kept) * shape[0] * shape[1] * np.dtype(config.dtype).itemsize)
    _write_store(out_dir, files, located, kept, shape, config.dtype, meta)
    order = {n: i for i, n in enumerate(names)}
    rejects.sort(key=lambda item: order[item[0]])
    write_csv(rejects_csv, pd.DataFrame(rejects, columns=["Image Index", "reason"]))
    metrics = {"images_in": len(names), "written": len(kept),
               "dropped_by_reason": dropped, "unused_embeddings": sum(1 for i in located if i not in wanted),
               "files": len(files), "shape": list(shape) if shape else None, "source": source_label, **what}
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics


def _refuse_empty_store(filtered_csv: Path, config: ElixrConfig, images: int, kept: list[str],
                        dropped: dict[str, int]) -> None:
    """No usable embedding at all is an error raised before anything is written.

    A failed run leaves the previous output as it was: writing first would replace the last good store (and
    its rejects and metrics) with an empty one, which then fails every stage that opens it.
    """
    if kept:
        return
    reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count)
    raise DataError(f"{filtered_csv}: none of its {images} image(s) has a usable ELIXR embedding in "
                    f"{config.path} ({reasons}); check that elixr.path holds this dataset")


# ----------------------------------------------------------------------------- joining and copying

def _read_filtered_names(path: Path) -> list[str]:
    columns = list(read_filtered_csv(path, nrows=0).columns)
    if ID_COLUMN not in columns:
        raise DataError(f"{path}: no '{ID_COLUMN}' column (found {columns}); pass the filter stage's output")
    names = read_filtered_csv(path, usecols=[ID_COLUMN], dtype=str, keep_default_na=False)[ID_COLUMN]
    if names.empty:
        raise DataError(f"{path}: no images (0 rows); nothing to embed. Check that the filter stage keeps images "
                        f"(filter.* params) and rerun it")
    for row, name in enumerate(names):
        if not name.strip():
            raise DataError(f"{path}: row {row + 2} has an empty '{ID_COLUMN}'")
    check_each_image_once(path, names.to_frame(), key=normalize_image_id)  # as the snapshot's ids are matched
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


def _cast_blocks(files: list[ElixrFile], located: dict[str, tuple[int, int]], names: list[str], shape: tuple[int, int],
                 dtype: str) -> Iterator[tuple[ElixrFile, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Stream the rows of ``names``, file by file and block by block, cast to ``dtype``.

    Yields ``(file, first, block, local, positions)``: ``block`` holds the file's rows from ``first`` on, and
    its rows ``local`` are the embeddings of ``names[positions]``. Blocks come in file order, so ``positions``
    jump around the filtered table's order. A consumer drops its ``block`` before asking for the next, so
    nothing is held but the block being read and its cast.
    """
    plan: dict[int, list[tuple[int, int]]] = {}  # file number -> [(source row, position in names)]
    for position, name in enumerate(names):
        number, row = located[normalize_image_id(name)]
        plan.setdefault(number, []).append((row, position))
    chunk_rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (shape[0] * shape[1] * 4)))
    for number, pairs in sorted(plan.items()):
        pairs.sort()
        source = np.array([p[0] for p in pairs], dtype=np.int64)
        target = np.array([p[1] for p in pairs], dtype=np.int64)
        for first, block in iter_embedding_blocks(files[number], shape, source, chunk_rows):
            inside = (source >= first) & (source < first + len(block))
            with np.errstate(over="ignore"):
                stored = block.astype(dtype, copy=False)
            del block
            yield files[number], first, stored, source[inside] - first, target[inside]
            del stored


def _finite_rows(block: np.ndarray) -> np.ndarray:
    return np.isfinite(block.reshape(len(block), -1)).all(axis=1)


def _unusable(files: list[ElixrFile], located: dict[str, tuple[int, int]], candidates: list[str],
             shape: tuple[int, int], dtype: str, strict: bool) -> tuple[list[str], list[str]]:
    """The candidates whose values are not finite in the store's dtype, and those whose values are all zero
    (no image gives that: a placeholder row), each in filtered-table order. Every usable row being the same
    is an error: such a store conditions nothing.

    Checked after the cast: a float32 value above 65504 is finite but becomes inf in float16. Finding
    them before the store is opened fixes its row count; with ``strict`` the first one is an error.
    """
    bad: list[int] = []
    zero: list[int] = []
    first_usable: np.ndarray | None = None
    usable, all_same = 0, True
    for file, first, stored, local, positions in _cast_blocks(files, located, candidates, shape, dtype):
        rows = stored[local].reshape(len(local), -1)
        del stored
        finite = np.isfinite(rows).all(axis=1)
        empty = finite & ~rows.any(axis=1)
        if strict and not (finite & ~empty).all():
            at = int(np.flatnonzero(~finite | empty)[0])
            row, name = first + local[at], candidates[positions[at]]
            if not finite[at]:
                overflow = " (float16 holds up to 65504; elixr.dtype: float32 keeps more)" if dtype == "float16" else ""
                raise DataError(f"{file.path}: row {row} ({name}) has NaN or infinite values in {dtype}{overflow}; "
                                f"fix the file or set elixr.on_missing: drop")
            raise DataError(f"{file.path}: row {row} ({name}) is all zeros, a placeholder rather than an embedding; "
                            f"fix the file or set elixr.on_missing: drop")
        bad.extend(positions[~finite].tolist())
        zero.extend(positions[empty].tolist())
        good = rows[finite & ~empty]
        if len(good):
            first_usable = good[0].copy() if first_usable is None else first_usable
            all_same = all_same and bool((good == first_usable).all())
            usable += len(good)
    if usable > 1 and all_same:
        raise DataError(f"{files[0].path}: all {usable} usable embeddings are identical, so they carry nothing about "
                        f"their images; is this a placeholder or a broken export?")
    return [candidates[p] for p in sorted(bad)], [candidates[p] for p in sorted(zero)]


def _write_store(out_dir: Path, files: list[ElixrFile], located: dict[str, tuple[int, int]], kept: list[str],
                 shape: tuple[int, int], dtype: str, meta: dict) -> None:
    """Copy the embeddings of ``kept`` (all finite in ``dtype``) into store rows 0..len(kept)-1 at ``out_dir``."""
    with ConditionStoreWriter(out_dir, len(kept), *shape, dtype=dtype) as writer:
        for file, first, stored, local, positions in _cast_blocks(files, located, kept, shape, dtype):
            if not _finite_rows(stored)[local].all():
                raise DataError(f"{file.path}: rows from {first} on changed since they were checked (now NaN or "
                                f"infinite in {dtype}); is something writing to it? Rerun once it is complete")
            _write_runs(writer, stored, local, positions)
            del stored
        writer.finish(kept, np.arange(len(kept)), meta)


def _check_disk_space(out_dir: Path, store_bytes: int) -> None:
    """Refuse a store the disk cannot hold before writing any of it (a bound on the declared shapes)."""
    folder = Path(out_dir).resolve().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if store_bytes > free:
        raise DataError(f"{out_dir}: the store needs {store_bytes / 2**30:.1f} GiB but {folder} has "
                        f"{free / 2**30:.1f} GiB free; free space or write it elsewhere")


def _write_runs(writer: ConditionStoreWriter, block: np.ndarray, local: np.ndarray, rows_out: np.ndarray) -> None:
    """Write rows that are consecutive in both the block and the store as one slice each."""
    if len(local) == 0:
        return
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(rows_out) != 1)) + 1
    for run_in, run_out in zip(np.split(local, breaks), np.split(rows_out, breaks)):
        writer.write(int(run_out[0]), block[run_in[0]:run_in[-1] + 1])



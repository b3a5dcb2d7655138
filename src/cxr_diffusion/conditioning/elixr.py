"""ELIXR embeddings -> condition store: join the published files to the filtered table by image id.

The files themselves (the published snapshot with its ``datasets.json``, older HDF5 shards, Parquet)
are found, scanned and read by ``conditioning/elixr_files.py``. A full NIH set is GBs of float32, so
nothing here holds it at once: ids are scanned first (they are small), then embeddings are copied
chunk by chunk into the condition store, cast to its dtype and checked for finiteness in that pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.conditioning.elixr_files import (ID_COLUMN, ElixrFile, find_elixr_files,  # noqa: F401
                                                    iter_embedding_blocks, normalize_image_id, scan_elixr_source,
                                                    write_elixr_hdf5_shard)
from cxr_diffusion.conditioning.store import ConditionStoreWriter
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.io import write_csv, write_json

# find_elixr_files, normalize_image_id and write_elixr_hdf5_shard are re-exported: tests and
# benchmarks/elixr_memory.py import them from here.
CHUNK_ROWS = 1024  # rows read at once: 1024 x 32 x 768 float32 is ~100 MB, well under the 2 GB budget
CHUNK_BYTES = 128 << 20  # and at most this much float32 per block (ELIXR-C rows are 64 x 1376: 381 rows)
REJECT_REASONS: tuple[str, ...] = ("missing_embedding", "non_finite")
MAX_IDS_IN_MESSAGE = 5  # an error lists this many example ids, then the count


def build_elixr_store(filtered_csv: Path, config: ElixrConfig, out_dir: Path, rejects_csv: Path,
                      metrics_path: Path | None, source_label: str) -> dict:
    """Join the filtered table to the ELIXR files by image id and write a condition store at ``out_dir``.

    One store row per kept image, in the order of the filtered table. Images without an embedding or
    with non-finite values are dropped (listed in ``rejects_csv``) or, with ``on_missing: error``, fail
    the stage. Returns the metrics, also written to ``metrics_path`` when given.
    """
    if config.path is None:
        raise DataError("elixr.path is null: set it to the ELIXR snapshot root (or use the stand-in stage)")
    names = _read_filtered_names(Path(filtered_csv))
    expected = tuple(config.shape) if config.shape is not None else None
    source = scan_elixr_source(config)
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
               "files": len(files), "shape": list(shape) if shape else None, "source": source_label, **what}
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
    try:
        columns = list(pd.read_csv(path, nrows=0).columns)
        if ID_COLUMN not in columns:
            raise DataError(f"{path}: no '{ID_COLUMN}' column (found {columns}); pass the filter stage's output")
        names = pd.read_csv(path, usecols=[ID_COLUMN], dtype=str, keep_default_na=False)[ID_COLUMN]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV file ({' '.join(str(error).split())}); rerun the filter "
                        f"stage") from None
    if names.empty:
        raise DataError(f"{path}: no images (0 rows); nothing to embed. Check that the filter stage keeps images "
                        f"(filter.* params) and rerun it")
    seen: dict[str, int] = {}
    for row, name in enumerate(names):
        if not name.strip():
            raise DataError(f"{path}: row {row + 2} has an empty '{ID_COLUMN}'")
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

    Returns the candidates whose values are not finite in the store's dtype (float16 overflows above
    65504); when there are any, no store is written (its row count was fixed before they were seen)
    and the caller retries without them.
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
    """Stream each file's wanted rows, cast to the store's dtype, into store rows 0..len(kept)-1;
    return the names whose cast values are not finite.

    After the first non-finite row nothing more is written (that store is discarded) but the scan
    goes on, so one retry drops them all.
    """
    plan: dict[int, list[tuple[int, int]]] = {}  # file number -> [(source row, store row)]
    for store_row, name in enumerate(kept):
        number, row = located[normalize_image_id(name)]
        plan.setdefault(number, []).append((row, store_row))
    bad: list[tuple[int, str]] = []
    chunk_rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (shape[0] * shape[1] * 4)))
    for number, pairs in sorted(plan.items()):
        pairs.sort()
        source = np.array([p[0] for p in pairs], dtype=np.int64)
        target = np.array([p[1] for p in pairs], dtype=np.int64)
        for first, block in iter_embedding_blocks(files[number], shape, source, chunk_rows):
            inside = (source >= first) & (source < first + len(block))
            local, rows_out = source[inside] - first, target[inside]
            # Checked after the cast: a float32 value above 65504 is finite but becomes inf in float16.
            with np.errstate(over="ignore"):
                stored = block.astype(writer.dtype, copy=False)
            del block
            finite = np.isfinite(stored.reshape(len(stored), -1)).all(axis=1)[local]
            for row_in, row_out in zip(local[~finite], rows_out[~finite]):
                if strict:
                    overflow = " (float16 holds up to 65504; elixr.dtype: float32 keeps more)" \
                        if writer.dtype == "float16" else ""
                    raise DataError(f"{files[number].path}: row {first + row_in} ({kept[row_out]}) has NaN or "
                                    f"infinite values in {writer.dtype}{overflow}; fix the file or set "
                                    f"elixr.on_missing: drop")
                bad.append((int(row_out), kept[row_out]))
            if not bad:
                _write_runs(writer, stored, local, rows_out)
            del stored
    return [name for _, name in sorted(bad)]


def _write_runs(writer: ConditionStoreWriter, block: np.ndarray, local: np.ndarray, rows_out: np.ndarray) -> None:
    """Write rows that are consecutive in both the block and the store as one slice each."""
    if len(local) == 0:
        return
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(rows_out) != 1)) + 1
    for run_in, run_out in zip(np.split(local, breaks), np.split(rows_out, breaks)):
        writer.write(int(run_out[0]), block[run_in[0]:run_in[-1] + 1])



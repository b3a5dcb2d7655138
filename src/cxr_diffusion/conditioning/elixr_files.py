"""Where the ELIXR embeddings behind ``elixr.path`` are: the published snapshot (through its ``datasets.json``),
or a folder or file of HDF5 shards and Parquet files; each file scanned by its format's reader, and read
block by block. The formats themselves are described in ``elixr_format``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_diffusion.conditioning.elixr_format import (HDF5_EMBEDDINGS, HDF5_IDS, HDF5_SUFFIXES, ID_COLUMN,
                                                     PARQUET_EMBEDDING_COLUMNS, PARQUET_SUFFIXES, SNAPSHOT_INDEX,
                                                     ElixrFile, check_inside, damaged_file_errors, shard_sort_key)
from cxr_diffusion.conditioning.elixr_hdf5 import hdf5_blocks, scan_hdf5
from cxr_diffusion.conditioning.elixr_index import read_snapshot_index, select_feature
from cxr_diffusion.conditioning.elixr_parquet import parquet_blocks, scan_parquet
from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.data.nih import DataError


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
        files = [scan_hdf5(p, expected, config.feature, declared=spec.shape, dataset=config.dataset)
                 for p in find_snapshot_shards(root, config.dataset)]
        return ElixrSource(files, "snapshot", config.dataset, config.feature, info)
    if root.is_dir() and (root / config.dataset).is_dir():
        # A snapshot without its datasets.json (e.g. a partial download): the dataset folder is still known.
        files = [scan_hdf5(p, expected, config.feature, declared=None, dataset=config.dataset)
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
        check_inside(file, path, "the ELIXR folder", "copy the file itself into the folder")
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
        check_inside(shard, root, "the snapshot", "copy the shard itself into the snapshot")
    if not shards:
        raise DataError(f"{folder}: no HDF5 shards ({', '.join(HDF5_SUFFIXES)}) for dataset '{dataset}'; "
                        f"is the download complete?")
    return shards


def scan_elixr_file(path: Path, expected: tuple[int, int] | None, feature: str | None = None) -> ElixrFile:
    """Read a file's ids and embedding shape (not its embeddings); the shape must match ``expected`` if set.

    An HDF5 file in the older layout uses ``embeddings``; otherwise ``Image Index`` and ``feature``.
    """
    if path.suffix.lower() in HDF5_SUFFIXES:
        return scan_hdf5(path, expected, feature, declared=None, dataset=None)
    with damaged_file_errors(path, "Parquet"):
        return scan_parquet(path, expected)


def iter_embedding_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                          chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)`` float32 blocks of at most ``chunk_rows`` rows covering ``rows``.

    Blocks that contain none of ``rows`` are never read.
    """
    reader = hdf5_blocks if file.is_hdf5 else parquet_blocks
    with damaged_file_errors(file.path, "HDF5" if file.is_hdf5 else "Parquet"):
        yield from reader(file, shape, np.asarray(rows, dtype=np.int64), chunk_rows)

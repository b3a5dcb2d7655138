"""HDF5 shards (the snapshot's and the older layout's): their ids and row shape at scan time, then their
embeddings block by block, with nothing read from outside the file and nothing allocated past the bounds."""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from cxr_diffusion.assets.standin_marker import standin_attribute
from cxr_diffusion.conditioning.elixr_format import (HDF5_EMBEDDINGS, HDF5_IDS, ID_COLUMN, MAX_CHUNK_BYTES,
                                                     MAX_ID_BYTES, MAX_ID_COLUMN_BYTES, MAX_ROWS, SNAPSHOT_INDEX,
                                                     ElixrFile, check_regular_file, check_unchanged, checked_shape,
                                                     damaged_file_errors, file_identity, normalized_id)
from cxr_diffusion.conditioning.elixr_index import refuse_text
from cxr_diffusion.data.nih import DataError


@contextmanager
def _open_hdf5(path: Path, scanned: tuple[int, ...] | None = None) -> Iterator[tuple[h5py.File, tuple[int, ...]]]:
    """The file, read through one descriptor opened without blocking (a FIFO swapped in after the check is
    refused, not waited on), and that descriptor's identity (``file_identity``); refused when that is not
    ``scanned``, the file as its scan checked it. Both are closed on leaving."""
    check_regular_file(path, "HDF5")
    with io.FileIO(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "r") as stream:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            raise DataError(f"{path}: not a plain file (it changed after it was checked); point elixr.path at the "
                            "downloaded files")
        check_unchanged(path, scanned, stream.fileno())
        try:
            handle = h5py.File(stream, "r")
        except OSError as error:
            raise DataError(f"{path}: not a readable HDF5 file ({error})") from error
        with handle:
            yield handle, file_identity(stream.fileno())


def _hdf5_datasets(handle: h5py.File) -> list[str]:
    found: list[str] = []
    handle.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
    return found


def scan_hdf5(path: Path, expected: tuple[int, int] | None, feature: str | None,
               declared: tuple[int, ...] | None, dataset: str | None) -> ElixrFile:
    """Ids and (tokens, dim) of one shard; a shard of snapshot ``dataset`` must hold ``Image Index`` + ``feature``."""
    snapshot = dataset is not None
    with damaged_file_errors(path, "HDF5"), _open_hdf5(path) as (handle, identity):
        def has(name: str | None) -> bool:  # links are looked at before a name is resolved (which opens them)
            return name is not None and _stored_here(path, handle, name) and isinstance(handle.get(name), h5py.Dataset)

        if not snapshot and has(HDF5_EMBEDDINGS) and has(HDF5_IDS):
            column, id_column = HDF5_EMBEDDINGS, HDF5_IDS
        elif has(ID_COLUMN) and has(feature) and feature != ID_COLUMN:
            refuse_text(f"{path}: elixr.feature '{feature}'", dataset or "", feature,
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
        values, ids = handle[column], handle[id_column]
        if ids.shape not in ((values.shape[0],), (values.shape[0], 1)):  # checked before the ids are read
            raise DataError(f"{path}: '{id_column}' has shape {ids.shape} but '{column}' has shape "
                            f"{values.shape}; each embedding row needs one id")
        raw_ids = _read_ids(path, ids, id_column)
        row = _declared_row(path, column, tuple(values.shape[1:]), declared)
        shape = checked_shape(path, f"dataset '{column}'", row, expected, flat_is_one_token=column != HDF5_EMBEDDINGS)
        image_ids = tuple(normalized_id(path, number, value) for number, value in enumerate(raw_ids))
        standin = standin_attribute(handle.attrs, path)
    return ElixrFile(path, image_ids, shape, column, standin, identity)


ID_READ_BYTES = 16 << 20  # ids held at once while variable-length ids are read


def _read_ids(path: Path, ids: h5py.Dataset, name: str) -> list:
    """Every id of the column, bounded as it is read. Fixed-width ids were bounded from the dtype. Each
    variable-length id is a pointer to an object in the file, and any number of rows may point at one large
    object (a file of under 1 MB can ask for terabytes), so they are read a block of rows at a time, so many
    that even rows that all point at an object of the file's size fit ``ID_READ_BYTES``, each id checked."""
    if ids.dtype.kind in "SU":
        return list(ids[()].reshape(-1))
    if h5py.check_string_dtype(ids.dtype) is None:  # variable-length numbers or arrays: no ids, and unbounded
        raise DataError(f"{path}: '{name}' holds variable-length {ids.dtype.metadata or 'objects'}, not text; "
                        f"expected image ids such as 00000001_000 (download the snapshot again)")
    rows = ids.shape[0]
    block = max(1, min(4096, ID_READ_BYTES // max(path.stat().st_size, 1)))
    values, total = [], 0
    for start in range(0, rows, block):
        for offset, value in enumerate(ids[start:start + block].reshape(-1)):
            size = len(value) if isinstance(value, (bytes, str)) else 0
            if size > MAX_ID_BYTES:
                raise DataError(f"{path}: '{name}' row {start + offset:,} is {size:,} bytes, more than "
                                f"{MAX_ID_BYTES} (an NIH id is 16); is this an ELIXR shard?")
            total += size
            if total > MAX_ID_COLUMN_BYTES:
                raise DataError(f"{path}: '{name}' takes more than {MAX_ID_COLUMN_BYTES >> 20} MB (all 112,120 "
                                f"NIH ids take 1.8 MB); is this an ELIXR shard?")
            values.append(value)
    return values


def _check_stored_in_file(path: Path, handle: h5py.File, name: str, kinds: str, what: str) -> None:
    """``name`` must be a dataset stored in this file, written, of a dtype kind in ``kinds``.

    HDF5 can make a dataset read from elsewhere: an external link (another file), external raw storage
    (any file, e.g. /etc/passwd read as floats) or a virtual dataset (a map over other files). A snapshot
    shard holds its data itself, so each is refused; so is a dataset never written (HDF5 answers its fill
    value for every row) and one of another dtype (ints, bools, complex or strings would be cast silently).
    """
    if not _stored_here(path, handle, name):
        raise DataError(f"{path}: no dataset '{name}'; is this an ELIXR shard?")
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
    if dataset.dtype.kind in "SU" and math.prod(dataset.shape) * dataset.dtype.itemsize > MAX_ID_COLUMN_BYTES:
        raise DataError(f"{path}: '{name}' holds {math.prod(dataset.shape) * dataset.dtype.itemsize:,} bytes of ids, more "
                        f"than {MAX_ID_COLUMN_BYTES >> 20} MB (all 112,120 NIH ids take 1.8 MB); is this an ELIXR shard?")
    chunk = math.prod(dataset.chunks) * dataset.dtype.itemsize if dataset.chunks else 0
    if chunk > MAX_CHUNK_BYTES:
        raise DataError(f"{path}: '{name}' is stored in chunks of {chunk:,} bytes (shape {dataset.chunks}), more "
                        f"than {MAX_CHUNK_BYTES >> 20} MB, each decompressed whole on every read; is this an ELIXR "
                        f"shard?")


def _stored_here(path: Path, handle: h5py.File, name: str) -> bool:
    """Whether ``name`` exists, reached through hard links only; a soft or external link on the way is refused
    without being followed (h5py follows an external link by opening its target: another file, or a FIFO that
    would hang the stage)."""
    parts = name.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        link = handle.get("/".join(parts[:depth]), getlink=True)
        if link is None:
            return False
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise DataError(f"{path}: '{name}' is {kind}; a shard must hold its data itself (download it again)")
    return True


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


def hdf5_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                 chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    with _open_hdf5(file.path, file.identity) as (handle, _):
        dataset = handle[file.column]
        for first in np.unique(rows // chunk_rows) * chunk_rows:
            block = dataset[int(first):int(first) + chunk_rows]
            yield int(first), np.asarray(block, dtype=np.float32).reshape(len(block), *shape)

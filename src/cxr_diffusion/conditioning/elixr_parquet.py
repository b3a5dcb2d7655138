"""Parquet files of embeddings: their ids and row shape at scan time, bounded from the footer before a row
is decoded, then their embeddings batch by batch, every row's length checked."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_diffusion.conditioning.elixr_format import (ID_COLUMN, MAX_DIM, MAX_ID_BYTES, MAX_ID_COLUMN_BYTES,
                                                     MAX_ROWS, MAX_SIZE, MAX_TOKENS, PARQUET_EMBEDDING_COLUMNS,
                                                     ElixrFile, check_regular_file, check_unchanged, checked_shape,
                                                     file_identity, normalized_id)
from cxr_diffusion.data.nih import DataError


def _open_parquet(path: Path, scanned: tuple[int, ...] | None,
                  read_dictionary: list[str] | None = None) -> tuple[pq.ParquetFile, tuple[int, ...]]:
    """The file, read through the one descriptor whose identity is returned (``file_identity``); refused when
    that is not ``scanned`` (the file as its scan checked it)."""
    check_regular_file(path, "Parquet")
    # Non-blocking: a FIFO swapped in after the check reads as empty instead of waiting for a writer. pyarrow
    # reads from the stream lazily and keeps it alive.
    stream = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    try:
        check_unchanged(path, scanned, stream.fileno())
        return pq.ParquetFile(stream, read_dictionary=read_dictionary), file_identity(stream.fileno())
    except (pa.ArrowException, OSError) as error:
        stream.close()
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    except DataError:
        stream.close()
        raise


def scan_parquet(path: Path, expected: tuple[int, int] | None) -> ElixrFile:
    parquet, identity = _open_parquet(path, None)
    columns = parquet.schema_arrow.names
    found = [c for c in columns if c in PARQUET_EMBEDDING_COLUMNS]  # a name twice is two columns: which is meant?
    if columns.count(ID_COLUMN) != 1 or len(found) != 1:
        raise DataError(f"{path}: expected columns '{ID_COLUMN}' and exactly one of "
                        f"{list(PARQUET_EMBEDDING_COLUMNS)}, found {columns}")
    column = found[0]
    _check_parquet_footer(path, parquet)
    _check_declared_values(path, parquet.metadata, column, math.prod(expected) if expected else MAX_SIZE)
    raw_ids = _read_parquet_ids(path, identity)
    image_ids = tuple(normalized_id(path, row, value) for row, value in enumerate(raw_ids))
    shape = None
    if raw_ids:
        first = next(parquet.iter_batches(batch_size=1, columns=[column])).column(0)
        shape = checked_shape(path, f"column '{column}'", _list_shape(path, column, first), expected)
        if expected is None:  # now the row size is known: no later row may be larger
            _check_declared_values(path, parquet.metadata, column, math.prod(shape))
    elif expected is not None:
        shape = expected
    return ElixrFile(path, image_ids, shape, column, identity=identity)


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


def _read_parquet_ids(path: Path, scanned: tuple[int, ...]) -> list:
    """The id column as Python values, after checking each id's width and their total size as HDF5's are.

    The column is read dictionary-encoded, as it is stored: one wide id repeated over every row costs its
    width once, not once per row, until the checks have passed.
    """
    ids = _open_parquet(path, scanned, read_dictionary=[ID_COLUMN])[0].read(columns=[ID_COLUMN]).column(0)
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


def parquet_blocks(file: ElixrFile, shape: tuple[int, int], rows: np.ndarray,
                    chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    parquet = _open_parquet(file.path, file.identity)[0]
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

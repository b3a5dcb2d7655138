"""The shared vocabulary of the published ELIXR file formats: names, bounds, the scanned-file record and the
checks every reader applies (regular files inside the snapshot, row shapes, image ids, damaged files).

Three layouts are read (``elixr_files`` finds them, ``elixr_index``, ``elixr_hdf5`` and ``elixr_parquet`` read them):
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
and ELIXR-C ``Embedding`` [1, 8, 8, 1376] is 64 tokens of 1376. Only ids and shapes are read at scan
time; embeddings are read block by block (``iter_embedding_blocks``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cxr_diffusion.data.nih import DataError
from cxr_diffusion.io import lies_inside, require_regular_file

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
    identity: tuple[int, ...] | None = None  # the file as scanned (``file_identity``); it is read only while the same

    @property
    def is_hdf5(self) -> bool:
        return self.path.suffix.lower() in HDF5_SUFFIXES



def check_inside(path: Path, root: Path, where: str, fix: str) -> None:
    """``path``, links followed, must lie in ``root`` (or its Hugging Face cache's ``blobs/``).

    A link may point anywhere (another user's files, a private export): what elixr.path names is the
    only place a run may read, so a file reached through a link out of it is refused before it is opened.
    """
    if not lies_inside(path, root):
        raise DataError(f"{path}: lies outside {where} at {root} (it links to {path.resolve()}); {fix}")



@contextlib.contextmanager
def damaged_file_errors(path: Path, kind: str) -> Iterator[None]:
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



def check_regular_file(path: Path, kind: str) -> None:
    """Refuse a FIFO, device or folder under a shard's name unopened: opening a FIFO waits forever for a writer."""
    try:
        require_regular_file(path, DataError, f"an ELIXR shard is a plain {kind} file: point elixr.path at the "
                                              f"downloaded files")
    except OSError as error:
        raise DataError(f"{path}: not a readable {kind} file ({error})") from error


def file_identity(descriptor: int) -> tuple[int, ...]:
    """The open file's device, inode, size, modification time and status-change time: a shard replaced or
    written to after it was scanned has another (a writer can set the modification time back, not the
    status-change time)."""
    status = os.fstat(descriptor)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def check_unchanged(path: Path, scanned: tuple[int, ...] | None, descriptor: int) -> None:
    """Refuse to read a shard that is no longer the file its scan checked (bounds, links, external storage): a
    file swapped in between would be read with none of those checks."""
    if scanned is not None and file_identity(descriptor) != scanned:
        raise DataError(f"{path}: changed since it was scanned (replaced or written to while the stage ran); "
                        "rerun `dvc repro embed_elixr` once the snapshot is complete")


def checked_shape(path: Path, what: str, found: tuple[int, ...], expected: tuple[int, int] | None,
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


def normalized_id(path: Path, row: int, value: object) -> str:
    if not isinstance(value, (str, bytes)):
        raise DataError(f"{path}: row {row} has image id {value!r}; expected a string such as 00000001_000")
    try:
        return normalize_image_id(value)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: row {row}: image id is not UTF-8 ({error})") from error
    except DataError as error:
        raise DataError(f"{path}: row {row}: {error}") from error

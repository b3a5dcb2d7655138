"""One on-disk format for every branch's conditions, keyed by Image Index and read lazily.

A store is a directory:
``embeddings.npy``  (K, tokens, dim) float16 (default) or float32, read row by row
``mask.npy``        (K, tokens) bool, True where a token is real (text padding is False)
``index.csv``       Image Index -> row of ``embeddings.npy`` (several images may share a row,
                    e.g. every image with the same prompt)
``store.json``      branch, shape, dtype, encoder and anything the producer wants to record

``.npy`` is read with ``allow_pickle=False``; nothing executable is ever loaded. Rows are
written and read with positional file I/O rather than a memory map: pages of a long-lived mapping
count toward the process's resident memory, so one pass over a 48k x 32 x 768 store would add
2.3 GB of RSS; ``pread`` keeps it at one row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import (JsonFileError, atomic_directory, read_json, require_regular_file, sha256_file, write_csv,
                              write_json)
from cxr_diffusion.npy_header import read_npy_header
from cxr_diffusion.safe_text import shown_value, visible_text

EMBEDDINGS, MASK, INDEX, META = "embeddings.npy", "mask.npy", "index.csv", "store.json"


# index.csv is read whole: bound it before reading. NIH ChestX-ray14 has 112,120 images (MIMIC-CXR 377,110), an
# index line is an image id and a row number: 2.7 MB for all of NIH.
MAX_INDEX_ROWS, MAX_INDEX_LINE_BYTES = 2_000_000, 64
MAX_INDEX_BYTES = MAX_INDEX_ROWS * MAX_INDEX_LINE_BYTES
# A condition row: CLIP-L's text gives 77 x 768, ELIXR 32 x 768; the ELIXR reader takes at most 1024 x 8192.
MAX_STORE_TOKENS, MAX_STORE_DIM = 1024, 8192


class StoreError(UserError, ValueError):
    """A condition store is missing, malformed or does not match what its reader expects."""


class ConditionStoreWriter:
    """Fill a new store row by row (or block by block) without holding it in memory.

    Use as a context manager; the store appears at ``path`` only when the block succeeds.
    """

    def __init__(self, path: str | Path, rows: int, tokens: int, dim: int, dtype: str = "float16"):
        if dtype not in ("float16", "float32"):
            raise StoreError(f"condition store dtype must be float16 or float32, not {dtype!r}")
        self.path, self.shape, self.dtype = Path(path), (rows, tokens, dim), dtype
        self._context = atomic_directory(self.path)
        self.meta: dict = {}

    def __enter__(self) -> "ConditionStoreWriter":
        self._tmp = self._context.__enter__()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)), "fortran_order": False,
                  "shape": self.shape}
        self._file = open(self._tmp / EMBEDDINGS, "wb+")
        np.lib.format.write_array_header_1_0(self._file, header)
        self._offset = self._file.tell()
        self._row_bytes = int(np.prod(self.shape[1:])) * np.dtype(self.dtype).itemsize
        self._file.truncate(self._offset + self.shape[0] * self._row_bytes)
        self.mask = np.ones(self.shape[:2], dtype=bool)
        return self

    def write(self, start: int, embeddings: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None) -> None:
        values = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
        if values.shape[1:] != self.shape[1:]:
            raise StoreError(f"embedding block has shape {values.shape[1:]}, the store holds {self.shape[1:]}")
        stored = np.ascontiguousarray(values, dtype=self.dtype)  # checked as stored: 1e5 is inf in float16
        if not np.isfinite(stored).all():
            raise StoreError(f"non-finite values in rows {start}..{start + len(values) - 1} as {stored.dtype.name} "
                             f"(NaN, infinite, or beyond its range)")
        if start < 0 or start + len(values) > self.shape[0]:
            raise StoreError(f"rows {start}..{start + len(values) - 1} are outside the store's {self.shape[0]} rows")
        os.pwrite(self._file.fileno(), stored.tobytes(), self._offset + start * self._row_bytes)
        if mask is not None:
            self.mask[start:start + len(values)] = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)

    def sidecar(self, name: str) -> Path:
        """Path for an extra file that should live in (and appear atomically with) the store."""
        return self._tmp / name

    def finish(self, image_index: list[str], rows: list[int] | np.ndarray, meta: dict) -> None:
        """Record which row each image uses, and the metadata; call once, inside the block."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(image_index) != len(rows):
            raise StoreError("image_index and rows differ in length")
        if len(set(image_index)) != len(image_index):
            raise StoreError("duplicate Image Index in a condition store")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise StoreError("a row number points outside the embeddings")
        self._file.flush()
        np.save(self._tmp / MASK, self.mask, allow_pickle=False)
        write_csv(self._tmp / INDEX, pd.DataFrame({"Image Index": image_index, "row": rows}))
        write_json(self._tmp / META, {**meta, "shape": list(self.shape), "dtype": self.dtype,
                                      "images": len(image_index)})
        self._finished = True

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            self._file.close()
        except OSError as close_error:  # e.g. the disk filled while flushing: discard the store, keep the error
            if kind is None:
                self._context.__exit__(type(close_error), close_error, close_error.__traceback__)
                raise
        if kind is None and not getattr(self, "_finished", False):
            kind, error = StoreError, StoreError("ConditionStoreWriter closed without finish()")
            self._context.__exit__(kind, error, None)
            raise error
        return bool(self._context.__exit__(kind, error, traceback))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@dataclass(frozen=True)
class Condition:
    embeddings: torch.Tensor  # (tokens, dim) float32
    mask: torch.Tensor        # (tokens,) bool


class ConditionStore:
    """Read-only access to a store, one row read at a time: ``store["00000001_000.png"]`` -> Condition.

    Picklable (DataLoader workers reopen the file lazily). Opening checks the four files against each
    other (header, size, dtype, every index row) so a damaged store fails here, naming the file and
    line, instead of reading the wrong bytes later."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for name in (EMBEDDINGS, MASK, INDEX, META):
            if not (self.path / name).exists():
                raise StoreError(f"{self.path}: not a condition store ({name} missing); rerun its embed stage")
            require_regular_file(self.path / name, StoreError, "a condition store holds plain files; rerun its embed "
                                                               "stage")
        self.shape, self.dtype, self._offset = self._read_embeddings_header()
        self._row_bytes = int(self.shape[1] * self.shape[2]) * self.dtype.itemsize
        expected_size = self._offset + self.shape[0] * self._row_bytes
        if (self.path / EMBEDDINGS).stat().st_size != expected_size:
            raise StoreError(f"{self.path / EMBEDDINGS}: truncated or padded; rerun its embed stage")
        self.meta = self._read_meta()
        self.row_of: dict[str, int] = self._read_index()
        if self.meta["images"] != len(self.row_of):
            raise StoreError(f"{self.path / INDEX} lists {len(self.row_of)} images but {META} records "
                             f"{self.meta['images']}; rerun its embed stage")
        if not self.row_of:
            raise StoreError(f"{self.path}: the condition store holds no images; check that the filter and prepare "
                             f"stages kept some, then rerun its embed stage")
        if self.shape[0] > len(self.row_of):  # every row is some image's (shared prompts share one): read_all reads all
            raise StoreError(f"{self.path / EMBEDDINGS}: {self.shape[0]:,} rows for the {len(self.row_of):,} images "
                             f"{INDEX} lists; rerun its embed stage")
        self.mask = self._read_mask()  # after the row bound: np.load allocates the (rows, tokens) it declares
        self._fd: int | None = None

    def _read_embeddings_header(self) -> tuple[tuple[int, int, int], np.dtype, int]:
        path = self.path / EMBEDDINGS
        try:
            header = read_npy_header(path)
        except (ValueError, EOFError) as error:  # numpy's messages for a bad magic or header
            raise StoreError(f"{path}: not a readable .npy file ({_one_line(error)}); rerun its embed stage") from None
        shape, dtype = header.shape, header.dtype
        if header.fortran_order or len(shape) != 3 or dtype not in (np.float16, np.float32):
            raise StoreError(f"{path}: expected a C-order (rows, tokens, dim) float16/float32 array")
        if shape[1] > MAX_STORE_TOKENS or shape[2] > MAX_STORE_DIM:  # a row is read whole, for every image
            raise StoreError(f"{path}: rows of {shape[1]:,} tokens of {shape[2]:,} values, more than any encoder gives "
                             f"(at most {MAX_STORE_TOKENS} x {MAX_STORE_DIM}); rerun its embed stage")
        return shape, dtype, header.offset

    def _read_meta(self) -> dict:
        path = self.path / META
        try:
            meta = read_json(path, "rerun its embed stage", kind=object)
        except JsonFileError as error:  # bad bytes, syntax, nesting or a huge integer
            raise StoreError(str(error)) from None
        reason = f"found {type(meta).__name__}"
        if not isinstance(meta, dict):
            raise StoreError(f"{path}: not a readable JSON object ({reason}); rerun its embed stage")
        missing = [key for key in ("shape", "dtype", "images") if key not in meta]
        if missing:
            raise StoreError(f"{path}: missing key(s) {missing}; rerun its embed stage")
        if meta["shape"] != list(self.shape) or meta["dtype"] != self.dtype.name:
            raise StoreError(f"{path} records shape {meta['shape']} and dtype {meta['dtype']} but {EMBEDDINGS} "
                             f"holds {list(self.shape)} {self.dtype.name}; rerun its embed stage")
        if not isinstance(meta["images"], int) or isinstance(meta["images"], bool) or meta["images"] < 0:
            raise StoreError(f"{path}: 'images' is {meta['images']!r}, expected a count; rerun its embed stage")
        return meta

    def _read_mask(self) -> np.ndarray:
        path = self.path / MASK
        try:  # the header first: np.load allocates whatever shape it declares
            declared = read_npy_header(path).shape
        except (ValueError, EOFError, OSError) as error:
            raise StoreError(f"{path}: not a readable .npy file ({_one_line(error)}); rerun its embed stage") from None
        if declared != self.shape[:2]:
            raise StoreError(f"{path}: a mask of shape {declared} for embeddings of shape {self.shape}; they disagree: "
                             f"rerun its embed stage")
        try:
            mask = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as error:  # truncated, not .npy, or an object array (pickle)
            raise StoreError(f"{path}: not a readable .npy file ({_one_line(error)}); rerun its embed stage") from None
        if mask.dtype != bool:
            raise StoreError(f"{path}: holds {mask.dtype}, expected bool; rerun its embed stage")
        if mask.shape != self.shape[:2]:
            raise StoreError(f"{self.path}: embeddings {self.shape} and mask {mask.shape} disagree; rerun its embed stage")
        return mask

    def _read_index(self) -> dict[str, int]:
        """Image Index -> row, every row checked: a row outside the embeddings would read header bytes."""
        path = self.path / INDEX
        size = path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise StoreError(f"{path}: {size:,} bytes, more than the {MAX_INDEX_BYTES:,} an index of "
                             f"{MAX_INDEX_ROWS:,} images can take; rerun its embed stage")
        try:
            index = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as error:  # EmptyDataError and UnicodeDecodeError are ValueErrors
            raise StoreError(f"{path}: not a readable CSV file ({_one_line(error)}); rerun its embed stage") from None
        if list(index.columns) != ["Image Index", "row"]:
            raise StoreError(f"{path}: expected columns ['Image Index', 'row'], found {list(index.columns)}; "
                             f"rerun its embed stage")
        rows = self.shape[0]
        row_of: dict[str, int] = {}
        line_of: dict[str, int] = {}
        for line, (name, value) in enumerate(zip(index["Image Index"], index["row"]), start=2):
            where = f"{path}: line {line} ({name})"
            if not name.strip():
                raise StoreError(f"{path}: line {line} has an empty Image Index; rerun its embed stage")
            if name in line_of:
                raise StoreError(f"{path}: {name!r} is on lines {line_of[name]} and {line}; each image has one "
                                 f"row; rerun its embed stage")
            if not (value.isascii() and value.isdigit() and len(value) <= 12):  # int() also reads 1_0, " 1", Arabic digits
                raise StoreError(f"{where}: row {value!r} is not a whole number; rerun its embed stage")
            row = int(value)
            if not 0 <= row < rows:
                raise StoreError(f"{where}: row {row} is outside the {rows} rows of {EMBEDDINGS}; "
                                 f"rerun its embed stage")
            row_of[name], line_of[name] = row, line
        return row_of

    def check_finite(self, names: Sequence[str], what: str = "condition", fix: str = "rerun its embed stage") -> None:
        """Refuse NaN or infinite values in the rows ``names`` use, naming the first such image, before a run
        reads them: the stages write only finite values, so the store was damaged or edited (a NaN condition
        skips every training step that holds it, or makes the validation loss NaN). Read a block of rows at a
        time."""
        rows = np.unique(np.fromiter((self.row_of[name] for name in names), dtype=np.int64, count=len(names)))
        values = np.memmap(self.path / EMBEDDINGS, dtype=self.dtype, mode="r", offset=self._offset, shape=self.shape)
        block = max(1, (64 << 20) // self._row_bytes)
        try:
            for start in range(0, len(rows), block):
                chunk = rows[start:start + block]
                finite = np.isfinite(values[chunk]).reshape(len(chunk), -1).all(axis=1)
                if not finite.all():
                    row = int(chunk[np.flatnonzero(~finite)[0]])
                    name = next(name for name in names if self.row_of[name] == row)
                    raise StoreError(f"{self.path / EMBEDDINGS}: the {what} of {shown_value(name)} (row {row}) holds NaN "
                                     f"or infinite values; {fix}")
        finally:
            del values

    @property
    def tokens(self) -> int:
        return int(self.shape[1])

    @property
    def dim(self) -> int:
        return int(self.shape[2])

    def row(self, row: int) -> np.ndarray:
        """Row ``row`` of the embeddings as float32 (tokens, dim)."""
        if self._fd is None:
            self._fd = os.open(self.path / EMBEDDINGS, os.O_RDONLY)
        data = os.pread(self._fd, self._row_bytes, self._offset + row * self._row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:]).astype(np.float32)

    def read_all(self, block_bytes: int = 64 * 2**20) -> torch.Tensor:
        """Every row of the embeddings in the stored dtype (rows, tokens, dim), read in large contiguous
        blocks: for a trainer that holds a whole store in memory instead of reading row by row."""
        values = np.empty(self.shape, dtype=self.dtype)
        flat = values.reshape(-1).view(np.uint8)
        total, done = flat.nbytes, 0
        with open(self.path / EMBEDDINGS, "rb", buffering=0) as handle:
            while done < total:
                count = os.preadv(handle.fileno(), [memoryview(flat[done:done + block_bytes])], self._offset + done)
                if count <= 0:
                    raise StoreError(f"{self.path / EMBEDDINGS}: ended early while reading; rerun its embed stage")
                done += count
        return torch.from_numpy(values)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, image_index: str) -> bool:
        return image_index in self.row_of

    def __getitem__(self, image_index: str) -> Condition:
        try:
            row = self.row_of[image_index]
        except KeyError:
            raise KeyError(f"{self.path}: no condition for {image_index!r}") from None
        return Condition(torch.from_numpy(self.row(row)), torch.from_numpy(self.mask[row].copy()))


def check_store_branch(store: ConditionStore, store_dir: Path, branch: str) -> None:
    """The store holds ``branch``'s conditions (its embed stage records the branch): another branch's store of
    the same shape would train or sample a model on the wrong conditions without an error."""
    if store.meta.get("branch") != branch:
        raise StoreError(f"{store_dir} holds {visible_text(repr(store.meta.get('branch')), 60)} conditions, not "
                         f"{branch}'s; pass data/embeddings/{branch} (the output of embed_{branch})")


def store_digest(store: ConditionStore) -> str:
    """One sha256 of a store's files: what its conditions are, not where they came from (a store rebuilt by a
    retrained CLIP keeps its ``encoder`` path). A training checkpoint records it, so it resumes only on the
    conditions it was trained on."""
    files = [name for name in (META, INDEX, EMBEDDINGS, MASK) if (store.path / name).is_file()]
    return hashlib.sha256(" ".join(f"{name}:{sha256_file(store.path / name)}" for name in files).encode()).hexdigest()

"""Atomic writes and content hashes: a killed stage never leaves an output that a rerun trusts."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd


def _new_beside(target: Path, create: Callable[[Path], None]) -> Path:
    """Make an unused ``.<name>.<random>.tmp`` beside ``target`` with ``create`` and return it.

    ``create`` is a plain ``os.open``/``os.mkdir`` asking for 0o666/0o777, so the kernel applies the umask
    (and any default ACL) exactly as for an ordinary write. ``tempfile`` would give 0600/0700, which
    colleagues sharing a DVC cache or a model folder cannot read; reading the umask to chmod afterwards
    is racy (``os.umask`` must set it to read it, for the whole process).
    """
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(target.parent))


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds.

    The file gets the mode of a plain ``open(target, "w")`` (0o666 less the umask), not tempfile's 0600.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_beside(target, _create_file)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; swap it in only if the block succeeds.

    A previous ``target`` is replaced whole, so readers never see a mix of old and new files. The
    directory gets the mode of a plain ``mkdir`` (0o777 less the umask), not tempfile's 0700.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # from a killed run: never trusted
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = _new_beside(target, lambda path: os.mkdir(path, 0o777))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as sorted, indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return Path(path)


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (no index), atomically, with no cell that a spreadsheet would run.

    A text cell that starts with ``= + - @``, a tab or a carriage return is a formula to Excel, LibreOffice
    and Google Sheets (OWASP "CSV injection"), and our CSVs copy text from the user's metadata: such a
    cell gets a leading ``'``, which spreadsheets show as text. Number columns are left alone (-3 there
    is a number, not a formula), and a cell already starting with ``'`` is not prefixed again, so
    rewriting a CSV read back from here changes nothing. Identifiers never need it: Image Index and
    Patient ID are kept only when they start with a letter or digit (others are listed rejects), so the
    pipeline re-reading its own CSVs sees the same images and patients. Column names are the pipeline's
    own (fixed names and filter.classes) and are written as they are.

    A carriage return inside a cell is written quoted (every cell is then quoted): Python's csv writer
    leaves a lone carriage return bare, and every CSV reader would then split the row in two there.
    """
    safe = frame.copy()
    carriage_return = False
    for position, dtype in enumerate(frame.dtypes):
        if not (pd.api.types.is_object_dtype(dtype) or isinstance(dtype, pd.StringDtype)):
            continue
        column = frame.iloc[:, position].reset_index(drop=True)
        text = column
        if pd.api.types.infer_dtype(column, skipna=True) != "string":  # text and numbers mixed (a bad age
            text = column.where(column.map(lambda value: isinstance(value, str)).astype(bool))  # kept as written)
        cells = text.astype("string[pyarrow]")  # arrow: vectorised, 10x faster than Python str ops
        formula = cells.str.match("[=+@\t\r-]").fillna(False).to_numpy(dtype=bool)
        carriage_return = carriage_return or bool(cells.str.contains("\r", regex=False).fillna(False).any())
        if formula.any():
            values = column.to_numpy(dtype=object, copy=True)
            values[formula] = ["'" + value for value in values[formula]]
            safe.isetitem(position, values)
    with atomic_path(path) as tmp:
        safe.to_csv(tmp, index=False, quoting=csv.QUOTE_ALL if carriage_return else csv.QUOTE_MINIMAL)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()

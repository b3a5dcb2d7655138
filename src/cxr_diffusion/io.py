"""Atomic writes and content hashes: a killed stage never leaves an output that a rerun trusts."""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_diffusion.errors import UserError


def placed_path(target: str | os.PathLike) -> Path:
    """Where the system puts ``target``: its folder with links followed, then its own name (a link there is
    replaced, not what it points to). ``link/../out`` is the folder beside the link's target, as the system
    resolves it, never the folder beside ``link``; ``.`` and ``..`` are the folders they name."""
    text = os.fspath(target)
    text = text.rstrip("/") or text  # "out/" is "out": a link there is replaced too, never what it points to
    folder, name = os.path.split(text)
    _refuse_a_dangling_link(folder)
    if name in ("", ".", ".."):
        return Path(os.path.realpath(target))
    return Path(os.path.realpath(folder or ".")) / name


def _refuse_a_dangling_link(folder: str) -> None:
    """A link on the way to nowhere: ``mkdir -p`` refuses it, and so do we (following it would make folders
    wherever it once pointed)."""
    parts = Path(folder).parts
    for end in range(1, len(parts) + 1):
        prefix = os.path.join(*parts[:end])
        if os.path.islink(prefix) and not os.path.exists(prefix):
            raise FileExistsError(errno.EEXIST, "a link to nothing where a folder belongs", prefix)


def _new_beside(target: Path, create: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Make an unused ``.<name>.<8 hex digits><suffix>`` beside ``target`` with ``create`` and return it.

    ``create`` is a plain ``os.open``/``os.mkdir`` asking for 0o666/0o777, so the kernel applies the umask
    (and any default ACL) exactly as for an ordinary write. ``tempfile`` would give 0600/0700, which
    colleagues sharing a DVC cache or a model folder cannot read; reading the umask to chmod afterwards
    is racy (``os.umask`` must set it to read it, for the whole process).
    """
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(target.parent))


def _ours_beside(target: Path, suffix: str) -> list[Path]:
    """What ``_new_beside(target, ..., suffix)`` made (from a killed run), and nothing else: not a user's
    ``.dataset.my-notes.tmp``, nor a name that only a glob of an unescaped ``[`` or ``*`` would match."""
    made = re.compile(re.escape(f".{target.name}.") + r"[0-9a-f]{8}" + re.escape(suffix))
    return [path for path in target.parent.glob(glob.escape(f".{target.name}.") + "*" + glob.escape(suffix))
            if made.fullmatch(path.name)]


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds.

    The file gets the mode of a plain ``open(target, "w")`` (0o666 less the umask), not tempfile's 0600.
    """
    target = placed_path(target)
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
    target = placed_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _ours_beside(target, ".tmp"):  # from a killed run: never trusted
        _remove(leftover)
    tmp = _new_beside(target, lambda path: os.mkdir(path, 0o777))
    try:
        yield tmp
        if os.path.lexists(target):
            for leftover in _ours_beside(target, ".old"):  # a run killed between the two renames below
                _remove(leftover)
            # The old copy moves to a fresh name of our own (rename replaces the empty placeholder), so no
            # folder we did not make is ever removed, whatever lies beside the target.
            placeholder = (lambda path: os.mkdir(path, 0o700)) if target.is_dir() and not target.is_symlink() \
                else _create_file
            old = _new_beside(target, placeholder, ".old")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a file or a folder of ours; a symlink is removed itself, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class JsonFileError(UserError, ValueError):
    """A JSON file we read is not valid JSON of the expected shape."""


def lies_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, links followed, is inside the folder ``root``. A Hugging Face cache snapshot
    (``.../snapshots/<revision>``) links its files to the repository's ``blobs/``: that counts as inside too."""
    inside = Path(root).resolve()
    allowed = [inside, inside.parent.parent / "blobs"] if inside.parent.name == "snapshots" else [inside]
    return any(place in Path(path).resolve().parents for place in allowed)


MAX_JSON_BYTES = 64 << 20  # the largest JSON the pipeline writes (a manifest, metrics, an answer key) is far below


def require_regular_file(path: str | os.PathLike, error: type[Exception], fix: str) -> os.stat_result:
    """The file's status, after refusing (``error``, one line naming it and ``fix``) a folder, FIFO or device
    under a file's name: opening a FIFO blocks forever waiting for a writer. A missing file raises OSError."""
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise error(f"{path}: not a regular file (a folder, FIFO or device); {fix}")
    return status


def read_json(path: str | os.PathLike, fix: str, kind: type = dict, object_pairs_hook=None,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file the pipeline or a user wrote; anything malformed is one line naming the file and ``fix``.

    Covers what ``json.loads`` raises on hostile input: bad syntax, non-UTF-8 bytes, nesting deep enough
    for a ``RecursionError``, integers past Python's digit limit (a ``ValueError``) and strings that are not
    Unicode text (a lone surrogate escaped as ``\\ud800``); a file larger than ``max_bytes`` is refused before
    it is read (a sparse file of gigabytes costs no disk). ``kind`` is the type the top level must have (an
    object by default); ``object_pairs_hook`` is json's, run in the same parse (a ``ValueError`` it raises is
    reported like bad syntax).
    """
    path = Path(path)
    status = require_regular_file(path, JsonFileError, fix)
    if status.st_size > max_bytes:
        raise JsonFileError(f"{path}: {status.st_size:,} bytes, more than the {max_bytes:,} a JSON file here can be; "
                            f"{fix}")
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).splitlines()[0][:200]
        raise JsonFileError(f"{path}: not valid JSON ({reason}); {fix}") from None
    try:  # JSON may write a lone surrogate ("\ud800"), which is not text: refused here, never passed on
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        raise JsonFileError(f"{path}: holds a string that is not valid Unicode text (lone surrogate "
                            f"U+{ord(error.object[error.start]):04X}); {fix}") from None
    if not isinstance(payload, kind):
        raise JsonFileError(f"{path}: expected a JSON {kind.__name__}, found {type(payload).__name__}; {fix}")
    return payload


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


def plain_file_mode(folder: str | Path) -> int:
    """The permission bits a plain ``open(path, "w")`` gets in ``folder`` (0o666 less the umask, or what a
    default ACL gives), read from a probe file: ``os.umask`` cannot be read without setting it for the whole
    process, which races with every other thread creating files."""
    probe = _new_beside(Path(folder) / "mode-probe", _create_file)  # the same create as every atomic write
    try:
        return stat.S_IMODE(probe.lstat().st_mode)
    finally:
        probe.unlink()


def give_plain_modes(paths: list[Path]) -> None:
    """Give files the mode of a plain write in their folder. The safetensors writer creates its files 0600
    (through a temporary file of its own), which colleagues sharing a DVC cache or a model folder cannot read."""
    modes: dict[Path, int] = {}
    for path in paths:
        folder = path.parent
        if folder not in modes:
            modes[folder] = plain_file_mode(folder)
        os.chmod(path, modes[folder])

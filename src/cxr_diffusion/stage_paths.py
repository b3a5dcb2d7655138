"""A stage's paths, checked before it reads or writes anything: no output may be, hold or lie inside an input,
and each output must be able to become what the stage writes there (a folder, or a file).

An output folder is replaced whole (``io.atomic_directory``), so ``prepare --out data`` (a typo for
data/prepared) would delete the dataset index and the filter's table it had just read, and ``dataset --out``
naming the NIH download would delete the download itself, which no DVC cache holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cxr_diffusion.errors import UserError
from cxr_diffusion.safe_text import visible_text


class StagePathError(UserError, ValueError):
    """Two of a stage's paths collide, or an output path cannot be written."""


def check_stage_paths(reads: Mapping[str, Path | None], folders: Mapping[str, Path] | None = None,
                      files: Mapping[str, Path] | None = None) -> None:
    """Refuse, in one line naming both options, an output (``folders`` the stage writes whole, ``files`` it
    writes one by one) that is, holds or lies inside an input folder, or another output; and an output whose
    path runs through a file, or is a folder where a file belongs (or the reverse)."""
    outputs = {**{name: (Path(path), True) for name, path in (folders or {}).items()},
               **{name: (Path(path), False) for name, path in (files or {}).items()}}
    for name, (path, is_folder) in outputs.items():
        _check_writable(name, path, is_folder)
    inputs = {name: Path(path) for name, path in reads.items() if path is not None}
    resolved_inputs = {other: _resolved(other, source) for other, source in inputs.items()}
    for name, (path, _) in outputs.items():
        out = _resolved(name, path)
        for other, source in inputs.items():
            _refuse_overlap(name, out, other, resolved_inputs[other], source.is_dir())
    names = list(outputs)
    for i, name in enumerate(names):
        for other in names[i + 1:]:
            first, second = _resolved(name, outputs[name][0]), _resolved(other, outputs[other][0])
            if first == second or first in second.parents or second in first.parents:
                raise StagePathError(f"{name} {_shown(outputs[name][0])} and {other} {_shown(outputs[other][0])} "
                                     "overlap; give each output a path of its own")


def existing_paths(named: Mapping[str, str | None]) -> dict[str, Path]:
    """The params that name a file or folder on this machine (a hub id, "demo" or null names none), as the
    ``param_reads`` of ``run_stage``."""
    return {name: Path(value) for name, value in named.items() if value and Path(value).exists()}


def _resolved(name: str, path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:  # a symbolic link loop (a RuntimeError before Python 3.13)
        raise StagePathError(f"{name} {_shown(path)} cannot be resolved ({_shown(error)}); a symbolic link loop? "
                             "Give a plain path") from None


def _refuse_overlap(name: str, out: Path, other: str, source: Path, source_is_folder: bool) -> None:
    if out == source:
        raise StagePathError(f"{name} {_shown(out)} is also the input {other}; writing it would replace that input: "
                             "give the output a path of its own")
    if out in source.parents:
        raise StagePathError(f"{name} {_shown(out)} holds the input {other} {_shown(source)}; writing it would delete "
                             "that input: give the output a path of its own")
    if source_is_folder and source in out.parents:
        raise StagePathError(f"{name} {_shown(out)} lies inside the input {other} {_shown(source)}; give the output a "
                             "path outside it")


def _check_writable(name: str, path: Path, is_folder: bool) -> None:
    """Every existing part above ``path`` is a folder, and ``path`` itself, if it exists, is of the kind written."""
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            raise StagePathError(f"{name} {_shown(path)}: {_shown(parent)} is a file where a folder belongs; move it "
                                 "away or choose another path")
    if path.is_symlink() or not path.exists():
        return
    if is_folder and not path.is_dir():
        raise StagePathError(f"{name} {_shown(path)} is a file; the stage writes a folder there: move it away or "
                             "choose another path")
    if not is_folder and path.is_dir():
        raise StagePathError(f"{name} {_shown(path)} is a folder; the stage writes a file there: move it away or "
                             "choose another path")


def _shown(path: Path) -> str:
    return visible_text(str(path), 200)

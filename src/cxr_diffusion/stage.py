"""What every DVC stage entry point shares: load params, run, turn user errors into a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from cxr_diffusion.config import Params
from cxr_diffusion.params_file import load_params
from cxr_diffusion.errors import UserError, user_error_line
from cxr_diffusion.stage_paths import StagePathError, check_stage_paths


def run_stage(name: str, params_path: Path, body: Callable[[Params], object], *,
              reads: Mapping[str, Path | None] | None = None, folders: Mapping[str, Path] | None = None,
              files: Mapping[str, Path] | None = None,
              param_reads: Callable[[Params], Mapping[str, Path | None]] | None = None) -> None:
    """Load and validate params, check the stage's paths, run ``body``; a user error prints one clear line and
    exits 2.

    ``reads`` are the inputs the command line names (``param_reads`` those the params name), ``folders`` and
    ``files`` the outputs: checked by ``stage_paths.check_stage_paths`` before anything is read or written.
    User errors are every ``UserError``, a missing input file, and the OS errors a user fixes outside
    the program (full disk, permissions). Anything else is a bug and keeps its traceback.
    """
    try:
        _refuse_a_repeated_option(sys.argv)
        params = load_params(params_path)
        from_params = param_reads(params) if param_reads is not None else {}
        check_stage_paths({"--params": params_path, **(reads or {}), **from_params}, folders, files)
        body(params)
    except (UserError, OSError) as error:
        line = user_error_line(error)
        if line is None:
            raise
        print(f"stage {name} failed: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def _refuse_a_repeated_option(argv: list[str]) -> None:
    """A stage script's option given twice (a hand-edited or badly merged command line): typer would take the
    last value silently, and write where the other one was meant to go. Checked where a stage runs as its script."""
    if len(argv) < 2 or Path(argv[0]).parent.name != "stages":
        return
    names = [argument.split("=", 1)[0] for argument in argv[1:] if argument.startswith("--")]
    repeated = next((name for position, name in enumerate(names) if name in names[:position]), None)
    if repeated is not None:
        raise StagePathError(f"{repeated} is given twice on the command line; give it once (dvc.yaml names each "
                             f"option once)")

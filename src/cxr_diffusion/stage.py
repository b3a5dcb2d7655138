"""What every DVC stage entry point shares: load params, run, turn user errors into a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from cxr_diffusion.config import Params
from cxr_diffusion.params_file import load_params
from cxr_diffusion.errors import UserError, user_error_line


def run_stage(name: str, params_path: Path, body: Callable[[Params], object]) -> None:
    """Load and validate params, run ``body``; a user error prints one clear line and exits 2.

    User errors are every ``UserError``, a missing input file, and the OS errors a user fixes outside
    the program (full disk, permissions). Anything else is a bug and keeps its traceback.
    """
    try:
        params = load_params(params_path)
        body(params)
    except (UserError, OSError) as error:
        line = user_error_line(error)
        if line is None:
            raise
        print(f"stage {name} failed: {line}", file=sys.stderr)
        raise SystemExit(2) from None

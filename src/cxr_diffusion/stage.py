"""What every DVC stage entry point shares: load params, run, turn user errors into a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from cxr_diffusion.config import Params, load_params
from cxr_diffusion.errors import UserError, describe_os_error


def run_stage(name: str, params_path: Path, body: Callable[[Params], object]) -> None:
    """Load and validate params, run ``body``; a user error prints one clear line and exits 2.

    User errors are every ``UserError``, a missing input file, and the OS errors a user fixes outside
    the program (full disk, permissions). Anything else is a bug and keeps its traceback.
    """
    try:
        params = load_params(params_path)
        body(params)
    except UserError as error:
        _fail(name, str(error))
    except FileNotFoundError as error:
        # Raised by the OS it names the file; raised by our code it already says what to do.
        _fail(name, f"{error.filename}: no such file; run the stages before this one (dvc repro)" if error.filename
              else str(error) or "an input file is missing; run the stages before this one (dvc repro)")
    except OSError as error:
        message = describe_os_error(error)
        if message is None:
            raise
        _fail(name, message)


def _fail(name: str, message: str) -> None:
    # One line even when the message quotes a library's multi-line error (h5py, pyarrow, transformers).
    print(f"stage {name} failed: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2) from None

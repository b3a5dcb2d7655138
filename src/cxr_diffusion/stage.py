"""What every DVC stage entry point shares: load params, run, turn known errors into a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from cxr_diffusion.config import Params, ParamsError, load_params
from cxr_diffusion.conditioning.store import StoreError
from cxr_diffusion.data.nih import DataError

USER_ERRORS = (ParamsError, DataError, StoreError, FileNotFoundError)


def run_stage(name: str, params_path: Path, body: Callable[[Params], object],
              extra_errors: tuple[type[Exception], ...] = ()) -> None:
    """Load and validate params, run ``body``; a user error prints one clear line and exits 2."""
    try:
        params = load_params(params_path)
        body(params)
    except USER_ERRORS + extra_errors as error:
        print(f"stage {name} failed: {error}", file=sys.stderr)
        raise SystemExit(2) from None

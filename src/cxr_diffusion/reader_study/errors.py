"""The reader study's error type, in a module of its own so stages import it without the rest."""

from __future__ import annotations

from cxr_diffusion.errors import UserError


class ReaderStudyError(UserError, ValueError):
    """A reader study's inputs (images, kit folder, answer key) cannot be used as given."""

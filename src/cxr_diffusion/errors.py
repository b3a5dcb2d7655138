"""The one base of every error a user can cause and fix (bad params, data, files, models).

Entry points catch ``UserError`` and print its message on one line with exit code 2; anything else
that escapes is a bug and keeps its traceback. Each module still raises its own subclass, whose
message names the file, row or key and says what to do.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Something the user gave us is unusable as given; ``str(error)`` says where and what to do."""


def describe_os_error(error: OSError) -> str | None:
    """One line for the OS errors a user fixes outside the program (full disk, permissions), else None."""
    where = f" writing {error.filename}" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; free some space and rerun "
                f"(the partial output was discarded, nothing half-written is kept)")
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}; free some space and rerun (the partial output was discarded)"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # raised by reads too: say "on", not "writing"
        on = f" on {error.filename}" if error.filename else ""
        return f"permission denied{on}: {error.strerror}; check the permissions of that file or folder and rerun"
    return None

"""The one base of every error a user can cause and fix (bad params, data, files, models).

Entry points catch ``UserError`` and print its message on one line with exit code 2; anything else
that escapes is a bug and keeps its traceback. Each module still raises its own subclass, whose
message names the file, row or key and says what to do.

Messages quote what the user's files hold (ids, dataset names, file names of a download), so the line is
shown through ``safe_text.visible_text``: a terminal escape in a downloaded file cannot retitle, clear or
recolour the terminal when a stage fails.
"""

from __future__ import annotations

import errno
import os

from cxr_diffusion.safe_text import visible_text

# Long enough for any message with its paths (the CLI's `inspect` lines use the same bound); a file's
# strings quoted whole (a datasets.json listing thousands of names) still cannot make the line endless.
LINE_LIMIT = 4000


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
    if error.errno == errno.ENOTDIR or (error.errno == errno.EEXIST and error.filename is not None
                                        and os.path.lexists(error.filename)
                                        and not os.path.isdir(error.filename)):  # mkdir where a file or link is
        return (f"{error.filename}: a part of this path is a file where a folder belongs; move it away or choose "
                "another path")
    if error.errno == errno.EISDIR:
        return f"{error.filename}: a folder where a file belongs; move it away or choose another path"
    return None


def user_error_line(error: BaseException) -> str | None:
    """The one line an entry point prints for an error the user can fix, else None (a bug: let it raise).

    User errors are every ``UserError``, a missing input file, and the OS errors ``describe_os_error``
    describes. The line is joined onto one line even when it quotes a library's multi-line message
    (h5py, pyarrow, transformers), and every hidden character in it (ESC, BEL, a bidi override) is shown
    as a ``\\u....`` escape: one place for every stage and command, so no message can forget it.
    """
    if isinstance(error, UserError):
        message: str | None = str(error)
    elif isinstance(error, FileNotFoundError):
        # Raised by the OS it names the file; raised by our code it already says what to do.
        message = (f"{error.filename}: no such file; run the stages before this one (dvc repro)" if error.filename
                   else str(error) or "an input file is missing; run the stages before this one (dvc repro)")
    elif isinstance(error, OSError):
        message = describe_os_error(error)
    else:
        message = None
    return None if message is None else visible_text(message, LINE_LIMIT)

"""How the reports write a number: fixed digits, "n/a" for a value not computed, an interval in brackets.

The values come from metrics files, which a person or a DVC remote can change: anything that is not a number
is written as inert Markdown text (``markdown_text``), so a string where a number belongs cannot add markup,
a link or a table cell to a report.
"""

from __future__ import annotations

import math

from cxr_diffusion.safe_text import markdown_text


def is_number(value) -> bool:
    """An int or float from a metrics file; JSON's true and false are bools, which Python would add as 1 and 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_float(value) -> float | None:
    """A number as a float (JSON's huge integers too: ``10**400 + 0.0`` overflows), else None."""
    if not is_number(value):
        return None
    try:
        return float(value) + 0.0  # + 0.0: no "-0.000"
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def fixed(value, digits: int) -> str:
    """A number with ``digits`` decimals; anything else as ``number`` writes it (n/a, or inert text)."""
    shown = as_float(value)
    return f"{shown:.{digits}f}" if shown is not None else number(value)


def without_negative_zero(value):
    """``value + 0.0`` for a number (so -0.0 prints as 0.000), anything else as it is, for ``number`` to show."""
    return as_float(value) if is_number(value) else value


def number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return markdown_text(value, 60)


def with_interval(value, low, high, digits: int = 3) -> str:
    return f"{number(value, digits)} [{number(low, digits)}, {number(high, digits)}]"


def signed_with_interval(value, low, high) -> str:
    if value is None:
        return "n/a"
    shown = f"{as_float(value):+.3f}" if is_number(value) else number(value)
    return f"{shown} [{number(low)}, {number(high)}]"

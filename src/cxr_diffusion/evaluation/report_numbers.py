"""How the reports write a number: fixed digits, "n/a" for a value not computed, an interval in brackets.

The values come from metrics files, which a person or a DVC remote can change: anything that is not a number
is written as inert Markdown text (``markdown_text``), so a string where a number belongs cannot add markup,
a link or a table cell to a report.
"""

from __future__ import annotations

from cxr_diffusion.safe_text import markdown_text


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
    return f"{value + 0.0:+.3f} [{number(low)}, {number(high)}]"  # + 0.0: no "-0.000"

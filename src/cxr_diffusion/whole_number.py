"""The one test of "a whole number" for a value read from a file (a config, a manifest, a header).

JSON gives ``True`` where a file says ``true``, and Python counts ``True`` as 1, so a bare ``isinstance(value,
int)`` would take ``"layers": true`` for one layer; floats such as ``3.0`` are refused as well, as the writers
of these files never write them.
"""

from __future__ import annotations


def is_whole_number(value: object, low: int = 0, high: int | None = None) -> bool:
    """Whether ``value`` is an int (not a bool) in ``[low, high]`` (no upper bound when ``high`` is None)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)

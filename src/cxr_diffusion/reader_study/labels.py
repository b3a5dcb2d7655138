"""The words a study's truth is written in: the source of a real image, and findings as readers answer them.

Kept apart from ``items`` (which reads the shards, and so torch) so that scoring imports only this.
"""

from __future__ import annotations

from collections.abc import Sequence

REAL = "real"  # the source of a real image; every other source is a branch name
NO_FINDING = "No Finding"  # a class, when the filter keeps it; readers answer it as "none"
NONE = "none"  # what a reader ticks when no finding is visible


def study_findings(classes: Sequence[str]) -> list[str]:
    """The findings a reader ticks: every class except "No Finding" (which the page asks as "none")."""
    return [name for name in classes if name != NO_FINDING]


def answer_findings(labels: Sequence[str], findings: Sequence[str]) -> list[str]:
    """Labels as a reader answers them: the study's findings among them, or ["none"] ("No Finding")."""
    present = [name for name in findings if name in labels]
    return present or [NONE]

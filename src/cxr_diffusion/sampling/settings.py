"""The settings a set of generations was made with, as the sample stage records them, and the check that they
are the params' own.

``sample`` writes these settings into the samples' manifest (``generated``) and into its metrics file;
``evaluate`` and ``compare`` then refuse generations whose record disagrees with params.yaml: the untrained
baseline is sampled with the params' settings, and the report names them in its header, so generations made
before the params changed would be measured or reported under settings they were not made with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cxr_diffusion.config import Params
from cxr_diffusion.safe_text import shown_value

# Each recorded setting and the param it comes from.
PARAM_OF_SETTING = {"sampler": "sample.sampler", "steps": "sample.steps", "guidance_scale": "sample.guidance_scale",
                    "seed": "seed", "count": "sample.count"}


def sampling_settings(params: Params) -> dict:
    """The settings of ``params`` that decide which generations ``sample`` makes (``count``: at most that many,
    one per test condition)."""
    return {"sampler": params.sample.sampler, "steps": params.sample.steps,
            "guidance_scale": params.sample.guidance_scale, "seed": params.seed, "count": params.sample.count}


@dataclass(frozen=True)
class ChangedSetting:
    """A recorded setting that is not the params' own."""

    key: str
    recorded: object
    wanted: object

    def describe(self) -> str:
        """One line, such as: sampled with steps 20, but sample.steps is 50 (the recorded value as read)."""
        return (f"sampled with {self.key} {shown_value(self.recorded)}, but {PARAM_OF_SETTING[self.key]} is "
                f"{self.wanted!r}")


def changed_setting(recorded: dict, params: Params, keys: Iterable[str] = PARAM_OF_SETTING) -> ChangedSetting | None:
    """The first of ``keys`` whose value in ``recorded`` (a missing key: None) is not the params' own; None when
    all agree. A JSON ``true`` is not the number 1."""
    wanted = sampling_settings(params)
    for key in keys:
        value = recorded.get(key)
        if isinstance(value, bool) != isinstance(wanted[key], bool) or value != wanted[key]:
            return ChangedSetting(key, value, wanted[key])
    return None

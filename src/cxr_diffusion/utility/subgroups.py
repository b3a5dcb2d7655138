"""Subgroup results of a utility arm: is the classifier as good for women as for men, for the old as for the
young, and does training on synthetic images widen or narrow the gap (RoentGen-v2 reports its synthetic
pretraining narrowing the underdiagnosis gap)?

Two attributes from NIH's metadata, per test film: ``sex`` (``Patient Gender``: M, F; anything else is
``other``) and ``age`` in bands cut at ``utility.age_bands`` (``[40, 60]``: ``<40``, ``40-59``, ``60+``). For
each group and arm:

- **macro AUROC**, over the classes defined (both label values present) in *every* group of the attribute,
  so the groups are compared on the same classes; a group of fewer than ``MIN_GROUP_FILMS`` films gets none;
- **underdiagnosis rate**, when ``No Finding`` is a class: of the group's films that have a finding, the
  share the arm calls "No Finding" (Seyyed-Kalantari et al. 2021's definition); a group with fewer than
  ``MIN_GROUP_FILMS`` films with a finding gets none. The arm calls "No Finding" on the films it scores
  highest for it, as many as the test split has (its prevalence; films tied at the threshold share the calls
  left, each counting as that fraction of a call), so every arm is read at one operating point without a
  validation split. That is not the paper's threshold (the F1-maximising one on validation
  data), the threshold is held fixed in every bootstrap draw (the intervals leave out its uncertainty), and
  the prevalence is that of the filtered split (``filter.max_per_class`` caps No Finding): compare rates
  between arms and groups of one run, not with published ones.

The **gap** of an attribute is its highest group's value minus its lowest's (by the point estimate), taken
between the same two groups in every bootstrap draw, so its interval can include 0; the result names the
group that fares best and worst (for underdiagnosis, the lowest rate is best). With more than two groups
the pair is picked after seeing the estimates, so the interval (conditional on the pair) is optimistic.
Intervals resample test patients as ``statistics`` does; a draw in which a group loses a class (or every
film with a finding) gives that group no value, and each interval counts the draws it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr_diffusion.data.filtered_table import FILTER_FIX, check_each_image_once, read_filtered_csv
from cxr_diffusion.data.nih import whole_numbers
from cxr_diffusion.errors import UserError
from cxr_diffusion.nih_labels import NO_FINDING
from cxr_diffusion.safe_text import shown_value, visible_text
from cxr_diffusion.utility.statistics import auroc_columns, percentile_interval

MIN_GROUP_FILMS = 10
MAX_AGE = 150  # the filter keeps ages in [filter.age_min, filter.age_max], both within 0-150
SEXES = ("F", "M")  # NIH's Patient Gender; any other value is the group "other"


class SubgroupError(UserError, ValueError):
    """The test images' sex and age cannot be read from the filter stage's table; the message says why."""


def age_band(age: int, edges: Sequence[int]) -> str:
    """``age``'s band label for band edges ``edges`` (increasing): ``<40``, ``40-59``, ``60+`` for [40, 60]."""
    if not edges or age < edges[0]:
        return f"<{edges[0]}" if edges else "all"
    for low, high in zip(edges, edges[1:]):
        if age < high:
            return f"{low}-{high - 1}"
    return f"{edges[-1]}+"


def group_order(edges: Sequence[int]) -> dict[str, list[str]]:
    """The groups of each attribute in reading order (youngest band first)."""
    bands = [age_band(age, edges) for age in (edges[0] - 1, *edges)] if edges else ["all"]
    return {"sex": [*SEXES, "other"], "age": bands}


def subgroups_of_films(filtered_csv: Path, image_indices: Sequence[str], edges: Sequence[int]) -> dict[str, list[str]]:
    """Each test image's sex and age band (attribute -> one label per image, in ``image_indices`` order)."""
    fix = FILTER_FIX
    try:
        table = read_filtered_csv(filtered_csv, SubgroupError, dtype=str, keep_default_na=False,
                                  usecols=["Image Index", "Patient Age", "Patient Gender"])
    except OSError as error:  # missing or unreadable
        raise SubgroupError(f"{filtered_csv}: {str(error).splitlines()[0]}; {fix}") from None
    check_each_image_once(filtered_csv, table, SubgroupError)
    table = table.set_index("Image Index")
    missing = [name for name in image_indices if name not in table.index]
    if missing:
        raise SubgroupError(f"{filtered_csv}: {len(missing)} test image(s) are not in it (first: "
                            f"{visible_text(missing[0])!r}); {fix}, then prepare")
    rows = table.loc[list(image_indices)]
    ages = whole_numbers(rows["Patient Age"])
    impossible = ages.isna() | (ages < 0) | (ages > MAX_AGE)
    if impossible.any():
        position = int(np.flatnonzero(impossible.to_numpy(dtype=bool))[0])
        raise SubgroupError(f"{filtered_csv}: Patient Age of {visible_text(rows.index[position])!r} is "
                            f"{shown_value(rows['Patient Age'].iloc[position])}, not a whole number of years in "
                            f"0-{MAX_AGE}; {fix}")
    return {"sex": [value if value in SEXES else "other" for value in rows["Patient Gender"]],
            "age": [age_band(int(age), edges) for age in ages]}


def _macro(truth: np.ndarray, scores: np.ndarray, columns: np.ndarray) -> float:
    """Mean AUROC over ``columns``; NaN when any of them holds a single label value in these rows."""
    values = auroc_columns(truth[:, columns], scores[:, columns])
    return float(values.mean()) if len(values) else np.nan


def _defined(truth: np.ndarray) -> np.ndarray:
    return truth.any(axis=0) & ~truth.all(axis=0)


class _Underdiagnosis:
    """Share of images with a finding that the arm calls "No Finding", at the prevalence-matched threshold."""

    def __init__(self, truth: np.ndarray, scores: np.ndarray, column: int):
        self.column = column
        # Call "No Finding" on as many films as the test split has (at least one: without a No Finding film there
        # is no threshold, and the caller reports no rate), those the arm scores highest for it. Films tied at the
        # threshold share the calls left, each counting as that fraction of a call: the calls then total the
        # prevalence whatever the ties (probabilities saturate at 1.0), in any row order.
        normal_scores = scores[:, column]
        calls = int(truth[:, column].sum())
        self.threshold = float(np.sort(normal_scores)[::-1][calls - 1])
        above, tied = int((normal_scores > self.threshold).sum()), int((normal_scores == self.threshold).sum())
        self.tied_share = (calls - above) / tied

    def rate(self, truth: np.ndarray, scores: np.ndarray) -> float:
        sick = ~truth[:, self.column]
        if not sick.any():
            return np.nan
        called = scores[sick, self.column]
        return float(np.mean(np.where(called > self.threshold, 1.0,
                                      np.where(called == self.threshold, self.tied_share, 0.0))))


def _gap(point: dict[str, float], draws: dict[str, np.ndarray], higher_is_better: bool) -> dict:
    """The highest minus the lowest group (by point estimate), with the bootstrap interval of the same
    difference over the draws in which both have a value, and which group fares best and worst."""
    named = {group: value for group, value in point.items() if np.isfinite(value)}
    if len(named) < 2:
        return {"gap": None, "ci_low": None, "ci_high": None, "draws": 0, "best": None, "worst": None}
    ordered = sorted(named, key=named.get)  # stable: tied groups keep their reading order, still two groups
    low, high = ordered[0], ordered[-1]
    differences = draws[high] - draws[low]
    ci_low, ci_high = percentile_interval(differences)
    best, worst = (high, low) if higher_is_better else (low, high)
    return {"gap": named[high] - named[low], "ci_low": ci_low, "ci_high": ci_high,
            "draws": int(np.isfinite(differences).sum()), "best": best, "worst": worst}


def subgroup_results(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], patients: Sequence[str],
                     subgroups: dict[str, list[str]], order: dict[str, list[str]], draws: list[np.ndarray]) -> dict:
    """Per attribute: each group's size, macro AUROC and underdiagnosis rate with intervals, and the gaps
    (module docstring). ``draws`` are the bootstrap's row indices (``statistics.patient_draws``), shared by
    every arm so that arms can be compared draw by draw."""
    truth, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    column = list(classes).index(NO_FINDING) if NO_FINDING in classes else None
    no_normal_film = column is not None and not truth[:, column].any()
    underdiagnosis = _Underdiagnosis(truth, scores, column) if column is not None and not no_normal_film else None
    patients = np.asarray(patients)
    results = {}
    for attribute, labels_of in subgroups.items():
        members = np.asarray(labels_of)
        groups = [g for g in order[attribute] if (members == g).any()] + sorted(set(labels_of) - set(order[attribute]))
        rows = {g: np.flatnonzero(members == g) for g in groups}
        ranked = [g for g in groups if len(rows[g]) >= MIN_GROUP_FILMS]
        shared = np.flatnonzero(np.all([_defined(truth[rows[g]]) for g in ranked], axis=0)) if ranked \
            else np.array([], dtype=int)
        sick = {g: int((~truth[rows[g], column]).sum()) if column is not None else 0 for g in groups}
        rated = [g for g in groups if underdiagnosis and sick[g] >= MIN_GROUP_FILMS]

        def measure(group_rows: np.ndarray, group: str) -> tuple[float, float]:
            auroc = _macro(truth[group_rows], scores[group_rows], shared) if group in ranked and len(shared) else np.nan
            rate = underdiagnosis.rate(truth[group_rows], scores[group_rows]) if group in rated else np.nan
            return auroc, rate

        point = {g: measure(rows[g], g) for g in groups}
        boot = {g: np.full((len(draws), 2), np.nan) for g in groups}
        single = {g for g in groups if len(set(patients[rows[g]])) < 2}  # every draw is that patient: no interval
        for d, draw in enumerate(draws):
            drawn = members[draw]
            for g in (set(ranked) | set(rated)) - single:
                boot[g][d] = measure(draw[drawn == g], g)
        entry = {"groups": {}, "classes": [classes[c] for c in shared]}
        for g in groups:
            group = {"images": int(len(rows[g])), "patients": int(len(set(patients[rows[g]])))}
            if column is not None:
                group["with_finding"] = sick[g]
            auroc_low, auroc_high = percentile_interval(boot[g][:, 0])
            rate_low, rate_high = percentile_interval(boot[g][:, 1])
            group.update({"macro_auroc": _finite(point[g][0]), "ci_low": auroc_low, "ci_high": auroc_high,
                          "underdiagnosis": _finite(point[g][1]), "underdiagnosis_ci_low": rate_low,
                          "underdiagnosis_ci_high": rate_high})
            notes = ([f"fewer than {MIN_GROUP_FILMS} test films: no AUROC"] if g not in ranked else []) + \
                ([f"fewer than {MIN_GROUP_FILMS} films with a finding: no underdiagnosis rate"]
                 if underdiagnosis and g not in rated else []) + \
                (["no No Finding film in the test split: no threshold, no underdiagnosis rate"] if no_normal_film else []) + \
                (["one patient: no bootstrap interval"] if g in single else [])
            if notes:
                group["note"] = "; ".join(notes)
            entry["groups"][g] = group
        entry["auroc_gap"] = _gap({g: point[g][0] for g in groups}, {g: boot[g][:, 0] for g in groups}, True)
        entry["underdiagnosis_gap"] = _gap({g: point[g][1] for g in groups}, {g: boot[g][:, 1] for g in groups}, False)
        results[attribute] = entry
    return results


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None

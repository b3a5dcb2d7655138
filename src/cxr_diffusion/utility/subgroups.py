"""Subgroup results of a utility arm: is the classifier as good for women as for men, for the old as for the
young, and does training on synthetic images widen or narrow the gap (RoentGen-v2 reports its synthetic
pretraining narrowing the underdiagnosis gap)?

Two attributes from NIH's metadata, per test image: ``sex`` (``Patient Gender``: M, F; anything else is
``other``) and ``age`` in bands cut at ``utility.age_bands`` (``[40, 60]``: ``<40``, ``40-59``, ``60+``). For
each group and arm:

- **macro AUROC**, over the classes defined (both label values present) in *every* group of the attribute,
  so the groups are compared on the same classes;
- **underdiagnosis rate** (Seyyed-Kalantari et al. 2021), when ``No Finding`` is a class: of the group's
  images that have a finding, the share the arm calls "No Finding". The arm calls it at the threshold at
  which it calls as many test images "No Finding" as the test split has (its prevalence), so every arm is
  read at the same operating point without a validation split.

The **gap** of an attribute is its highest group's value minus its lowest's (by the point estimate), taken
between the same two groups in every bootstrap draw, so its interval can include 0; the result names the
group that fares best and worst (for underdiagnosis, the lowest rate is best). Intervals resample test patients as ``statistics`` does; a draw in which a
group loses a class is dropped and the kept draws are counted. A group of fewer than ``MIN_GROUP_IMAGES``
images gets no estimate and stays out of the gap (named, with its count).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from cxr_diffusion.errors import UserError

MIN_GROUP_IMAGES = 10
NO_FINDING = "No Finding"
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


def test_subgroups(filtered_csv: Path, image_indices: Sequence[str], edges: Sequence[int]) -> dict[str, list[str]]:
    """Each test image's sex and age band (attribute -> one label per image, in ``image_indices`` order)."""
    fix = "rerun the filter stage (`dvc repro filter`)"
    try:
        table = pd.read_csv(filtered_csv, dtype=str, keep_default_na=False,
                            usecols=["Image Index", "Patient Age", "Patient Gender"])
    except (OSError, ValueError) as error:  # missing, unreadable, or without one of the columns
        raise SubgroupError(f"{filtered_csv}: {str(error).splitlines()[0]}; {fix}") from None
    table = table.drop_duplicates("Image Index").set_index("Image Index")
    missing = [name for name in image_indices if name not in table.index]
    if missing:
        raise SubgroupError(f"{filtered_csv}: {len(missing)} test image(s) are not in it (first: {missing[0]!r}); "
                            f"{fix}, then prepare")
    rows = table.loc[list(image_indices)]
    ages = pd.to_numeric(rows["Patient Age"], errors="coerce")
    if ages.isna().any():
        name = rows.index[int(np.flatnonzero(ages.isna())[0])]
        raise SubgroupError(f"{filtered_csv}: Patient Age of {name!r} is not a number; {fix}")
    return {"sex": [value if value in SEXES else "other" for value in rows["Patient Gender"]],
            "age": [age_band(int(age), edges) for age in ages]}


def _auroc(positives: np.ndarray, scores: np.ndarray) -> float:
    """AUROC from ranks (Mann-Whitney U; ties share their rank, as sklearn's roc_auc_score counts them)."""
    ranks = rankdata(scores)
    count = int(positives.sum())
    return float((ranks[positives].sum() - count * (count + 1) / 2) / (count * (len(positives) - count)))


def _macro(truth: np.ndarray, scores: np.ndarray, columns: np.ndarray) -> float:
    """Mean AUROC over ``columns``; NaN when any of them holds a single label value in these rows."""
    values = []
    for column in columns:
        positives = truth[:, column]
        if not positives.any() or positives.all():
            return np.nan
        values.append(_auroc(positives, scores[:, column]))
    return float(np.mean(values)) if values else np.nan


def _defined(truth: np.ndarray) -> np.ndarray:
    return truth.any(axis=0) & ~truth.all(axis=0)


class _Underdiagnosis:
    """Share of images with a finding that the arm calls "No Finding", at the prevalence-matched threshold."""

    def __init__(self, truth: np.ndarray, scores: np.ndarray, column: int):
        self.column = column
        normal = truth[:, column]
        # Call the top `prevalence` share of images "No Finding": as many as the test split has.
        self.threshold = float(np.quantile(scores[:, column], 1 - normal.mean())) if normal.any() else np.inf

    def rate(self, truth: np.ndarray, scores: np.ndarray) -> float:
        sick = ~truth[:, self.column]
        return float(np.mean(scores[sick, self.column] >= self.threshold)) if sick.any() else np.nan


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _gap(point: dict[str, float], draws: dict[str, np.ndarray], higher_is_better: bool) -> dict:
    """The highest minus the lowest group (by point estimate), with the paired bootstrap interval of the same
    difference, and which group fares best and worst."""
    named = {group: value for group, value in point.items() if np.isfinite(value)}
    if len(named) < 2:
        return {"gap": None, "ci_low": None, "ci_high": None, "best": None, "worst": None}
    ordered = sorted(named, key=named.get)  # stable: tied groups keep their reading order, still two groups
    low, high = ordered[0], ordered[-1]
    ci_low, ci_high = _interval(draws[high] - draws[low])
    best, worst = (high, low) if higher_is_better else (low, high)
    return {"gap": named[high] - named[low], "ci_low": ci_low, "ci_high": ci_high, "best": best, "worst": worst}


def subgroup_results(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], patients: Sequence[str],
                     subgroups: dict[str, list[str]], order: dict[str, list[str]], draws: list[np.ndarray]) -> dict:
    """Per attribute: each group's size, macro AUROC and underdiagnosis rate with intervals, and the gaps
    (module docstring). ``draws`` are the bootstrap's row indices (``statistics.patient_draws``), shared by
    every arm so that arms can be compared draw by draw."""
    truth, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    column = list(classes).index(NO_FINDING) if NO_FINDING in classes else None
    underdiagnosis = _Underdiagnosis(truth, scores, column) if column is not None else None
    results = {}
    for attribute, labels_of in subgroups.items():
        members = np.asarray(labels_of)
        groups = [g for g in order[attribute] if (members == g).any()] + sorted(set(labels_of) - set(order[attribute]))
        rows = {g: np.flatnonzero(members == g) for g in groups}
        estimated = [g for g in groups if len(rows[g]) >= MIN_GROUP_IMAGES]
        shared = np.flatnonzero(np.all([_defined(truth[rows[g]]) for g in estimated], axis=0)) if estimated \
            else np.array([], dtype=int)
        point_auroc = {g: _macro(truth[rows[g]], scores[rows[g]], shared) if len(shared) else np.nan for g in estimated}
        point_under = {g: underdiagnosis.rate(truth[rows[g]], scores[rows[g]]) if underdiagnosis else np.nan
                       for g in estimated}
        boot_auroc = {g: np.full(len(draws), np.nan) for g in estimated}
        boot_under = {g: np.full(len(draws), np.nan) for g in estimated}
        for d, draw in enumerate(draws):
            drawn = members[draw]
            for g in estimated:
                picked = draw[drawn == g]
                if len(shared):
                    boot_auroc[g][d] = _macro(truth[picked], scores[picked], shared)
                if underdiagnosis:
                    boot_under[g][d] = underdiagnosis.rate(truth[picked], scores[picked])
        complete = np.all([np.isfinite(boot_auroc[g]) for g in estimated], axis=0) if estimated else np.zeros(0, bool)
        for g in estimated:
            boot_auroc[g] = np.where(complete, boot_auroc[g], np.nan)
        entry = {"groups": {}, "classes": [classes[c] for c in shared], "bootstrap_draws": int(complete.sum())}
        for g in groups:
            group = {"images": int(len(rows[g])), "patients": int(len(set(np.asarray(patients)[rows[g]])))}
            if g in estimated:
                low, high = _interval(boot_auroc[g])
                under_low, under_high = _interval(boot_under[g])
                group.update({"macro_auroc": _finite(point_auroc[g]), "ci_low": low, "ci_high": high,
                              "underdiagnosis": _finite(point_under[g]), "underdiagnosis_ci_low": under_low,
                              "underdiagnosis_ci_high": under_high})
            else:
                group["note"] = f"fewer than {MIN_GROUP_IMAGES} test films: no estimate"
            entry["groups"][g] = group
        entry["auroc_gap"] = _gap(point_auroc, boot_auroc, higher_is_better=True)
        entry["underdiagnosis_gap"] = _gap(point_under, boot_under, higher_is_better=False)
        results[attribute] = entry
    return results


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None

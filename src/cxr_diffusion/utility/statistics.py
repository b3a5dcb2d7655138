"""AUROC of a classifier arm on the real test split, with bootstrap intervals, and its paired difference
to the real-only arm (train-on-synthetic, test-on-real, as Packhaeuser et al. 2023 and CheXGenBench report it).

Every arm is scored on the same test images: ``labels`` are their true findings (n, c), ``scores`` an
arm's probabilities on them in the same row order. The bootstrap resamples *patients* (``groups``: each
test image's patient id) and takes every image of each drawn patient, since follow-up films of one patient
are not independent; a paired bootstrap scores both arms on the same draws, so the interval of the
difference reflects only the arms. A draw in which a class defined on the whole test split has a single
label value is dropped (its AUROC and the macro over the same classes are undefined there), and the
number of draws kept is reported: every interval is over complete draws only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from cxr_diffusion.evaluation.faithfulness import macro_auroc, per_label_auroc


def auroc_columns(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-column AUROC of ``scores`` (n, c) against 0/1 ``truth`` (n, c); NaN where a column holds a single
    class (AUROC undefined). From ranks (Mann-Whitney U; ties share their rank, as sklearn's roc_auc_score
    counts them): one sort per column, fast enough for thousands of bootstrap draws."""
    truth = np.asarray(truth).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    values = np.full(truth.shape[1], np.nan)
    for column in range(truth.shape[1]):
        positives = truth[:, column]
        count = int(positives.sum())
        if 0 < count < len(positives):
            ranks = rankdata(scores[:, column])
            values[column] = (ranks[positives].sum() - count * (count + 1) / 2) / (count * (len(positives) - count))
    return values


def macro_auroc_of(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean AUROC over the columns with both label values; None when there is none."""
    values = auroc_columns(truth, scores)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def percentile_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """The 2.5th and 97.5th percentiles of the finite bootstrap values; (None, None) when there is none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def patient_draws(groups: Sequence[str], resamples: int, seed: int) -> list[np.ndarray]:
    """Row indices of each bootstrap draw: ``len(set(groups))`` groups drawn with replacement, all rows of each.
    No draws with fewer than two groups: every draw would be the split itself, an interval of zero width that
    reads as certainty (no interval is given instead)."""
    names, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if len(names) < 2:
        return []
    rows_of = [np.flatnonzero(inverse == g) for g in range(len(names))]
    picks = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    return [np.concatenate([rows_of[g] for g in pick]) for pick in picks]


def _complete(values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """The draws (rows of ``values``, draws x classes) in which every class defined on the full split is finite."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(defined))  # no draws: 0 x classes
    return values[np.isfinite(values[:, defined]).all(axis=1)] if defined.any() else values[:0]


def _check_groups(groups: Sequence[str], rows: int) -> None:
    if len(groups) != rows:
        raise ValueError(f"groups: one patient id per test image needed, got {len(groups)} for {rows} images")


def auroc_with_intervals(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], groups: Sequence[str],
                         resamples: int, seed: int) -> dict:
    """Per-class and macro AUROC of one arm, each with a patient-level bootstrap 95% interval."""
    per_class = per_label_auroc(labels, scores, classes)  # validates shapes, 0/1 labels and finite scores
    truth, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    _check_groups(groups, len(truth))
    defined = np.array([per_class[name] is not None for name in classes])
    boot = _complete(np.array([auroc_columns(truth[rows], scores[rows]) for rows in patient_draws(groups, resamples, seed)]),
                     defined)
    result = {"per_class": {}, "macro": {}, "bootstrap_draws": len(boot)}
    for column, name in enumerate(classes):
        low, high = percentile_interval(boot[:, column]) if defined[column] else (None, None)
        result["per_class"][name] = {"auroc": per_class[name], "ci_low": low, "ci_high": high}
    low, high = percentile_interval(boot[:, defined].mean(axis=1)) if defined.any() else (None, None)
    result["macro"] = {"auroc": macro_auroc(per_class), "ci_low": low, "ci_high": high}
    return result


def paired_difference(labels: np.ndarray, scores: np.ndarray, baseline_scores: np.ndarray, classes: Sequence[str],
                      groups: Sequence[str], resamples: int, seed: int) -> dict:
    """Macro and per-class AUROC of an arm minus the baseline's (the real-only arm) on the same test images,
    with paired patient-level bootstrap 95% intervals, and the gap as a fraction of the baseline (Packhaeuser's
    form: (baseline - arm) / baseline, so 0.035 means the arm came within 3.5% of the real-only classifier)."""
    arm = per_label_auroc(labels, scores, classes)
    base = per_label_auroc(labels, baseline_scores, classes)
    truth = np.asarray(labels).astype(bool)
    _check_groups(groups, len(truth))
    scores, baseline_scores = np.asarray(scores, dtype=np.float64), np.asarray(baseline_scores, dtype=np.float64)
    defined = np.array([arm[name] is not None for name in classes])  # the same labels: defined for both or neither
    deltas = _complete(np.array([auroc_columns(truth[rows], scores[rows]) - auroc_columns(truth[rows], baseline_scores[rows])
                                 for rows in patient_draws(groups, resamples, seed)]), defined)
    per_class = {}
    for column, name in enumerate(classes):
        low, high = percentile_interval(deltas[:, column]) if defined[column] else (None, None)
        point = None if arm[name] is None or base[name] is None else arm[name] - base[name]
        per_class[name] = {"difference": point, "ci_low": low, "ci_high": high}
    macro_arm, macro_base = macro_auroc(arm), macro_auroc(base)
    low, high = percentile_interval(deltas[:, defined].mean(axis=1)) if defined.any() else (None, None)
    difference = None if macro_arm is None or macro_base is None else macro_arm - macro_base
    gap = None if difference is None or not macro_base else -difference / macro_base
    return {"per_class": per_class, "macro": {"difference": difference, "ci_low": low, "ci_high": high},
            "gap_fraction": gap, "bootstrap_draws": len(deltas)}


def seed_spread(values: Sequence[float | None]) -> dict:
    """The macro AUROC of one arm trained with each seed (``utility.seeds``): the spread that training itself
    adds, which a bootstrap over the test images cannot show. ``sd`` needs two seeds."""
    finite = [float(value) for value in values if value is not None]
    return {"macro_auroc": [None if value is None else float(value) for value in values], "count": len(values),
            "mean": float(np.mean(finite)) if finite else None,
            "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "min": min(finite) if finite else None, "max": max(finite) if finite else None}

"""AUROC of a classifier arm on the real test split, with bootstrap intervals, and its paired difference
to the real-only arm (train-on-synthetic, test-on-real, as Packhaeuser et al. 2023 and CheXGenBench report it).

Every arm is scored on the same test images: ``labels`` are their true findings (n, c), ``scores`` an
arm's probabilities on them in the same row order. A paired bootstrap resamples test images once per
draw and scores both arms on that draw, so the interval of the difference reflects only the arms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_diffusion.evaluation.faithfulness import macro_auroc, per_label_auroc


def _auroc_columns(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-column AUROC; NaN where a column holds a single class (AUROC undefined)."""
    values = np.full(truth.shape[1], np.nan)
    for column in range(truth.shape[1]):
        positives = truth[:, column]
        if positives.any() and not positives.all():
            values[column] = roc_auc_score(positives, scores[:, column])
    return values


def _draws(rows: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, rows, size=(resamples, rows))


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return None, None
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _macro(per_column: np.ndarray) -> float:
    return float(np.nanmean(per_column)) if np.isfinite(per_column).any() else np.nan


def auroc_with_intervals(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], resamples: int,
                         seed: int) -> dict:
    """Per-class and macro AUROC of one arm, each with a bootstrap 95% interval over test images."""
    per_class = per_label_auroc(labels, scores, classes)  # validates shapes, 0/1 labels and finite scores
    truth, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    boot = np.array([_auroc_columns(truth[rows], scores[rows]) for rows in _draws(len(truth), resamples, seed)])
    result = {"per_class": {}, "macro": {}}
    for column, name in enumerate(classes):
        low, high = _interval(boot[:, column])
        result["per_class"][name] = {"auroc": per_class[name], "ci_low": low, "ci_high": high}
    low, high = _interval(np.array([_macro(row) for row in boot]))
    result["macro"] = {"auroc": macro_auroc(per_class), "ci_low": low, "ci_high": high}
    return result


def paired_difference(labels: np.ndarray, scores: np.ndarray, baseline_scores: np.ndarray, classes: Sequence[str],
                      resamples: int, seed: int) -> dict:
    """Macro and per-class AUROC of an arm minus the baseline's (the real-only arm) on the same test images,
    with paired bootstrap 95% intervals, and the gap as a fraction of the baseline (Packhaeuser's form:
    (baseline - arm) / baseline, so 0.035 means the arm came within 3.5% of the real-only classifier)."""
    arm = per_label_auroc(labels, scores, classes)
    base = per_label_auroc(labels, baseline_scores, classes)
    truth = np.asarray(labels).astype(bool)
    scores, baseline_scores = np.asarray(scores, dtype=np.float64), np.asarray(baseline_scores, dtype=np.float64)
    deltas = np.array([_auroc_columns(truth[rows], scores[rows]) - _auroc_columns(truth[rows], baseline_scores[rows])
                       for rows in _draws(len(truth), resamples, seed)])
    per_class = {}
    for column, name in enumerate(classes):
        low, high = _interval(deltas[:, column])
        point = None if arm[name] is None or base[name] is None else arm[name] - base[name]
        per_class[name] = {"difference": point, "ci_low": low, "ci_high": high}
    macro_arm, macro_base = macro_auroc(arm), macro_auroc(base)
    low, high = _interval(np.array([_macro(row) for row in deltas]))
    difference = None if macro_arm is None or macro_base is None else macro_arm - macro_base
    gap = None if difference is None or not macro_base else -difference / macro_base
    return {"per_class": per_class, "macro": {"difference": difference, "ci_low": low, "ci_high": high},
            "gap_fraction": gap}

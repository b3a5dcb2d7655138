"""Does a generated image show the findings it was conditioned on? Scores from a classifier run on the images.

``labels`` are the conditioning findings (0/1 per finding), ``scores``/``probs`` a classifier's outputs on the
generated images, one column per finding in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def _binary_matrix(values: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(values)
    if matrix.ndim != 2:
        raise ValueError(f"{name}: expected an (n, c) matrix with one column per finding, got shape {matrix.shape}")
    if not np.isin(matrix, (0, 1)).all():
        raise ValueError(f"{name}: must hold only 0/1 values; threshold probabilities before passing them as labels")
    return matrix.astype(bool)


def _score_matrix(values: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.shape != shape:
        raise ValueError(f"{name}: shape {matrix.shape} does not match the labels' {shape}; "
                         "rows must be the same images and columns the same findings, in the same order")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name}: contains NaN or inf; check the classifier's output")
    return matrix


def per_label_auroc(labels: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    """AUROC of each score column against its label column, keyed by ``names``; None where a column has one class."""
    truth = _binary_matrix(labels, "labels")
    predicted = _score_matrix(scores, "scores", truth.shape)
    if len(names) != truth.shape[1] or len(set(names)) != len(names):
        raise ValueError(f"names: need {truth.shape[1]} distinct names (one per column), got {list(names)}")
    result: dict[str, float | None] = {}
    for column, name in enumerate(names):
        has_both_classes = truth[:, column].any() and not truth[:, column].all()
        result[name] = float(roc_auc_score(truth[:, column], predicted[:, column])) if has_both_classes else None
    return result


def macro_auroc(per_label: dict[str, float | None]) -> float | None:
    """Mean of the defined per-label AUROCs; None when no label has both classes."""
    defined = [value for value in per_label.values() if value is not None]
    return float(np.mean(defined)) if defined else None


def label_agreement(reference_labels: np.ndarray, predicted_probs: np.ndarray,
                    threshold: float = 0.5) -> dict[str, float]:
    """How well thresholded predictions reproduce the reference finding sets, row by row.

    Returns ``exact_match`` (share of rows with every finding right), ``mean_label_accuracy`` (per-finding accuracy,
    averaged over findings) and ``mean_jaccard`` (|A & B| / |A | B| of the positive sets; two empty sets count as
    1, since "no finding" reproduced as "no finding" is a perfect match).
    """
    truth = _binary_matrix(reference_labels, "reference_labels")
    predicted = _score_matrix(predicted_probs, "predicted_probs", truth.shape) >= threshold
    if len(truth) == 0:
        raise ValueError("reference_labels: no rows; pass at least one image")
    agree = truth == predicted
    intersection = (truth & predicted).sum(axis=1)
    union = (truth | predicted).sum(axis=1)
    jaccard = np.divide(intersection, union, out=np.ones(len(truth)), where=union > 0)
    return {
        "exact_match": float(agree.all(axis=1).mean()),
        "mean_label_accuracy": float(agree.mean(axis=0).mean()),
        "mean_jaccard": float(jaccard.mean()),
    }

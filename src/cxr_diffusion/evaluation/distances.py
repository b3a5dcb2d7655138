"""Distances between two sets of image features (FD, KID), with bootstrap intervals and a real-vs-real floor.

Every function takes (n, d) feature matrices from one extractor; which extractor is the caller's choice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def as_feature_matrix(features: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    """Check ``features`` is a finite (n, d) matrix with at least ``min_rows`` rows; return it as float64."""
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name}: expected an (n, d) feature matrix, got shape {matrix.shape}; "
                         "flatten or pool the features to one row per image first")
    if matrix.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {matrix.shape[0]}; pass more images")
    if not np.isfinite(matrix).all():
        bad = int((~np.isfinite(matrix)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} row(s) contain NaN or inf; check the feature extractor's input")
    return matrix


def _matching_pair(features_a: np.ndarray, features_b: np.ndarray, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    a = as_feature_matrix(features_a, "features_a", min_rows)
    b = as_feature_matrix(features_b, "features_b", min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimension mismatch: features_a has d={a.shape[1]}, features_b has d={b.shape[1]}; "
                         "both sets must come from the same extractor and layer")
    return a, b


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (eigenvalues below zero from rounding are clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _trace_sqrt_product(centered_a: np.ndarray, centered_b: np.ndarray) -> float:
    """Tr(sqrtm(Ca @ Cb)) for Ca = Xa^T Xa, Cb = Xb^T Xb (rows already centred and scaled by 1/sqrt(n - 1)).

    The eigenvalues of Ca @ Cb are the squared singular values of Xa @ Xb^T (n_a x n_b), and also of
    Ca^1/2 @ Cb^1/2 (d x d), so the trace is a nuclear norm: exact, real, defined for singular
    covariances (fewer samples than dimensions), and it takes the smaller of the two matrices, which keeps
    bootstrap intervals over 1024- or 2048-d features cheap. No sqrtm, no ridge, no complex rounding.
    """
    if min(centered_a.shape[0], centered_b.shape[0]) <= centered_a.shape[1]:
        cross = centered_a @ centered_b.T
    else:
        cross = _psd_sqrt(centered_a.T @ centered_a) @ _psd_sqrt(centered_b.T @ centered_b)
    return float(np.linalg.svd(cross, compute_uv=False).sum())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (n, d) sets: ||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 sqrt(Ca Cb)).

    Computed in float64 with unbiased covariances. May be a tiny negative number for identical sets (rounding).
    """
    a, b = _matching_pair(features_a, features_b, min_rows=2)
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    centered_a = (a - a.mean(axis=0)) / np.sqrt(a.shape[0] - 1)
    centered_b = (b - b.mean(axis=0)) / np.sqrt(b.shape[0] - 1)
    traces = float(np.sum(centered_a ** 2) + np.sum(centered_b ** 2))
    return mean_term + traces - 2.0 * _trace_sqrt_product(centered_a, centered_b)


def _unbiased_mmd2_cubic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3: kernel means over distinct pairs within each set."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, subset_size: int = 100,
                              subsets: int = 20, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of unbiased MMD^2 (cubic polynomial kernel) over random subsets.

    Each subset draws ``subset_size`` rows without replacement from each set; ``subset_size`` is capped at
    min(n_a, n_b). The std is the sample std (ddof=1) across subsets, 0.0 for a single subset.
    """
    a, b = _matching_pair(features_a, features_b, min_rows=2)
    if subset_size < 2 or subsets < 1:
        raise ValueError(f"kernel_inception_distance: need subset_size >= 2 and subsets >= 1, "
                         f"got subset_size={subset_size}, subsets={subsets}")
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = np.array([
        _unbiased_mmd2_cubic(a[rng.choice(a.shape[0], size, replace=False)],
                             b[rng.choice(b.shape[0], size, replace=False)])
        for _ in range(subsets)
    ])
    spread = float(values.std(ddof=1)) if subsets > 1 else 0.0
    return float(values.mean()), spread


def bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], float], a: np.ndarray, b: np.ndarray,
                       n_boot: int = 200, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(a, b)``, resampling the rows of each set with replacement.

    Resampling with replacement duplicates rows, which biases set distances such as FD upward; read the interval
    as the spread of the statistic, and compare intervals of models computed the same way.
    """
    if n_boot < 2:
        raise ValueError(f"bootstrap_interval: n_boot must be >= 2, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_interval: level must be in (0, 1), got {level}")
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"bootstrap_interval: both sets need rows, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = np.array([
        statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(n_boot)
    ], dtype=np.float64)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def real_vs_real_floor(real: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of ``size`` rows each from ``real``: a metric on them is the floor a model can reach.

    Compare a model's score on ``size`` generated rows with the floor at the same ``size``: FD and PRDC depend on n.
    """
    real = np.asarray(real)
    if size < 1:
        raise ValueError(f"real_vs_real_floor: size must be >= 1, got {size}")
    if 2 * size > len(real):
        raise ValueError(f"real_vs_real_floor: two disjoint halves of {size} rows need {2 * size} real rows, "
                         f"got {len(real)}; lower size to at most {len(real) // 2}")
    order = np.random.default_rng(seed).permutation(len(real))
    return real[order[:size]], real[order[size:2 * size]]

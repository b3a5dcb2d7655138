"""Precision, recall, density and coverage of generated features against real ones (Naeem et al., 2020).

Each real point x_i gets a ball of radius r_i = distance to its k-th nearest other real point.
- precision: share of fake points inside at least one real ball (fidelity);
- recall: share of real points inside at least one fake ball, fake radii from the fake set's own k-NN (diversity);
- density: mean number of real balls holding a fake point, divided by k (about 1 when fake ~ real);
- coverage: share of real balls that hold at least one fake point.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.metrics import pairwise_distances

from cxr_diffusion.evaluation.distances import as_feature_matrix

# Query rows per distance block: 2048 x 10k points in float64 is 160 MB.
BLOCK_ROWS = 2048


def _distance_blocks(queries: np.ndarray, reference: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Euclidean distances from blocks of query rows to every reference row.

    Radii and cross distances both come from here, so equal inputs give bit-equal distances: a fake point that is
    exactly a real point's k-th neighbour then lands exactly on that ball's edge (inside), not a rounding away.
    """
    for start in range(0, len(queries), BLOCK_ROWS):
        rows = slice(start, min(start + BLOCK_ROWS, len(queries)))
        yield rows, pairwise_distances(queries[rows], reference)


def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest *other* point of the same set."""
    radii = np.empty(len(points))
    for rows, distances in _distance_blocks(points, points):
        # Exclude each point's distance to itself by position, so duplicates elsewhere in the set still count.
        distances[np.arange(len(distances)), np.arange(rows.start, rows.stop)] = np.inf
        radii[rows] = np.partition(distances, k - 1, axis=1)[:, k - 1]
    return radii


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """PRDC of ``fake`` against ``real`` (both (n, d) features); returns keys precision, recall, density, coverage.

    With fake an exact copy of real, density is (k + 1) / k, not 1: each copied point also sits in its own ball.
    """
    if k < 1:
        raise ValueError(f"precision_recall_density_coverage: k must be >= 1, got {k}")
    real = as_feature_matrix(real, "real", min_rows=k + 1)
    fake = as_feature_matrix(fake, "fake", min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimension mismatch: real has d={real.shape[1]}, fake has d={fake.shape[1]}; "
                         "both sets must come from the same extractor")
    real_radii = _knn_radii(real, k)
    fake_radii = _knn_radii(fake, k)

    fake_in_any_real_ball = np.zeros(len(fake), dtype=bool)
    real_balls_per_fake = np.zeros(len(fake), dtype=np.int64)
    real_in_any_fake_ball = np.zeros(len(real), dtype=bool)
    real_ball_holds_fake = np.zeros(len(real), dtype=bool)
    # Real points as the query rows, as in _knn_radii(real): the real balls' edges are then tested bit-consistently.
    for rows, distances in _distance_blocks(real, fake):  # distances: (block of real, all fake)
        inside_real_ball = distances <= real_radii[rows, None]
        fake_in_any_real_ball |= inside_real_ball.any(axis=0)
        real_balls_per_fake += inside_real_ball.sum(axis=0)
        real_ball_holds_fake[rows] = inside_real_ball.any(axis=1)
        real_in_any_fake_ball[rows] = (distances <= fake_radii[None, :]).any(axis=1)

    return {
        "precision": float(fake_in_any_real_ball.mean()),
        "recall": float(real_in_any_fake_ball.mean()),
        "density": float(real_balls_per_fake.sum() / (k * len(fake))),
        "coverage": float(real_ball_holds_fake.mean()),
    }

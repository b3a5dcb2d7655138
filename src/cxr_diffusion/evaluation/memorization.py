"""Does the model copy its training images? Nearest-train-neighbour distances of generated vs held-out real images.

A real test image is never a copy, so the distances from real test images to their nearest training image set
the scale: a generated image closer to the training set than all but ``percentile`` % of real test images is a
candidate copy, and the closest pairs are what a person should look at.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr_diffusion.evaluation.distances import as_feature_matrix

# Pairs listed in the report, enough for a 4x4 grid of generated/train pairs.
CLOSEST_PAIRS = 16


def nearest_neighbour_distances(queries: np.ndarray, reference: np.ndarray,
                                batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest reference row, and that row's index (exact, batched).

    The nearest row is found with the fast ||q||^2 + ||r||^2 - 2 q.r form in float64; its distance is then
    recomputed from the difference, so an exact copy reports 0.0 rather than rounding noise.
    """
    queries = as_feature_matrix(queries, "queries")
    reference = as_feature_matrix(reference, "reference")
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(f"feature dimension mismatch: queries have d={queries.shape[1]}, "
                         f"reference has d={reference.shape[1]}; embed both with the same extractor")
    if batch < 1:
        raise ValueError(f"nearest_neighbour_distances: batch must be >= 1, got {batch}")
    reference_norms = np.einsum("ij,ij->i", reference, reference)
    indices = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), batch):
        block = queries[start:start + batch]
        # ||q||^2 is the same for every reference row, so it does not change the argmin.
        squared = reference_norms[None, :] - 2.0 * block @ reference.T
        indices[start:start + batch] = squared.argmin(axis=1)
    distances = np.linalg.norm(queries - reference[indices], axis=1)
    return distances, indices


def memorization_report(generated: np.ndarray, train: np.ndarray, real_test: np.ndarray,
                        percentile: float = 1.0) -> dict[str, Any]:
    """Compare generated-to-train nearest-neighbour distances with real-test-to-train ones.

    Returns plain JSON types: ``threshold`` (the ``percentile``-th percentile of real-test-to-train distances),
    ``fraction_at_or_below_threshold`` of generated images, both medians, and ``closest_pairs``: the 16 closest
    (generated, train) index pairs, nearest first. "At or below" so that exact copies still count when the
    test set itself has a duplicate of a training image (threshold 0).
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"memorization_report: percentile must be in [0, 100], got {percentile}")
    test_distances, _ = nearest_neighbour_distances(real_test, train)
    generated_distances, generated_neighbours = nearest_neighbour_distances(generated, train)
    threshold = float(np.percentile(test_distances, percentile))
    closest = np.argsort(generated_distances, kind="stable")[:CLOSEST_PAIRS]
    return {
        "percentile": float(percentile),
        "threshold": threshold,
        "fraction_at_or_below_threshold": float(np.mean(generated_distances <= threshold)),
        "median_generated_nn_distance": float(np.median(generated_distances)),
        "median_real_test_nn_distance": float(np.median(test_distances)),
        "closest_pairs": [
            {"generated": int(g), "train": int(generated_neighbours[g]), "distance": float(generated_distances[g])}
            for g in closest
        ],
    }

"""Evaluation metrics on cases whose answer is known: identical sets, shifted sets, copies, perfect classifiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from cxr_diffusion.evaluation.distances import (
    bootstrap_interval,
    frechet_distance,
    kernel_inception_distance,
    real_vs_real_floor,
)
from cxr_diffusion.evaluation.diversity import (
    STANDARD_BETAS,
    ms_ssim_settings,
    pairwise_ms_ssim,
    same_condition_pairs,
)
from cxr_diffusion.evaluation.faithfulness import label_agreement, macro_auroc, per_label_auroc
from cxr_diffusion.evaluation.memorization import memorization_report, nearest_neighbour_distances
from cxr_diffusion.evaluation.pca_plot import pca_scatter
from cxr_diffusion.evaluation.prdc import precision_recall_density_coverage


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.mean() - b.mean())


# --- Frechet distance -------------------------------------------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = gaussian(500, 16, seed=0)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_mean_shift_is_dimension_times_shift_squared():
    d, shift = 8, 1.0
    fd = frechet_distance(gaussian(5000, d, seed=0), gaussian(5000, d, seed=1, shift=shift))
    assert fd == pytest.approx(d * shift**2, rel=0.05)


def test_frechet_distance_is_symmetric():
    a, b = gaussian(400, 6, seed=0), gaussian(300, 6, seed=1, shift=0.3, scale=2.0)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_with_fewer_rows_than_dimensions_stays_finite_and_near_zero_for_one_set():
    features = gaussian(10, 32, seed=0)  # rank-9 covariance: singular, where sqrtm-based FD needs a ridge
    fd = frechet_distance(features, features)
    assert np.isfinite(fd)
    assert abs(fd) < 1e-4 * np.trace(np.cov(features, rowvar=False))


def test_frechet_distance_both_trace_routes_agree_with_the_definition():
    """Tr sqrtm(Ca Cb) via the n x n cross product (n <= d) and via the d x d roots (n > d) equal the textbook
    sqrtm formula on well-conditioned sets."""
    import scipy.linalg

    from cxr_diffusion.evaluation.distances import _trace_sqrt_product

    a, b = gaussian(60, 24, seed=0), gaussian(50, 24, seed=1, shift=0.5, scale=1.5)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real
    centered = lambda x: (x - x.mean(0)) / np.sqrt(len(x) - 1)  # noqa: E731
    assert _trace_sqrt_product(centered(a), centered(b)) == pytest.approx(expected, rel=1e-9)  # n > d route
    assert _trace_sqrt_product(centered(a[:20]), centered(b[:20])) == pytest.approx(
        np.trace(scipy.linalg.sqrtm(np.cov(a[:20], rowvar=False) @ np.cov(b[:20], rowvar=False))).real, rel=1e-6)


def test_frechet_distance_rejects_a_feature_dimension_mismatch():
    with pytest.raises(ValueError, match="dimension mismatch"):
        frechet_distance(gaussian(10, 4, seed=0), gaussian(10, 5, seed=1))


def test_frechet_distance_rejects_a_single_row():
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(gaussian(1, 4, seed=0), gaussian(10, 4, seed=1))


# --- KID ---------------------------------------------------------------------------------------------------------

def test_kid_of_samples_from_one_distribution_is_near_zero():
    mean, _ = kernel_inception_distance(gaussian(1000, 8, seed=0), gaussian(1000, 8, seed=1))
    assert abs(mean) < 0.05


def test_kid_of_shifted_samples_is_clearly_positive():
    mean, spread = kernel_inception_distance(gaussian(1000, 8, seed=0), gaussian(1000, 8, seed=1, shift=1.0))
    assert mean > 1.0 and mean > 3 * spread


def test_kid_caps_the_subset_size_at_the_smaller_set():
    mean, spread = kernel_inception_distance(gaussian(30, 4, seed=0), gaussian(500, 4, seed=1), subset_size=100)
    assert np.isfinite(mean) and np.isfinite(spread)


# --- Bootstrap and real-vs-real floor ----------------------------------------------------------------------------

def test_bootstrap_interval_contains_the_point_estimate():
    a, b = gaussian(300, 3, seed=0), gaussian(300, 3, seed=1, shift=0.5)
    low, high = bootstrap_interval(mean_difference, a, b)
    assert low <= mean_difference(a, b) <= high


def test_bootstrap_interval_narrows_as_n_grows():
    small = bootstrap_interval(mean_difference, gaussian(100, 3, seed=0), gaussian(100, 3, seed=1))
    large = bootstrap_interval(mean_difference, gaussian(1600, 3, seed=0), gaussian(1600, 3, seed=1))
    assert (large[1] - large[0]) < 0.5 * (small[1] - small[0])  # ~1/4 expected: width ~ 1/sqrt(n)


def test_bootstrap_interval_is_reproducible_for_a_seed():
    a, b = gaussian(100, 3, seed=0), gaussian(100, 3, seed=1)
    assert bootstrap_interval(mean_difference, a, b, seed=7) == bootstrap_interval(mean_difference, a, b, seed=7)


def test_real_vs_real_floor_returns_two_disjoint_halves_of_the_requested_size():
    real = np.arange(50, dtype=np.float64).reshape(25, 2)  # every row unique, so rows identify themselves
    first, second = real_vs_real_floor(real, size=10, seed=3)
    assert first.shape == second.shape == (10, 2)
    assert not set(map(tuple, first)) & set(map(tuple, second))


def test_real_vs_real_floor_rejects_a_size_larger_than_half_the_set():
    with pytest.raises(ValueError, match="at most 12"):
        real_vs_real_floor(np.zeros((25, 2)), size=13)


# --- PRDC --------------------------------------------------------------------------------------------------------

def test_prdc_of_a_set_against_its_copy_is_perfect_with_density_k_plus_one_over_k():
    real = gaussian(400, 8, seed=0)
    scores = precision_recall_density_coverage(real, real.copy(), k=5)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert scores["density"] == pytest.approx(6 / 5)  # each copy also sits in its own real ball


def test_prdc_of_samples_from_the_real_distribution_is_near_one():
    scores = precision_recall_density_coverage(gaussian(2000, 8, seed=0), gaussian(2000, 8, seed=1), k=5)
    for name in ("precision", "recall", "density", "coverage"):
        assert scores[name] == pytest.approx(1.0, abs=0.1), name


def test_prdc_of_fake_far_from_real_has_zero_precision_and_coverage():
    scores = precision_recall_density_coverage(gaussian(300, 4, seed=0), gaussian(300, 4, seed=1, shift=100.0))
    assert scores["precision"] == 0.0
    assert scores["coverage"] == 0.0


def test_prdc_of_a_tight_cluster_inside_real_has_high_precision_and_low_recall():
    scores = precision_recall_density_coverage(gaussian(1000, 2, seed=0), gaussian(300, 2, seed=1, scale=0.05))
    assert scores["precision"] > 0.9
    assert scores["recall"] < 0.1


# --- MS-SSIM diversity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
def test_ms_ssim_of_an_image_with_itself_is_one(size):
    images = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    assert pairwise_ms_ssim(images, [(0, 0), (1, 1)], pairs_per_batch=64) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("size", [32, 64])
def test_ms_ssim_of_independent_noise_images_is_far_below_one(size):
    images = torch.rand(6, 1, size, size, generator=torch.Generator().manual_seed(0))
    assert pairwise_ms_ssim(images, [(0, 1), (2, 3), (4, 5)], pairs_per_batch=64) < 0.3


def test_ms_ssim_uses_the_standard_five_scales_and_11_px_window_on_large_images():
    settings = ms_ssim_settings(256, 256)
    assert settings.kernel_size == 11
    assert settings.betas == pytest.approx(tuple(beta / sum(STANDARD_BETAS) for beta in STANDARD_BETAS))


def test_ms_ssim_rejects_images_outside_zero_one():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pairwise_ms_ssim(torch.full((2, 1, 32, 32), -0.5), [(0, 1)], pairs_per_batch=64)


def test_same_condition_pairs_pair_different_images_with_one_condition():
    conditions = ["effusion", "none", "effusion", "mass", "effusion", "none"]
    pairs = same_condition_pairs(conditions, max_pairs=100, seed=0)
    assert pairs == [(0, 2), (0, 4), (1, 5), (2, 4)]  # every such pair, sorted; "mass" has no partner


def test_same_condition_pairs_draws_at_most_max_pairs_reproducibly():
    conditions = [index % 3 for index in range(300)]
    pairs = same_condition_pairs(conditions, max_pairs=50, seed=1)
    assert len(set(pairs)) == 50
    assert all(i < j and conditions[i] == conditions[j] for i, j in pairs)
    assert pairs == same_condition_pairs(conditions, max_pairs=50, seed=1)


# --- Memorization ------------------------------------------------------------------------------------------------

def test_nearest_neighbour_distances_match_brute_force_across_batches():
    queries, reference = gaussian(50, 5, seed=0), gaussian(80, 5, seed=1)
    distances, indices = nearest_neighbour_distances(queries, reference, batch=7)
    brute = cdist(queries, reference)
    np.testing.assert_array_equal(indices, brute.argmin(axis=1))
    np.testing.assert_allclose(distances, brute.min(axis=1), rtol=1e-12)


def test_copied_train_images_have_zero_distance_and_count_as_memorized():
    train, real_test = gaussian(1000, 16, seed=0), gaussian(1000, 16, seed=1)
    copied_rows = np.arange(0, 1000, 20)  # 50 copies among 500 generated: a 10% share
    generated = np.concatenate([train[copied_rows], gaussian(450, 16, seed=2)])
    report = memorization_report(generated, train, real_test, percentile=1.0)
    assert report["fraction_at_or_below_threshold"] >= 0.1
    closest = report["closest_pairs"]
    assert len(closest) == 16
    assert all(pair["distance"] == 0.0 for pair in closest)
    assert all(pair["train"] == copied_rows[pair["generated"]] for pair in closest)


def test_fresh_samples_fall_below_the_threshold_at_about_the_percentile_rate():
    train, real_test, generated = gaussian(1000, 4, seed=0), gaussian(4000, 4, seed=1), gaussian(4000, 4, seed=2)
    report = memorization_report(generated, train, real_test, percentile=5.0)
    assert report["fraction_at_or_below_threshold"] == pytest.approx(0.05, abs=0.02)


# --- Faithfulness ------------------------------------------------------------------------------------------------

LABELS = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [1, 0], [0, 1]])


def test_auroc_of_perfect_scores_is_one():
    assert per_label_auroc(LABELS, LABELS * 0.8 + 0.1, ["a", "b"]) == {"a": 1.0, "b": 1.0}


def test_auroc_of_reversed_scores_is_zero():
    assert per_label_auroc(LABELS, 1.0 - LABELS, ["a", "b"]) == {"a": 0.0, "b": 0.0}


def test_auroc_of_random_scores_is_about_one_half():
    rng = np.random.default_rng(0)
    result = per_label_auroc(rng.integers(0, 2, size=(20000, 1)), rng.random((20000, 1)), ["a"])
    assert result["a"] == pytest.approx(0.5, abs=0.02)


def test_auroc_of_a_single_class_column_is_none_and_left_out_of_the_macro_mean():
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    result = per_label_auroc(labels, labels.astype(float), ["a", "b"])
    assert result == {"a": 1.0, "b": None}
    assert macro_auroc(result) == 1.0


def test_macro_auroc_is_none_when_no_label_is_defined():
    assert macro_auroc({"a": None, "b": None}) is None


def test_label_agreement_of_identical_labels_is_perfect():
    assert label_agreement(LABELS, LABELS.astype(float)) == {
        "exact_match": 1.0, "mean_label_accuracy": 1.0, "mean_jaccard": 1.0}


def test_label_agreement_scores_a_half_right_row():
    result = label_agreement(np.array([[1, 1, 0], [0, 0, 0]]), np.array([[0.9, 0.2, 0.1], [0.0, 0.4, 0.3]]))
    assert result["exact_match"] == 0.5
    assert result["mean_label_accuracy"] == pytest.approx(5 / 6)
    assert result["mean_jaccard"] == pytest.approx((0.5 + 1.0) / 2)  # the empty/empty row counts as 1


# --- PCA plot ----------------------------------------------------------------------------------------------------

def test_pca_scatter_writes_a_png_and_leaves_no_temp_file(tmp_path: Path):
    target = tmp_path / "pca.png"
    written = pca_scatter(gaussian(100, 6, seed=0), gaussian(80, 6, seed=1, shift=1.0), "real vs generated", target)
    assert written == target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["pca.png"]

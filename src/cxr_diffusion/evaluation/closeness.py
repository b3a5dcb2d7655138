"""How close the generations are to real images: distances in evaluator features beside their real-vs-real
floor at the same size, Inception FID where its weights are configured, the untrained baseline, and PRDC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cxr_diffusion.config import EvaluateConfig
from cxr_diffusion.evaluation.distances import (
    bootstrap_interval, frechet_distance, kernel_inception_distance, real_vs_real_floor,
)
from cxr_diffusion.evaluation.inception_fid import reference_compatible_fid, standard_fid
from cxr_diffusion.evaluation.prdc import precision_recall_density_coverage


@dataclass(frozen=True)
class RealFloor:
    """Two disjoint sets of real features of one size: a distance between them is the floor a model can reach."""

    first: np.ndarray
    second: np.ndarray

    @property
    def size(self) -> int:
        return len(self.first)


def real_floor(test_features: np.ndarray, val_features: np.ndarray, generated_count: int, seed: int) -> RealFloor:
    """The floor sets drawn from the real test and val features pooled: as large as the generated set where
    the pool has twice as many, else half the pool."""
    pool = np.concatenate([test_features, val_features])
    first, second = real_vs_real_floor(pool, min(generated_count, len(pool) // 2), seed=seed)
    return RealFloor(first, second)


def closeness_metrics(generated_features: np.ndarray, test_features: np.ndarray, floor: RealFloor,
                      config: EvaluateConfig, seed: int) -> dict:
    """Frechet distance and KID of the generations to the real test split, and both at the floor's size
    beside the real-vs-real floor."""
    matched = floor.size
    fd_matched = frechet_distance(generated_features[:matched], floor.first)
    fd_floor = frechet_distance(floor.first, floor.second)
    subset = min(config.kid_subset, len(generated_features), len(test_features), matched)
    kid_mean, kid_std = kernel_inception_distance(generated_features, test_features, subset_size=subset, seed=seed)
    fd_interval = bootstrap_interval(frechet_distance, generated_features, test_features, n_boot=config.bootstrap,
                                     seed=seed)
    return {
        "domain_fd": frechet_distance(generated_features, test_features),
        "domain_fd_95ci": [float(fd_interval[0]), float(fd_interval[1])],
        "domain_fd_matched": fd_matched,
        "real_vs_real_fd_floor": fd_floor,
        "domain_fd_ratio_to_floor": fd_matched / max(fd_floor, 1e-12),
        "matched_size": matched,
        "kid": kid_mean, "kid_std": kid_std,
        "real_vs_real_kid_floor": kernel_inception_distance(floor.first, floor.second,
                                                            subset_size=min(subset, matched), seed=seed)[0],
    }


def inception_fid_metrics(config: EvaluateConfig, generated: Dataset, real_test: Dataset, real_train: Dataset,
                          image_size: int, device: torch.device) -> dict:
    """Standard FID (against the test split) and reference-compatible FID (against the train split): each value,
    null with the reason where its weights are not configured, and its details."""
    metrics = {}
    for name, result in (
        ("inception_fid", standard_fid(config, generated, real_test, image_size, device)),
        ("reference_compatible_fid", reference_compatible_fid(config, generated, real_train, image_size, device)),
    ):
        metrics[name] = result.pop("value")
        metrics[f"{name}_details"] = result
    return metrics


def untrained_closeness(untrained_features: np.ndarray, generated_features: np.ndarray, floor: RealFloor) -> dict:
    """Frechet distance of an untrained model's generations to real images, beside the trained model's at the
    same size (the untrained set's): what training bought."""
    count = len(untrained_features)
    reference = floor.first[:count]
    return {
        "untrained_fd_matched": frechet_distance(untrained_features, reference),
        "trained_fd_same_size": frechet_distance(generated_features[:count], reference),
        "untrained_size": count,
    }


def prdc_metrics(real_features: np.ndarray, generated_features: np.ndarray, k: int) -> dict:
    """PRDC with k capped by the set sizes (tiny profiles have few images), and the k used."""
    k = max(1, min(k, len(real_features) - 1, len(generated_features) - 1))
    return {**precision_recall_density_coverage(real_features, generated_features, k=k), "k": k}

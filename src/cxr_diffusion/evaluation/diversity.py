"""Within-condition diversity: mean MS-SSIM between different generated images that share a condition.

High MS-SSIM between samples of one prompt means the model collapses to one image per condition.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

# Wang et al. (2003) scale weights, finest first; torchmetrics' default for 5 scales.
STANDARD_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
STANDARD_KERNEL = 11
# Smallest SSIM window we accept: below 7 px the local statistics come from too few pixels to mean much.
MIN_KERNEL = 7


@dataclass(frozen=True)
class MsSsimSettings:
    betas: tuple[float, ...]
    kernel_size: int


def ms_ssim_settings(height: int, width: int) -> MsSsimSettings:
    """Scales and window for MS-SSIM on images of this size.

    Rule: use the most scales (at most the standard 5) for which the coarsest scale, side / 2^(scales - 1), still
    fits an odd window of at least 7 px; the window is the largest odd size <= 11 that fits it (and passes
    torchmetrics' own size check, side // (scales - 1)^2 > window - 1). The first ``scales`` standard betas are
    kept and renormalised to sum to 1, so the score stays on SSIM's scale. 176 px and up give the standard
    5 scales with an 11 px window; 128 px: 5 scales, 7 px; 64 px: 4 scales, 7 px; 32 px: 3 scales, 7 px.
    """
    side = min(height, width)
    for scales in range(len(STANDARD_BETAS), 0, -1):
        fits_coarsest = side // 2 ** (scales - 1)
        fits_torchmetrics_check = side // max(1, scales - 1) ** 2  # window must be < this + 1
        window = min(STANDARD_KERNEL, fits_coarsest, fits_torchmetrics_check)
        window -= 1 - window % 2  # round down to odd
        if window >= MIN_KERNEL and side >= 2 ** scales:
            kept = STANDARD_BETAS[:scales]
            total = sum(kept)
            return MsSsimSettings(betas=tuple(beta / total for beta in kept), kernel_size=window)
    raise ValueError(f"MS-SSIM needs images of at least {MIN_KERNEL}x{MIN_KERNEL} px, got {height}x{width}; "
                     "score larger images")


def pairwise_ms_ssim(images: torch.Tensor, pairs: Sequence[tuple[int, int]], *, pairs_per_batch: int) -> float:
    """Mean MS-SSIM over ``pairs`` of rows of ``images`` ((n, 1 or 3, H, W), values in [0, 1]).

    Scored ``pairs_per_batch`` pairs per call to torchmetrics: its float64 convolutions hold ~20 MB per
    pair of 64x64 images (im2col buffers), so this bounds the memory; the mean does not depend on it.
    """
    if pairs_per_batch < 1:
        raise ValueError(f"pairwise_ms_ssim: pairs_per_batch must be >= 1, got {pairs_per_batch}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"pairwise_ms_ssim: expected images of shape (n, 1 or 3, H, W), got {tuple(images.shape)}")
    if not pairs:
        raise ValueError("pairwise_ms_ssim: no pairs given; a condition needs at least two images to score diversity")
    images = images.detach().to(torch.float64)
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"pairwise_ms_ssim: images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                         "map [-1, 1] model output with (x + 1) / 2 first")
    index = torch.as_tensor(pairs, dtype=torch.long)
    if index.ndim != 2 or index.shape[1] != 2:
        raise ValueError("pairwise_ms_ssim: pairs must be (i, j) index tuples")
    if int(index.min()) < 0 or int(index.max()) >= len(images):
        raise ValueError(f"pairwise_ms_ssim: pair indices must be in [0, {len(images) - 1}], "
                         f"got [{int(index.min())}, {int(index.max())}]")
    settings = ms_ssim_settings(images.shape[2], images.shape[3])
    scores = []
    for start in range(0, len(index), pairs_per_batch):
        batch = index[start:start + pairs_per_batch]
        scores.append(multiscale_structural_similarity_index_measure(
            images[batch[:, 0]], images[batch[:, 1]], data_range=1.0, reduction="none",
            betas=settings.betas, kernel_size=settings.kernel_size))
    return float(torch.cat(scores).mean())


def same_condition_pairs(condition_ids: Sequence[Hashable], max_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` index pairs (i < j) of different images with the same condition id, drawn uniformly.

    All pairs come back when there are no more than ``max_pairs``; the result is sorted, so it reads the same
    for a given seed. Pairs are drawn by number, never listed, so a condition with 100k images costs no memory.
    """
    if max_pairs < 1:
        raise ValueError(f"same_condition_pairs: max_pairs must be >= 1, got {max_pairs}")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for position, condition in enumerate(condition_ids):
        groups[condition].append(position)
    members = [np.asarray(group) for group in groups.values() if len(group) >= 2]
    pair_counts = np.array([len(group) * (len(group) - 1) // 2 for group in members], dtype=np.int64)
    total = int(pair_counts.sum())
    if total == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = np.arange(total) if total <= max_pairs else np.sort(rng.choice(total, size=max_pairs, replace=False))
    group_starts = np.concatenate([[0], np.cumsum(pair_counts)])
    group_of = np.searchsorted(group_starts, chosen, side="right") - 1
    pairs: list[tuple[int, int]] = []
    for group_index in np.unique(group_of):
        numbers = chosen[group_of == group_index] - group_starts[group_index]
        first, second = _triangular_pairs(numbers, len(members[group_index]))
        group = members[group_index]
        pairs.extend(zip(group[first].tolist(), group[second].tolist()))
    return sorted(pairs)


def _triangular_pairs(numbers: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b), a < b < size, at positions ``numbers`` of the strict upper triangle read row by row."""
    # Row a holds size - 1 - a pairs; a pair's row is the last one whose first position is <= its number.
    rows = np.arange(size - 1, dtype=np.int64)
    row_starts = rows * size - rows * (rows + 1) // 2
    first = np.searchsorted(row_starts, numbers, side="right") - 1
    return first, first + 1 + numbers - row_starts[first]

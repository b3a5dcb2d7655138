"""Images of the utility study as the arms see them: a seeded subset of the real train split, a whole split,
or a generated set, read from prepare-format shards into small uint8 tensors at the classifier's side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.utility.arms import ArmImages, to_uint8


def train_subset(images: PreparedImages, count: int, seed: int) -> list[int]:
    """Positions of ``count`` images drawn at random (seeded) from a split, or all of them when it holds
    fewer, in storage order (reads go row group by row group)."""
    if count >= len(images):
        return list(range(len(images)))
    return sorted(np.random.default_rng(seed).choice(len(images), size=count, replace=False).tolist())


def classifier_side(image_size: int, max_image_size: int) -> int:
    """The side a classifier sees: the prepared side, area-averaged down to ``max_image_size`` when larger."""
    return min(image_size, max_image_size)


def read_arm_images(images: PreparedImages, positions: Sequence[int], side: int, what: str) -> ArmImages:
    """Images ``positions`` of ``images`` as grayscale uint8 at ``side`` (area-averaged down), with their labels.
    Memory: ``len(positions) x side^2`` bytes (nih-512, 20k images at 256 px: 1.3 GB)."""
    pixels = torch.empty((len(positions), 1, side, side), dtype=torch.uint8)
    for row, position in enumerate(tqdm(positions, desc=f"read {what}", unit="img")):
        gray = images[position]["pixel_values"][:1].unsqueeze(0)
        if gray.shape[-1] != side:
            gray = F.interpolate(gray, size=(side, side), mode="area")
        pixels[row] = to_uint8(gray[0])
    return ArmImages(pixels, images.labels[list(positions)].astype(np.int64))

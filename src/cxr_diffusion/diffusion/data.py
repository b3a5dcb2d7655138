"""Pixel-space training data: prepared images joined to a branch's condition store (latent space:
``latent_data.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.data.shards import PreparedImages


class ConditionedImages(Dataset):
    """``{"pixel_values", "condition", "labels", "image_index"}`` for images of ``split`` that have a
    condition; those without one are skipped and counted in ``missing_condition``."""

    def __init__(self, prepared_dir: str | Path, split: str, store: ConditionStore, channels: int = 3,
                 limit: int | None = None):
        self.images = PreparedImages(prepared_dir, split, channels=channels)
        self.store = store
        self.positions = [i for i, name in enumerate(self.images.image_indices) if name in store]
        self.missing_condition = len(self.images) - len(self.positions)
        # Of those, the ones among the images a ``limit`` reaches (the first ``limit`` with a condition and the
        # ones without before the last of them): what a sample of ``limit`` images left out.
        self.missing_before_limit = self.missing_condition
        if limit is not None and len(self.positions) >= limit:
            self.missing_before_limit = self.positions[limit - 1] + 1 - limit
        if limit is not None:
            self.positions = self.positions[:limit]

    @property
    def image_indices(self) -> list[str]:
        """The names of the images it holds, in order."""
        return [self.images.image_indices[position] for position in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict:
        item = self.images[self.positions[index]]
        item["condition"] = self.store[item["image_index"]].embeddings
        return item


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
        "condition": torch.stack([i["condition"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
        "image_index": [i["image_index"] for i in items],
    }

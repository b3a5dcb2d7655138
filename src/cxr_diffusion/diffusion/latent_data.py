"""Latent-space training data held in memory: no image is decoded, no row is read twice.

In latent space the UNet sees only the precomputed VAE latents and the conditions. Both are read once,
in large contiguous blocks, into host memory (nih-512: 48,311 x 4 x 64 x 64 fp32 latents are 3.2 GB,
the conditions up to 2.4 GB for ELIXR's 32 tokens), and a micro-batch is one gather from them: no
DataLoader workers, no PNG decode, no shard cache to fall out of. Only the small Parquet columns
(``image_index``, labels) are read, to know the split's images and keep their order.

On a GPU the gathered batch lands in pinned memory, so its copy to the device does not block.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.diffusion.latents import latent_shape


class LatentImages:
    """The images of ``split`` that have both a latent and a condition, in the prepared order (those
    without a condition are counted in ``missing_condition``), as in ``ConditionedImages``."""

    def __init__(self, prepared_dir: str | Path, split: str, store: ConditionStore, latents: ConditionStore,
                 limit: int | None = None, pin_memory: bool = False):
        prepared = PreparedImages(prepared_dir, split, channels=1)  # reads the small columns, decodes nothing
        kept = [i for i, name in enumerate(prepared.image_indices) if name in store and name in latents]
        self.missing_condition = len(prepared) - len(kept)
        if limit is not None:
            kept = kept[:limit]
        self.image_indices = [prepared.image_indices[i] for i in kept]
        self.labels = torch.from_numpy(prepared.labels[kept]) if kept else torch.zeros(0, len(prepared.classes))
        self.latent_shape = latent_shape(latents)
        every_latent = latents.read_all()
        self.latents = every_latent[[latents.row_of[name] for name in self.image_indices]].view(-1, *self.latent_shape)
        del every_latent
        self.conditions = store.read_all()  # one row per distinct condition (prompts are shared)
        self.condition_rows = torch.tensor([store.row_of[name] for name in self.image_indices], dtype=torch.long)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.image_indices)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.latents[index].float(),
                "condition": self.conditions[self.condition_rows[index]].float(),
                "labels": self.labels[index], "image_index": self.image_indices[index]}

    def batch(self, indices: torch.Tensor) -> dict:
        """The micro-batch of ``indices`` (positions in this split), fp32 as the trainer computes in."""
        latents = self.latents.index_select(0, indices)
        conditions = self.conditions.index_select(0, self.condition_rows.index_select(0, indices))
        batch = {"pixel_values": latents.float(), "condition": conditions.float()}
        if self.pin_memory:
            batch = {key: value.pin_memory() for key, value in batch.items()}
        return batch

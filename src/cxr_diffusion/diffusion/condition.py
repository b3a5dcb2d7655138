"""The condition adapter: what turns a branch's stored condition into the UNet's input.

It is the one place the branches differ inside the model: it holds the learned null condition
for classifier-free guidance, expands a single-vector condition (CLIP vision, 1 x dim) to a few
tokens, normalises and (optionally) projects to the UNet's cross-attention width. Saved as a
pipeline component (safetensors) next to the UNet.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ConditionAdapter(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, tokens: int, dim: int, out_tokens: int, out_dim: int):
        super().__init__()
        self.null_condition = nn.Parameter(torch.zeros(tokens, dim))
        self.norm = nn.LayerNorm(dim)
        # A single vector gives cross-attention nothing to choose between; a few learned views of it do.
        self.expand = nn.Linear(dim, out_tokens * dim) if out_tokens != tokens else None
        self.project = nn.Linear(dim, out_dim) if out_dim != dim else nn.Identity()

    def forward(self, condition: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``condition`` (batch, tokens, dim); ``drop`` (batch,) bool: use the null condition there."""
        if drop is not None:
            condition = torch.where(drop[:, None, None], self.null_condition.to(condition.dtype), condition)
        hidden = self.norm(condition)
        if self.expand is not None:
            batch = hidden.shape[0]
            hidden = self.expand(hidden.mean(1)).view(batch, self.config.out_tokens, self.config.dim)
        return self.project(hidden)

    def null(self, batch: int) -> torch.Tensor:
        """The (batch, out_tokens, out_dim) unconditional input for guidance."""
        return self.forward(self.null_condition[None].expand(batch, -1, -1))


def condition_inputs(unet: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's keyword inputs for the adapter's (batch, tokens, dim) output: the tokens for cross-attention,
    and their mean for the timestep embedding when the UNet was built with one (``timestep_condition``)."""
    inputs = {"encoder_hidden_states": hidden}
    if unet.config.class_embed_type == "projection":
        inputs["class_labels"] = hidden.mean(1)
    return inputs


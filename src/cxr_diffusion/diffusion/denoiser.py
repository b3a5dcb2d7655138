"""The module a branch trains: the UNet and the condition adapter in front of its cross-attention."""

from __future__ import annotations

import torch
from torch import nn

from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.config import Params
from cxr_diffusion.diffusion.condition import ConditionAdapter, condition_inputs
from cxr_diffusion.diffusion.latents import latent_shape
from cxr_diffusion.diffusion.unet import build_unet


class Denoiser(nn.Module):
    """UNet + condition adapter: the one module that is optimised, wrapped by accelerate, averaged by EMA."""

    def __init__(self, unet: nn.Module, adapter: ConditionAdapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def compile_for_training(self) -> None:
        """torch.compile the UNet for the training step alone. Validation (no grad, EMA weights) and the
        sample grid (fp32, other batch sizes, a 0-dim timestep) would each recompile a compiled module, for
        minutes at SD-1.5 size; they call the plain module, which shares the same parameters. The compiled
        callable is kept outside the module tree, so state_dict and save_pretrained are unchanged."""
        self.__dict__["_training_unet"] = torch.compile(self.unet)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        unet = self.__dict__.get("_training_unet", self.unet) if self.training else self.unet
        return unet(noisy, timesteps, **condition_inputs(self.unet, self.adapter(condition, drop))).sample


def build_denoiser(params: Params, store: ConditionStore, latents: ConditionStore | None = None) -> Denoiser:
    """In pixel space the UNet sees images (channels x image_size^2); in latent space, VAE latents."""
    train = params.train
    dim = train.unet.cross_attention_dim or store.dim
    out_tokens = train.condition_tokens if store.tokens == 1 else store.tokens
    adapter = ConditionAdapter(tokens=store.tokens, dim=store.dim, out_tokens=out_tokens, out_dim=dim)
    if latents is not None:
        channels, size, _ = latent_shape(latents)
        unet = build_unet(train.unet, size, channels, dim)
    else:
        unet = build_unet(train.unet, params.image_size, params.channels, dim)
    return Denoiser(unet, adapter)


def compiles(setting: str, device: torch.device) -> bool:
    """Whether to torch.compile the UNet: ``auto`` on CUDA, where it measured 1.35x on an H200; on a CPU
    the compile takes minutes for little gain."""
    return setting == "always" or (setting == "auto" and device.type == "cuda")

"""The training objective and the validation loss: min-SNR-weighted MSE to the scheduler's target (eps or v)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxr_diffusion.diffusion.data import ConditionedImages, collate
from cxr_diffusion.diffusion.latent_data import LatentImages
from cxr_diffusion.diffusion.noise import loss_weights, sample_noise, training_target
from cxr_diffusion.device import module_device


def diffusion_loss(model: nn.Module, scheduler, batch_pixels: torch.Tensor, condition: torch.Tensor,
                   timesteps: torch.Tensor, noise: torch.Tensor, gamma: float | None,
                   drop: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image min-SNR-weighted MSE between the model output and its target (eps or v)."""
    noisy = scheduler.add_noise(batch_pixels, noise, timesteps)
    target = training_target(scheduler, batch_pixels, noise, timesteps)
    prediction = model(noisy, timesteps, condition, drop)
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_image * loss_weights(scheduler, timesteps, gamma)


def training_loss(model: nn.Module, scheduler, batch: dict, train, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """The mean loss of one micro-batch on ``device``.

    Timesteps, noise and condition dropout are drawn from ``generator`` on the CPU, in this order,
    and only then moved: the draws are the same on every device, which is what exact resume and
    CPU/GPU comparisons rely on (a CUDA generator would give other numbers).
    """
    pixels = batch["pixel_values"]
    timesteps = torch.randint(0, train.num_train_timesteps, (len(pixels),), generator=generator)
    noise = sample_noise(pixels.shape, train.offset_noise, generator)
    drop = torch.rand(len(pixels), generator=generator) < train.cfg_dropout
    # non_blocking: pinned batches reach the GPU while it still computes the previous micro-batch
    pixels, condition, timesteps, noise, drop = (tensor.to(device, non_blocking=True) for tensor in (
        pixels, batch["condition"], timesteps, noise, drop))
    return diffusion_loss(model, scheduler, pixels, condition, timesteps, noise, train.min_snr_gamma, drop=drop).mean()


class Validator:
    """Validation loss on fixed images, noise and timesteps (comparable across runs and branches),
    with the true conditions and with shuffled ones: their difference is the conditioning gap."""

    def __init__(self, dataset: ConditionedImages | LatentImages, scheduler, gamma: float | None, seed: int, batch_size: int):
        self.scheduler, self.gamma, self.batch_size = scheduler, gamma, batch_size
        items = [dataset[i] for i in range(len(dataset))]
        self.batch = collate(items) if items else None
        if self.batch is None:
            return
        generator = torch.Generator().manual_seed(seed + 7919)
        n = len(items)
        self.timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        self.noise = torch.randn(self.batch["pixel_values"].shape, generator=generator)
        order = torch.randperm(n, generator=generator)
        self.shuffled = torch.empty(n, dtype=torch.long)
        self.shuffled[order] = order.roll(1)  # a derangement: no image keeps its own condition

    @torch.no_grad()
    def losses(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image losses with the true and with the shuffled conditions, on the model's device."""
        device = module_device(model)
        true_losses, shuffled_losses = [], []
        pixels, condition = self.batch["pixel_values"], self.batch["condition"]
        for start in range(0, len(pixels), self.batch_size):
            part = slice(start, start + self.batch_size)
            args = (self.scheduler, pixels[part].to(device))
            timesteps, noise = self.timesteps[part].to(device), self.noise[part].to(device)
            true_losses.append(diffusion_loss(model, *args, condition[part].to(device), timesteps, noise, self.gamma))
            shuffled_losses.append(diffusion_loss(model, *args, condition[self.shuffled[part]].to(device),
                                                  timesteps, noise, self.gamma))
        return torch.cat(true_losses), torch.cat(shuffled_losses)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        if self.batch is None:
            return {}
        true_losses, shuffled_losses = self.losses(model)
        true_loss, shuffled_loss = true_losses.mean().item(), shuffled_losses.mean().item()
        return {"val/loss": true_loss, "val/loss_shuffled_condition": shuffled_loss,
                "val/conditioning_gap": shuffled_loss - true_loss}

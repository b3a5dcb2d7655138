"""The diffusion process: noise schedule, training targets and the min-SNR-gamma loss weighting."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, DDIMScheduler

from cxr_diffusion.config import TrainConfig


def training_scheduler(config: TrainConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.zero_terminal_snr,
        timestep_spacing="trailing" if config.zero_terminal_snr else "leading",
        clip_sample=False,
    )


SAMPLERS = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def sampling_scheduler(train_scheduler: DDPMScheduler, name: str = "dpm++"):
    """A sampler configured from the training schedule (same betas, prediction type, spacing)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler '{name}' is not one of {sorted(SAMPLERS)}")
    extra = {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"} if name == "dpm++" else {}
    return SAMPLERS[name].from_config(train_scheduler.config, **extra)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) for the MSE on the model's own target.

    For epsilon-prediction the weight is min(SNR, gamma) / SNR; for v-prediction
    min(SNR, gamma) / (SNR + 1). At a zero-terminal-SNR step (SNR = 0) the v weight is 0/1 = 0.
    """
    if gamma is None:
        return torch.ones_like(timesteps, dtype=torch.float32)
    ratio = snr(scheduler, timesteps).float()
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio.clamp(min=1e-8)


def training_target(scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return noise


def sample_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if offset > 0:  # one constant per image and channel: lets the model shift overall brightness
        noise = noise + offset * torch.randn(shape[:2] + (1, 1), generator=generator)
    return noise

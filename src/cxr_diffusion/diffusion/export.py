"""What training hands on: the final model as a diffusers pipeline with the encoders its branch needs, and a
sample grid to look at while it trains."""

from __future__ import annotations

from pathlib import Path

import torch

from cxr_diffusion.branches import branch_spec
from cxr_diffusion.config import Params
from cxr_diffusion.diffusion.data import ConditionedImages
from cxr_diffusion.diffusion.denoiser import Denoiser
from cxr_diffusion.diffusion.grid import image_grid, tensor_to_pil
from cxr_diffusion.diffusion.latent_data import LatentImages
from cxr_diffusion.diffusion.noise import sampling_scheduler
from cxr_diffusion.io import atomic_directory


@torch.no_grad()
def sample_grid(model: Denoiser, scheduler, dataset: ConditionedImages | LatentImages, seed: int, count: int = 8, steps: int = 20,
                vae=None):
    """Generations for the first ``count`` validation conditions (DPM-Solver++, guidance 3) above their
    real images: a quick look during training."""
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    count = min(count, len(dataset))
    if count == 0:
        return image_grid([], 1)
    items = [dataset[i] for i in range(count)]
    pipeline = CXRDiffusionPipeline(unet=model.unet, scheduler=sampling_scheduler(scheduler), condition_adapter=model.adapter,
                                    vae=vae)
    generated = pipeline(condition=torch.stack([i["condition"] for i in items]), guidance_scale=3.0,
                         num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), progress=False).images
    real = torch.stack([i["pixel_values"] for i in items])
    if vae is not None:  # latent space: the real latents decoded, as the generations are (no PNG is read)
        real = vae.decode((real / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample.float().cpu()
    return image_grid([tensor_to_pil(image.clamp(-1, 1)) for image in real] + list(generated), rows=2)


def save_pipeline(params: Params, branch: str, model: Denoiser, scheduler, model_out: Path, clip: str | Path | None,
                  vae=None) -> Path:
    """The final model as a diffusers pipeline directory (safetensors), with the encoders its branch needs."""
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    pipeline = CXRDiffusionPipeline(unet=model.unet, scheduler=sampling_scheduler(scheduler),
                                    condition_adapter=model.adapter, branch=branch, channels=params.channels,
                                    vae=vae, **encoder_components(branch, clip, params.clip.revision))
    with atomic_directory(model_out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return model_out


def encoder_components(branch: str, clip: str | Path | None, revision: str | None) -> dict:
    """The pipeline components ``branch``'s spec lists (a preprocessor and its encoder), loaded from ``clip``."""
    from cxr_diffusion.conditioning.clip import load_text_encoder, load_vision_encoder

    names = branch_spec(branch).encoder_components
    if not names:
        return {}
    preprocessor, encoder = names
    loaded = {"text_encoder": load_text_encoder, "image_encoder": load_vision_encoder}[encoder](clip, revision)
    return {preprocessor: loaded.preprocessor, encoder: loaded.model}

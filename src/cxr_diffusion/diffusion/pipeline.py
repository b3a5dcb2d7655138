"""``CXRDiffusionPipeline``: a saved model that generates chest X-rays from its branch's condition.

One class for the three branches; the components present say how a condition is made:
``tokenizer`` + ``text_encoder`` (clip_text, from a prompt), ``image_processor`` + ``image_encoder``
(clip_vision, from a reference image), or neither (elixr, from a (tokens, dim) embedding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from cxr_diffusion.device import timestep_device
from cxr_diffusion.conditioning.clip import TextEncoder, VisionEncoder, encode_images, encode_prompts
# model_index.json names the adapter's module; diffusers loads components only from modules that are
# already imported (it never imports what a repository names), so importing it here is what lets
# `CXRDiffusionPipeline.from_pretrained` load it, with no remote code involved.
from cxr_diffusion.diffusion.condition import ConditionAdapter, condition_inputs  # noqa: F401
from cxr_diffusion.branches import branch_spec
from cxr_diffusion.diffusion.model_files import write_model_files
from cxr_diffusion.io import give_plain_modes

# Condition embeddings (ELIXR, CLIP) are O(1); beyond the float16 range a condition overflows the
# half-precision model on a GPU (and squared in the adapter's LayerNorm it overflows float32 from ~1e19).
MAX_CONDITION_MAGNITUDE = float(torch.finfo(torch.float16).max)

# A generated image is unusable when this share of its pixels sits at 0 or 255 (either end, after
# rounding to 8 bits). A chest X-ray has tissue between its black borders and white markers: the
# phantom's reach 18%, a 2-step toy model's noisy samples 40-60%. A collapsed sampler (guidance or
# condition blown up, corrupted weights) clamps nearly every pixel to an end, or gives NaN.
SATURATED_FRACTION = 0.95


class CXRDiffusionOutput(BaseOutput):
    images: list[Image.Image] | np.ndarray


class CXRDiffusionPipeline(DiffusionPipeline):
    _optional_components = ["tokenizer", "text_encoder", "image_processor", "image_encoder", "vae"]
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"

    def __init__(self, unet, scheduler, condition_adapter, tokenizer=None, text_encoder=None, image_processor=None,
                 image_encoder=None, vae=None, branch: str = "elixr", channels: int = 3):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, condition_adapter=condition_adapter, tokenizer=tokenizer,
                              text_encoder=text_encoder, image_processor=image_processor, image_encoder=image_encoder,
                              vae=vae)
        self.register_to_config(branch=branch, channels=channels)

    # ------------------------------------------------------------------ conditions
    def make_condition(self, prompt=None, image=None, embedding=None) -> torch.Tensor:
        """The branch's raw condition, (batch, tokens, dim), from exactly one kind of input."""
        given = [name for name, value in (("prompt", prompt), ("image", image), ("embedding", embedding))
                 if value is not None]
        expected = branch_spec(self.config.branch).pipeline_input
        if given != [expected]:
            raise ValueError(f"this is a {self.config.branch} model: pass `{expected}=` (got {given or 'nothing'})")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if any(not p.strip() for p in prompts):
                raise ValueError("empty prompt")
            hidden, _, _ = encode_prompts(TextEncoder(self.tokenizer, self.text_encoder), prompts)
            return hidden
        if image is not None:
            images = [image] if isinstance(image, Image.Image) else list(image)
            return encode_images(VisionEncoder(self.image_processor, self.image_encoder), images)
        embedding = torch.as_tensor(embedding)
        if not embedding.is_floating_point():  # a bool or integer array is some other file, not an embedding
            raise ValueError(f"embedding has dtype {str(embedding.dtype).removeprefix('torch.')}; embeddings are "
                             f"floating point")
        embedding = embedding.to(torch.float32)
        if embedding.ndim == 2:
            embedding = embedding[None]
        expected_shape = tuple(self.condition_adapter.null_condition.shape)
        if embedding.ndim != 3 or tuple(embedding.shape[1:]) != expected_shape:
            raise ValueError(f"embedding must be {expected_shape} (tokens, dim) or batched; got {tuple(embedding.shape)}")
        if embedding.shape[0] == 0:
            raise ValueError(f"embedding holds no conditions (shape {tuple(embedding.shape)}); give at least one "
                             f"{expected_shape} (tokens, dim) embedding")
        if not torch.isfinite(embedding).all():
            raise ValueError("embedding has NaN or infinite values")
        largest = float(embedding.abs().max()) if embedding.numel() else 0.0
        if largest > MAX_CONDITION_MAGNITUDE:
            raise ValueError(f"embedding has values up to {largest:.3g}; condition embeddings are O(1) and values "
                             f"beyond {MAX_CONDITION_MAGNITUDE:.0f} overflow the model's half precision: is it the "
                             f"right file, scaled like the training embeddings?")
        return embedding

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, embedding=None, condition: torch.Tensor | None = None,
                 num_images_per_condition: int = 1, guidance_scale: float = 3.0, num_inference_steps: int = 25,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 progress: bool = True) -> CXRDiffusionOutput:
        """Generate. ``condition`` passes a precomputed raw condition (batch, tokens, dim), as the
        sampling stage does with the condition stores; otherwise the branch's input is encoded."""
        if condition is None:
            condition = self.make_condition(prompt, image, embedding)
        condition = condition.repeat_interleave(num_images_per_condition, 0)
        sample = self.denoise(condition, guidance_scale, num_inference_steps, generator, progress)
        images = ((sample.float().clamp(-1, 1) + 1) / 2).cpu()  # [0, 1], (batch, channels, H, W)
        if output_type == "pt":
            return CXRDiffusionOutput(images=images)
        if output_type == "np":
            return CXRDiffusionOutput(images=images.mean(1).numpy())  # channels are replicated grayscale
        return CXRDiffusionOutput(images=to_pil(images))

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> None:
        """diffusers' save (safetensors only: the loader reads nothing else) with the weights given the mode of
        a plain write (safetensors makes them 0600), then the sha256 of every file."""
        if not safe_serialization:
            raise ValueError("a CXRDiffusionPipeline is saved as safetensors only (the loader refuses pickles)")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        give_plain_modes(sorted(Path(save_directory).rglob("*.safetensors")))
        write_model_files(save_directory)

    @torch.no_grad()
    def denoise(self, condition: torch.Tensor, guidance_scale: float, num_inference_steps: int,
                generator: torch.Generator | None, progress: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (decoded by the VAE in latent space), on the UNet's device.

        Every input is moved to the UNet's device here. The initial noise is drawn on the CPU from
        ``generator`` and then moved, so a seed gives the same noise on every device. The VAE runs
        in its own dtype: it is kept in fp32, since SD VAEs can overflow in fp16.
        """
        device, dtype = self.unet.device, self.unet.dtype
        condition = condition.to(device, dtype)
        batch = condition.shape[0]
        hidden = self.condition_adapter(condition)
        if guidance_scale != 1.0:
            hidden = torch.cat([self.condition_adapter.null(batch).to(hidden.dtype), hidden])
        inputs = condition_inputs(self.unet, hidden)
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        sample = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=timestep_device(device))
        sample = sample * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps) if progress else self.scheduler.timesteps:
            model_input = torch.cat([sample] * 2) if guidance_scale != 1.0 else sample
            model_input = self.scheduler.scale_model_input(model_input, t)
            output = self.unet(model_input, t, **inputs).sample
            if guidance_scale != 1.0:
                unconditional, conditional = output.chunk(2)
                output = unconditional + guidance_scale * (conditional - unconditional)
            sample = self.scheduler.step(output, t, sample, generator=generator).prev_sample
        if self.vae is not None:
            latents = (sample / self.vae.config.scaling_factor).to(self.vae.device, self.vae.dtype)
            sample = self.vae.decode(latents).sample
        return sample


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """8-bit grayscale images from a (batch, channels, H, W) tensor in [0, 1] (channels are replicated)."""
    gray = images.float().mean(1).cpu().numpy()
    return [Image.fromarray(np.rint(g * 255).astype(np.uint8)) for g in gray]


def unusable_images(images: torch.Tensor) -> dict[str, int]:
    """How many images of a (batch, channels, H, W) tensor in [0, 1] are ``non-finite`` (any NaN or
    infinity) and how many ``saturated`` (at least SATURATED_FRACTION of the pixels at 0 or 255)."""
    flat = images.detach().float().flatten(1).cpu()
    non_finite = ~torch.isfinite(flat).all(1)
    at_an_end = ((flat <= 0.5 / 255) | (flat >= 254.5 / 255)).float().mean(1) >= SATURATED_FRACTION
    return {"non-finite": int(non_finite.sum()), "saturated": int((at_an_end & ~non_finite).sum())}

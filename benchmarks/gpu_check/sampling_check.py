"""Part (d): sampling as stage sample runs it: the project's pipeline, UNet + adapter in bf16, VAE decode in fp32.

    python benchmarks/gpu_check/sampling_check.py --device cuda --result d.json

``CXRDiffusionPipeline`` with the profile's UNet (nih-512: SD-1.5-sized), an ELIXR-shaped condition
adapter and the SD VAE, all with random weights, placed by ``sample.place_pipeline`` (the sample stage's
dtypes and VAE slicing); DPM-Solver++ 20 steps and DDPM 50 steps, guidance 3 (two UNet passes a step).
img/s counts whole images: every step, then the VAE decode. A one-step call first warms the kernels up.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import check_device, markdown_table, peak_memory_gib, reset_peak_memory, shown, sizes_for, write_result
from train_throughput import synchronize

from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion.condition import ConditionAdapter
from cxr_diffusion.diffusion.noise import sampling_scheduler, training_scheduler
from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline
from cxr_diffusion.diffusion.unet import build_unet
from cxr_diffusion.rehearsal.standin_models import SD_VAE
from cxr_diffusion.sampling.sample import place_pipeline
from synthetic_data import CONDITION_DIM

SAMPLERS = (("dpm++", 20), ("ddpm", 50))
GUIDANCE = 3.0  # the profiles' sample.guidance_scale


def build_pipeline(profile: str, image_size: int, tokens: int, device: torch.device) -> CXRDiffusionPipeline:
    from diffusers import AutoencoderKL

    params = params_with(profile=profile)
    train = params.train
    dim = train.unet.cross_attention_dim or CONDITION_DIM
    torch.manual_seed(0)
    unet = build_unet(train.unet, image_size // 8, 4, dim)
    adapter = ConditionAdapter(tokens=tokens, dim=CONDITION_DIM, out_tokens=tokens, out_dim=dim)
    pipeline = CXRDiffusionPipeline(unet=unet, scheduler=training_scheduler(train), condition_adapter=adapter,
                                    vae=AutoencoderKL(**SD_VAE).eval(), branch="elixr", channels=3)
    pipeline.set_progress_bar_config(disable=True)
    return place_pipeline(pipeline, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--result", default=None)
    args = parser.parse_args()
    check_device(args.device)
    sizes, device = sizes_for(args.device), torch.device(args.device)
    print(f"part (d) sizes: {sizes.note}", flush=True)
    pipeline = build_pipeline(sizes.profile, sizes.image_size, sizes.condition_tokens, device)
    train_scheduler = training_scheduler(params_with(profile=sizes.profile).train)
    condition = torch.randn(sizes.sample_batch, sizes.condition_tokens, CONDITION_DIM,
                            generator=torch.Generator().manual_seed(0))
    rows, results = [], {}
    for sampler, steps in SAMPLERS:
        pipeline.scheduler = sampling_scheduler(train_scheduler, sampler)
        pipeline(condition=condition, guidance_scale=GUIDANCE, num_inference_steps=1, output_type="pt",
                 progress=False, generator=torch.Generator().manual_seed(0))  # warm-up
        reset_peak_memory(args.device)
        synchronize(device)
        started = time.perf_counter()
        images = pipeline(condition=condition, guidance_scale=GUIDANCE, num_inference_steps=steps, output_type="pt",
                          progress=False, generator=torch.Generator().manual_seed(1)).images
        synchronize(device)
        seconds = time.perf_counter() - started
        rate = len(images) / seconds
        memory = peak_memory_gib(args.device)
        results[sampler] = {"steps": steps, "img_per_s": rate, "seconds": seconds, "peak_memory_gib": memory}
        rows.append([sampler, steps, sizes.sample_batch, "x".join(map(str, images.shape[1:])), shown(seconds),
                     shown(rate, 2), shown(memory, 2)])
    print(f"\n## (d) sampling with CXRDiffusionPipeline, guidance {GUIDANCE}, UNet {pipeline.unet.dtype}, "
          f"VAE {pipeline.vae.dtype} ({sizes.note})\n")
    print(markdown_table(["sampler", "steps", "batch", "image", "seconds", "img/s", "peak GPU memory GiB"], rows))
    write_result(args.result, {"part": "d", "status": "ok", "samplers": results, "batch": sizes.sample_batch,
                               "image_size": sizes.image_size})


if __name__ == "__main__":
    main()

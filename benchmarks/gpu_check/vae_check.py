"""Part (c): the SD VAE encoder as stage encode_latents runs it (fp32, ``latents.encode_batch``): img/s, peak memory.

    python benchmarks/gpu_check/vae_check.py --device cuda --result c.json

The published architecture (stabilityai/sd-vae-ft-mse's config, ``standin_models.SD_VAE``) with random
weights: nothing is downloaded, and speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import check_device, markdown_table, peak_memory_gib, reset_peak_memory, shown, sizes_for, write_result
from train_throughput import synchronize

from cxr_diffusion.diffusion.latents import encode_batch
from cxr_diffusion.rehearsal.standin_models import SD_VAE, parameter_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, default=4, help="timed batches, after one warm-up batch")
    parser.add_argument("--result", default=None)
    args = parser.parse_args()
    check_device(args.device)
    from diffusers import AutoencoderKL

    sizes, device = sizes_for(args.device), torch.device(args.device)
    print(f"part (c) sizes: {sizes.note}", flush=True)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval().to(device)
    pixels = torch.rand(sizes.vae_batch, 3, sizes.image_size, sizes.image_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels * 2 - 1
    reset_peak_memory(args.device)
    encode_batch(vae, pixels)  # warm-up: cuDNN picks its kernels here
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.batches):
        latents = encode_batch(vae, pixels)
    synchronize(device)
    seconds = time.perf_counter() - started
    rate = args.batches * sizes.vae_batch / seconds
    memory = peak_memory_gib(args.device)
    print(f"\n## (c) SD VAE encoder ({parameter_count(vae) / 1e6:.1f}M parameters), fp32, {sizes.image_size} px "
          f"({sizes.note})\n")
    print(markdown_table(["image px", "batch", "latent shape", "img/s", "peak GPU memory GiB"],
                         [[sizes.image_size, sizes.vae_batch, "x".join(map(str, latents.shape[1:])), shown(rate),
                           shown(memory, 2)]]))
    write_result(args.result, {"part": "c", "status": "ok", "img_per_s": rate, "peak_memory_gib": memory,
                               "image_size": sizes.image_size, "batch": sizes.vae_batch})


if __name__ == "__main__":
    main()

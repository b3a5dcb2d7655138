"""Choosing mixed precision per machine and per model: bf16 only where it is faster.

On GPUs bf16 where the card computes it natively (Ampere and newer), fp16 with loss scaling on older
cards (V100, T4), where bf16 would be emulated. On CPUs it depends on the machine and on the model's
size: with AMX (Intel Sapphire Rapids) bf16 autocast ran the default 32-channel UNet no faster than
fp32 (80 vs 82 img/s) and pays only for wider layers; on an AMD EPYC with AVX-512 the default UNet
ran ~20x *slower* in bf16, yet the same machine's probe of the SD-1.5 UNet's first level (320
channels at 64x64, avx512_bf16) found bf16 1.19-1.25x faster. So a CPU flag cannot decide it:
``auto`` times a training step of one ResNet block of the model's own first level, at its own width,
feature-map size and batch, in fp32 and in bf16 autocast, and takes bf16 only when it is clearly faster.
"""

from __future__ import annotations

from pathlib import Path

import time
from collections.abc import Callable

import torch

from cxr_diffusion.device import native_bf16

BF16_MIN_SPEEDUP = 1.15  # below this the gain is within run-to-run noise and bf16's rounding is not worth it


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_mixed_precision(requested: str, device: torch.device,
                           cpu_speedup: Callable[[], float] | None = None) -> str:
    """'no', 'bf16' or 'fp16' for accelerate; ``requested`` 'auto' picks per device, and on a CPU by
    ``cpu_speedup()`` (fp32 time / bf16 time of the model's own layers, e.g. ``unet_block_speedup``)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":  # fp16 trains with loss scaling (accelerate's GradScaler) where bf16 is emulated
        return "bf16" if native_bf16(device) else "fp16"
    if device.type != "cpu" or cpu_speedup is None:
        return "no"
    return "bf16" if cpu_speedup() >= BF16_MIN_SPEEDUP else "no"


def unet_block_speedup(channels: int, norm_groups: int, size: int, batch: int, repeats: int = 2) -> float:
    """fp32 time / bf16-autocast time of one training step (forward and backward) of a diffusers ResNet
    block as the UNet's first level has it: ``channels`` wide, ``size`` x ``size``, ``batch`` images.
    Best of ``repeats`` after a warm-up, each precision."""
    from diffusers.models.resnet import ResnetBlock2D

    generator = torch.Generator().manual_seed(0)
    block = ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=4 * channels,
                          groups=norm_groups)
    hidden = torch.randn(batch, channels, size, size, generator=generator)
    temb = torch.randn(batch, 4 * channels, generator=generator)

    def best_seconds(bf16: bool) -> float:
        times = []
        for run in range(repeats + 1):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = block(hidden, temb)
            out.float().square().mean().backward()
            if run:  # the first is the warm-up
                times.append(time.perf_counter() - started)
        return min(times)

    return best_seconds(False) / best_seconds(True)


def describe_machine() -> dict:
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in cpu_flags(),
        "threads": torch.get_num_threads(),
    }

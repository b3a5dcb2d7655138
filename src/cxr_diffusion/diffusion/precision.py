"""Choosing mixed precision per machine: bf16 only where it is faster.

On CPUs with AMX (Intel Sapphire Rapids and later) bf16 autocast is ~1.4x faster than fp32; on
CPUs without it (AVX2/AVX-512 only) PyTorch emulates bf16 and autocast is ~20x *slower*. The
choice follows the hardware flag, not a timing probe, so it is the same on every run of a machine.
"""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_mixed_precision(requested: str, device: torch.device | None = None) -> str:
    """'no', 'bf16' or 'fp16' for accelerate; ``requested`` 'auto' picks per machine and device."""
    if requested != "auto":
        return requested
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if "amx_bf16" in cpu_flags() else "no"


def describe_machine() -> dict:
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in cpu_flags(),
        "threads": torch.get_num_threads(),
    }

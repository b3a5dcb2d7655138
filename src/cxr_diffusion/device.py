"""One device choice for every stage and command: ``device: auto`` (CUDA when present, else CPU).

Kept in a tiny module of its own so that stages which only need the device do not depend on
(and go stale with) a large one.
"""

from __future__ import annotations

import os

import torch

from cxr_diffusion.config import ParamsError

MAX_DECODE_WORKERS = 8  # PNG decoding for a GPU consumer: 512-px decodes run at ~100-200 img/s per core


class DeviceError(ParamsError):
    """The requested device does not exist on this machine (the message says what to set)."""


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``/``cuda``/``cuda:N`` as asked.

    A CUDA device that is not there is an error rather than a silent fall-back to the CPU: a run
    the user meant for the GPU should not quietly take a hundred times longer.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"params: 'device' is {requested!r} but no CUDA GPU is visible; set device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"params: 'device' is {requested!r} but only {torch.cuda.device_count()} GPU(s) are "
                              f"visible; set device: auto or cuda:0")
    return device


def describe_device(device: torch.device) -> str:
    """What metrics files record: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live: every input it is given must be moved there."""
    return next(module.parameters()).device


def native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device computes bf16 in hardware: compute capability 8.0 (Ampere) or newer.

    ``torch.cuda.is_bf16_supported()`` also answers True on a V100 or T4, where bf16 is emulated at a
    fraction of fp16's speed; those cards should take fp16 (with loss scaling in training) instead.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def half_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision for inference where it is safe: bf16 on CUDA cards that have it natively,
    fp16 on older ones, fp32 on the CPU, where bf16 is emulated on most machines (~20x slower without AMX)."""
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.float32


def claim_device(device: torch.device, processes: int) -> None:
    """Make ``cuda:N`` the current CUDA device of a one-process run, so that everything which places
    tensors on plain ``cuda`` (accelerate among them) uses card N. With several processes, accelerate gives
    each its own card and one index cannot hold for all of them: that is refused."""
    if device.type != "cuda" or device.index is None:
        return
    if processes > 1:
        raise DeviceError(f"params: 'device' is 'cuda:{device.index}' but the launch config starts {processes} "
                          f"processes, one per GPU; set device: auto (or cuda), or launch one process")
    torch.cuda.set_device(device)


def timestep_device(device: torch.device) -> torch.device | None:
    """Where a scheduler keeps its timesteps: on the model's device, except on ``meta`` (the tests'
    device-placement check), whose tensors hold no values for the schedulers' index look-ups."""
    return None if device.type == "meta" else device


def decode_workers(device: torch.device) -> int:
    """DataLoader workers that decode images for a model on ``device``. Beside a GPU, worker processes keep
    it fed (one core stays with the main process); on a CPU the model needs every core, so the main process
    decodes, as it always did there."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_DECODE_WORKERS, cores - 1))

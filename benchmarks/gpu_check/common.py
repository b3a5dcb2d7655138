"""What the GPU check's parts share: the sizes they run at, device helpers, result files, tables.

On CUDA the parts run at nih-512's sizes (the SD-1.5-sized UNet of the nih-512 profile, 512-px images,
the SD VAE). On a CPU they shrink to something that finishes in minutes (the tiny profile's UNet, 64-px
images) and say so: a CPU run rehearses the scripts, it measures nothing about a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from _measure import markdown_table  # noqa: E402  (benchmarks/ is not a package)

NA = "n/a"


@dataclass(frozen=True)
class Sizes:
    """What one part runs at on this device, and why."""

    profile: str                 # shipped profile whose train.unet is used
    image_size: int              # pixels; latents are image_size / 8
    train_batch: int             # per optimizer micro-step
    train_accumulation: int
    train_steps: int             # optimizer steps of each timed training run
    condition_tokens: int        # the elixr branch's (tokens, 768) condition, as nih-512 trains it
    vae_batch: int
    sample_batch: int
    note: str


GPU_SIZES = Sizes(profile="nih-512", image_size=512, train_batch=64, train_accumulation=4, train_steps=4,
                  condition_tokens=32, vae_batch=8, sample_batch=16,
                  note="nih-512 sizes: SD-1.5-sized UNet, 512-px images (64x64x4 latents), the SD VAE")
CPU_SIZES = Sizes(profile="tiny", image_size=64, train_batch=8, train_accumulation=2, train_steps=3,
                  condition_tokens=32, vae_batch=2, sample_batch=2,
                  note="CPU REHEARSAL, SHRUNK: the tiny profile's UNet at 64 px (8x8x4 latents), SD VAE at 64 px; "
                       "these numbers say nothing about a GPU")


def sizes_for(device: str) -> Sizes:
    return GPU_SIZES if device.startswith("cuda") else CPU_SIZES


def check_device(device: str) -> None:
    """Stop at once, with one line, when CUDA is asked for and not there."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA GPU visible to torch {torch.__version__}")


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    """Peak memory PyTorch allocated on the GPU since the last reset; None on a CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def shown(value, digits: int = 1, suffix: str = "") -> str:
    """A number for a table, or n/a for a value nobody reported."""
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def write_result(path: str | os.PathLike | None, result: dict) -> None:
    """One part's numbers as JSON (the summary reads them); written whole or not at all."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def sizes_dict(sizes: Sizes) -> dict:
    return asdict(sizes)


def run_with_limit(command: list[str], seconds: float, log: Path | None = None, cwd: Path | None = None) -> tuple[int, float]:
    """Run ``command`` (an argument list, never a shell string) for at most ``seconds``; returns (exit code,
    seconds taken), the code 124 when it was stopped at the limit. It runs in a process group of its own, and
    at the limit that whole group (the command and what it started, e.g. DataLoader workers) is killed."""
    started = time.perf_counter()
    sink = open(log, "w") if log is not None else None  # None: the command prints to this console
    try:
        process = subprocess.Popen(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT if sink else None,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = 124
    finally:
        if sink is not None:
            sink.close()
    return code, time.perf_counter() - started


__all__ = ["NA", "REPO", "Sizes", "check_device", "markdown_table", "peak_memory_gib", "reset_peak_memory",
           "run_with_limit", "shown", "sizes_dict", "sizes_for", "write_result"]

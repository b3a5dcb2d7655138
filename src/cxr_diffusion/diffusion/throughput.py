"""What a training run measures about itself: images per second, the share spent waiting for data, compiles
and peak device memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Throughput:
    """Images per second and the share of that time spent waiting for data: since the last ``read`` (logged
    per step) and since ``mark_run`` (after the first step, whose compile and warm-up would dominate), less
    the time spent in ``paused`` blocks (validation, sample grids, checkpoints)."""

    def __init__(self):
        self.restart()
        self.run_since, self.run_waited, self.run_images, self.run_paused = None, 0.0, 0, 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.run_paused += time.perf_counter() - started
            self.restart()

    def restart(self) -> None:
        self.since, self.waited, self.images = time.perf_counter(), 0.0, 0

    def mark_run(self) -> None:
        self.run_since, self.run_waited, self.run_images, self.run_paused = time.perf_counter(), 0.0, 0, 0.0

    def timed(self, batches: Iterator[dict]) -> Iterator[dict]:
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - started
            self.waited += waited
            self.run_waited += waited
            if batch is None:
                return
            self.images += len(batch["pixel_values"])
            self.run_images += len(batch["pixel_values"])
            yield batch

    def read(self, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        metrics = {"train/img_per_s": self.images * world / elapsed, "train/data_wait_fraction": self.waited / elapsed}
        self.restart()
        return metrics

    def run_summary(self, world: int) -> dict[str, float | None]:
        if self.run_since is None or self.run_images == 0:
            return {"img_per_s": None, "data_wait_fraction": None}
        elapsed = max(time.perf_counter() - self.run_since - self.run_paused, 1e-9)
        return {"img_per_s": round(self.run_images * world / elapsed, 2),
                "data_wait_fraction": round(self.run_waited / elapsed, 4)}


def dynamo_frames_compiled() -> int:
    """Frames torch.compile has compiled in this process so far (each recompile counts once more)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def peak_device_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

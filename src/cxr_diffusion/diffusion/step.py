"""One optimizer step of the training loop, with all of its non-finite handling, and no host sync.

A step whose gradients hold any inf or NaN (after the all-reduce, so every process agrees) is skipped
on the device: the weights and the optimizer state stay as they were, as torch's ``GradScaler`` does for
fp16. With fp16 the scaler (accelerate's) does it and also lowers its scale, so gradients must reach it
still unscaled and untouched: zeroing non-finite entries first, as this loop once did, hid every overflow
from the scaler, whose scale then never came down. Without a scaler (bf16, fp32) the same skip is asked of
the fused AdamW through the ``found_inf`` tensor that ``GradScaler`` itself hands to fused optimizers, so
the decision stays on the device: no ``.item()`` per micro-batch or step.

The step returns its numbers as tensors (loss, gradient norm, skipped); ``LaggedReadings`` reads them
one step late, when the device has long finished them, for logging and for the ``max_nonfinite`` rule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn


@dataclass
class StepTensors:
    """What one optimizer step leaves on the device, read later: the last micro-batch's loss, the gradient
    norm before clipping, and 1.0 when the step was skipped for non-finite gradients."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    skipped: torch.Tensor


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """Back-propagate a micro-batch's loss (scaled by accelerate's GradScaler under fp16). A non-finite loss
    gives non-finite gradients, so its whole step is skipped: nothing to test here, on the host."""
    accelerator.backward(loss)


def optimizer_step(accelerator: Accelerator, model: nn.Module, optimizer, lr: float, grad_clip: float,
                   loss: torch.Tensor) -> StepTensors:
    """Clip to ``grad_clip`` and step at ``lr``, unless a gradient is non-finite; zero the gradients."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)  # unscales first under fp16
    for group in optimizer.param_groups:
        group["lr"] = lr
    if accelerator.scaler is not None:  # fp16: the scaler finds the overflow, skips and lowers its scale
        optimizer.step()
        skipped = (~torch.isfinite(grad_norm)).float()
    else:
        skipped = (~torch.isfinite(grad_norm)).float()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
        inner.found_inf = skipped.to(torch.float32)  # read by the fused AdamW kernel: skip when 1
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    optimizer.zero_grad(set_to_none=True)
    return StepTensors(loss=loss.detach().float(), grad_norm=grad_norm.detach().float(), skipped=skipped)


@dataclass(frozen=True)
class StepReading:
    step: int
    loss: float
    grad_norm: float
    skipped: bool


class LaggedReadings:
    """Host copies of each step's tensors, read once the device is done with them.

    On a GPU the copy goes to pinned memory without blocking, and a CUDA event marks it; ``ready`` returns
    the readings whose events have completed, waiting only for the oldest when ``lag`` are pending (the
    device then still has the newer steps queued, so it never idles while the host reads). On a CPU the
    values are there at once and every reading is ready as soon as it is pushed.
    """

    def __init__(self, device: torch.device, lag: int = 2):
        self.device, self.lag = device, lag
        self._pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    def push(self, step: int, tensors: StepTensors) -> list[StepReading]:
        packed = torch.stack([tensors.loss.reshape(()), tensors.grad_norm.reshape(()), tensors.skipped.reshape(())])
        event = None
        if self.device.type == "cuda":
            host = torch.empty(3, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            packed = host
        self._pending.append((step, packed, event))
        return self.ready()

    def ready(self, wait_all: bool = False) -> list[StepReading]:
        readings = []
        while self._pending:
            step, values, event = self._pending[0]
            if event is not None and not event.query():
                if not wait_all and len(self._pending) <= self.lag:
                    break
                event.synchronize()
            self._pending.popleft()
            loss, grad_norm, skipped = values.tolist()
            readings.append(StepReading(step, loss, grad_norm, skipped > 0.5))
        return readings

    def flush(self) -> list[StepReading]:
        """Every pending reading (before validation, a checkpoint or the end of the run)."""
        return self.ready(wait_all=True)

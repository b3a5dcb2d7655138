"""The EMA of the weights that is validated, sampled and saved: EDM's convention, half-life in images.

After every optimizer step the average moves towards the weights: ``shadow = beta * shadow + (1 - beta)
* weights`` with ``beta = 0.5 ** (images_per_step / half_life)``, so the weight of what the run saw
``half_life`` images ago is halved, whatever the batch size, accumulation or number of processes.
The half-life is ``train.ema_half_life_images``, capped early in a run at ``EMA_RAMPUP_RATIO`` of the
images seen before the step (EDM's ramp-up): the first step copies the weights, the random initial
weights are forgotten as fast as the run leaves them, and the configured half-life holds from
``ema_half_life_images / EMA_RAMPUP_RATIO`` images on (100,000 at the default 5,000).

That is the one convention. diffusers' ``EMAModel``, used before, put its own warm-up in steps,
``decay <= (1 + step) / (10 + step)``, on top of the half-life, so the setting meant something else for
the first few thousand steps. The average is a list of tensors beside the parameters, so a checkpoint
saves and restores it like any other tensors, with no step counter of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

EMA_RAMPUP_RATIO = 0.05  # EDM's ema_rampup_ratio: the half-life is at most 5% of the images seen so far


def ema_beta(half_life_images: float, images_seen: int, images_per_step: int) -> float:
    """The share the average keeps at a step taken after ``images_seen`` images (0 copies the weights)."""
    half_life = min(half_life_images, EMA_RAMPUP_RATIO * images_seen)
    return 0.5 ** (images_per_step / half_life) if half_life > 0 else 0.0


class EMA:
    """An exponential moving average of ``parameters``: beside them (their devices and dtypes), or in host
    memory when ``on_host`` (the memory plan's choice for a card too small for a fourth fp32 copy of the
    UNet). On the host each update first copies the weights into a pinned staging copy, then averages on
    the CPU: a device-to-host copy and a wait per optimizer step, the price of the memory it frees."""

    def __init__(self, parameters: Iterable[torch.Tensor], on_host: bool = False):
        parameters = [parameter.detach() for parameter in parameters]
        self.on_host = on_host
        self.shadow = [parameter.to("cpu", copy=True) if on_host else parameter.clone() for parameter in parameters]
        pinned = on_host and any(parameter.is_cuda for parameter in parameters)
        # The weights' values on the host: read by each update, and kept there while the average is swapped in.
        self._staging = [torch.empty_like(average, pin_memory=pinned) for average in self.shadow] if on_host else []

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor], beta: float) -> None:
        """One multi-tensor lerp (a few kernel launches for the whole model instead of one per tensor)."""
        parameters = list(parameters)
        if len(parameters) != len(self.shadow):
            raise ValueError(f"EMA of {len(self.shadow)} tensors updated with {len(parameters)}")
        if self.on_host:
            self._copy_to_host(parameters)
            parameters = self._staging
        torch._foreach_lerp_(self.shadow, parameters, 1.0 - beta)

    def _copy_to_host(self, parameters: list[torch.Tensor]) -> None:
        for staged, parameter in zip(self._staging, parameters, strict=True):
            staged.copy_(parameter.detach(), non_blocking=True)
        if any(parameter.is_cuda for parameter in parameters):
            torch.cuda.current_stream(parameters[0].device).synchronize()  # the copies have landed

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averages by position, for a checkpoint; loading one copies into these same tensors."""
        return {str(index): average for index, average in enumerate(self.shadow)}

    @torch.no_grad()
    def move_into(self, parameters: list[torch.nn.Parameter]) -> None:
        """Leave the average in ``parameters`` and let go of their own values (to save the final model)."""
        if self.on_host:
            torch._foreach_copy_(parameters, self.shadow)
        else:
            swap_weights(parameters, self.shadow)
        self.shadow, self._staging = [], []

    @contextmanager
    def swapped_into(self, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
        """The parameters hold the average inside the block, their own values again after it. Beside the
        weights the two swap storages (no copy); on the host the weights wait in the staging copy."""
        if not self.on_host:
            swap_weights(parameters, self.shadow)
            try:
                yield
            finally:
                swap_weights(parameters, self.shadow)
            return
        with torch.no_grad():
            self._copy_to_host(parameters)
            torch._foreach_copy_(parameters, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(parameters, self._staging)


@torch.no_grad()
def swap_weights(parameters: Iterable[torch.Tensor], others: Iterable[torch.Tensor]) -> None:
    """Exchange the values of two same-shaped tensor lists in place (storage pointers, no copy): a
    store/copy_to/restore round would hold a third copy of the weights, 3.4 GB at SD-1.5 size."""
    for parameter, other in zip(parameters, others, strict=True):
        parameter.data, other.data = other.data, parameter.data

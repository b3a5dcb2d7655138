"""Training memory: predict the peak of a training step and choose a plan that fits the device.

The peak of a step is what stays on the device (fp32 weights, their gradients, AdamW's two fp32
states, the EMA copy, the VAE) plus the working memory of one micro-batch's forward and backward. That
working memory is measured, not guessed: one training step of the UNet runs on fake tensors (shapes
and dtypes, no data, a few seconds for SD-1.5 on a CPU) while a dispatch mode adds up the storages that
the ops allocate and sees which ones are freed, so it counts what autograd saves, what gradient
checkpointing recomputes in backward and the temporaries of backward. A step at 1 and at 2 images gives
the cost per image and the fixed cost per micro-batch (autocast's low-precision copies of the weights).

Fake CUDA tensors need a CUDA build of torch, so the step runs on fake CPU tensors under CPU autocast;
where CUDA's autocast differs for this network (group_norm and layer_norm run in fp32 there, in bf16 on
the CPU) a function mode makes those ops fp32, as on the card. fp16 and bf16 have the same sizes.

The plan keeps the images per optimizer step as configured and changes, cheapest first, only what the
budget needs: the VAE to the CPU, a smaller micro-batch (more accumulation), the EMA to host memory,
gradient checkpointing, then micro-batches below ``MICRO_BATCH_FLOOR``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cxr_diffusion.config import TrainConfig, UNetConfig
from cxr_diffusion.errors import UserError

GIB = 2**30
FP32 = 4  # bytes: weights, gradients, AdamW states and the EMA are fp32 whatever the autocast dtype
# Working memory the fake-tensor step cannot see (kernels' own workspaces), as a share of what it measures.
# Calibrated on the H200 (benchmarks/results/gpu_nih512_h200_memory.txt, torch.cuda.max_memory_allocated,
# SD-1.5 UNet, 4x64x64 latents, 77x768 condition, batch 64, AdamW, no EMA, no VAE): measured 89.7 GiB in
# bf16 autocast and 126.3 GiB in fp32, where weights, gradients and AdamW hold 12.81 GiB and the fake step
# measures 76.79 and 113.40 GiB: (89.7 - 12.81) / 76.79 = 1.0013 and (126.3 - 12.81) / 113.40 = 1.0008.
# 1.002 covers both at the top of the figures' 0.05 GiB rounding (benchmarks/memory_plan_check.py).
# The allocator's fragmentation (reserved beyond allocated) is not in these figures: BUDGET_HEADROOM is.
WORKSPACE_FACTOR = 1.002
# Share of the card's memory a plan may fill: the rest is the CUDA context and library handles
# (~0.5-1 GiB), and the caching allocator's fragmentation (reserved beyond allocated, a few %).
BUDGET_HEADROOM = 0.92
# Below 16 micro-batch images of 64x64 latents the GPU is no longer kept busy by one micro-batch, which
# costs more than moving the EMA to the host or recomputing activations (gradient checkpointing, ~1.3x).
MICRO_BATCH_FLOOR = 16


class MemoryPlanError(UserError):
    """No plan fits the device's memory; the message names the key to change."""


def _norms_in_float32_as_on_cuda(unet: torch.nn.Module) -> None:
    """CUDA autocast runs group_norm and layer_norm in fp32 (torch.amp's "CUDA ops that can autocast to
    float32"); CPU autocast leaves them in their input's dtype. Casting their input to fp32 in a pre-hook
    does what CUDA's autocast does, above autograd, so backward saves the fp32 copy; module hooks also run
    when gradient checkpointing recomputes a block."""
    for module in unet.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            module.register_forward_pre_hook(lambda _, inputs: tuple(x.float() for x in inputs))


class _PeakAllocatedBytes(TorchDispatchMode):
    """The most bytes that storages allocated by ops under this mode held at once (``peak``).

    A storage counts from the op that first returns it until its last reference dies (views share
    it); ``existing`` tensors (weights, gradients, inputs) are never counted. Freed storages are found
    by weak reference, and only looked for when the running sum passes the peak: that keeps a step of
    tens of thousands of ops fast.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self._existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._upper_bound = 0  # live bytes plus those freed since the last look
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._allocated(tensor.untyped_storage())
        return out

    def _allocated(self, storage: torch.UntypedStorage) -> None:
        ref = StorageWeakRef(storage)  # holding it keeps the address from being reused by a new storage
        if ref.cdata in self._existing or ref.cdata in self._live:
            return
        self._live[ref.cdata] = (ref, storage.nbytes())
        self._upper_bound += storage.nbytes()
        if self._upper_bound > self.peak:
            self._live = {key: entry for key, entry in self._live.items() if not entry[0].expired()}
            self._upper_bound = sum(nbytes for _, nbytes in self._live.values())
            self.peak = max(self.peak, self._upper_bound)


@dataclass(frozen=True)
class Activations:
    """Working memory of one micro-batch's forward and backward: ``fixed + per_image * images``."""

    fixed_bytes: int
    per_image_bytes: int

    def bytes_at(self, micro_batch: int) -> int:
        return self.fixed_bytes + self.per_image_bytes * micro_batch


def _step_working_bytes(unet_config: UNetConfig, sample_size: int, channels: int, cross_attention_dim: int,
                        condition_tokens: int, autocast: bool, gradient_checkpointing: bool, device_type: str,
                        batch: int) -> int:
    """Peak bytes one training micro-batch (inputs, forward, loss, backward) allocates beyond the weights
    and their gradients. The gradients exist already, as for every micro-batch after an optimizer step's
    first: backward's new gradients are then temporaries added into them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cxr_diffusion.diffusion.condition import condition_inputs
    from cxr_diffusion.diffusion.unet import build_unet

    with FakeTensorMode():
        unet = build_unet(unet_config, sample_size, channels, cross_attention_dim).train()
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if autocast and device_type == "cuda":
            _norms_in_float32_as_on_cuda(unet)
        for parameter in unet.parameters():
            parameter.grad = torch.zeros_like(parameter)
        existing = [*unet.parameters(), *(parameter.grad for parameter in unet.parameters())]
        with _PeakAllocatedBytes(existing) as tracker:
            images = torch.randn(batch, channels, sample_size, sample_size)
            condition = torch.randn(batch, condition_tokens, cross_attention_dim)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                prediction = unet(images, torch.randint(0, 1000, (batch,)), **condition_inputs(unet, condition)).sample
                loss = F.mse_loss(prediction.float(), images)
            loss.backward()
    return tracker.peak


@lru_cache(maxsize=32)
def measure_activations(unet_config: UNetConfig, sample_size: int, channels: int, cross_attention_dim: int,
                        condition_tokens: int, precision: str, gradient_checkpointing: bool,
                        device_type: str = "cuda") -> Activations:
    """The working memory of a training micro-batch of this UNet, measured at 1 and 2 images (module
    docstring). ``precision``: ``no`` (fp32), ``bf16`` or ``fp16`` (autocast, same sizes as bf16);
    ``device_type``: whose autocast rules apply, ``cuda`` or ``cpu``."""
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"precision is {precision!r}; expected 'no', 'bf16' or 'fp16' (resolve 'auto' first)")
    one, two = (_step_working_bytes(unet_config, sample_size, channels, cross_attention_dim, condition_tokens,
                                    precision != "no", gradient_checkpointing, device_type, batch)
                for batch in (1, 2))
    return Activations(fixed_bytes=max(0, 2 * one - two), per_image_bytes=two - one)


@lru_cache(maxsize=32)
def unet_parameters(unet_config: UNetConfig, sample_size: int, channels: int, cross_attention_dim: int) -> int:
    """Parameter count of the UNet, built on the meta device (nothing is allocated)."""
    from cxr_diffusion.diffusion.unet import build_unet

    with torch.device("meta"):
        unet = build_unet(unet_config, sample_size, channels, cross_attention_dim)
    return sum(parameter.numel() for parameter in unet.parameters())


def predict_parts(parameters: int, activations: Activations, micro_batch: int, ema_on_device: bool = True,
                  vae_parameters: int = 0, vae_on_device: bool = True) -> dict[str, int]:
    """Predicted device bytes of a training step at its peak (the backward of a micro-batch), by part."""
    working = activations.bytes_at(micro_batch)
    return {
        "weights": FP32 * parameters,
        "gradients": FP32 * parameters,
        "optimizer": 2 * FP32 * parameters,  # AdamW's exp_avg and exp_avg_sq
        "ema": FP32 * parameters if ema_on_device else 0,
        "vae": FP32 * vae_parameters if vae_on_device else 0,
        "activations": working,
        "workspace": round((WORKSPACE_FACTOR - 1) * working),
    }


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int  # images per forward/backward on one device
    accumulation: int  # micro-batches per optimizer step: micro_batch * accumulation is as configured
    gradient_checkpointing: bool
    ema_on_device: bool  # False: the EMA lives in host memory
    vae_on_device: bool  # False: the VAE stays on the CPU (only the sample grid uses it)
    parts: dict[str, int] = field(compare=False)  # predicted bytes by part (predict_parts)
    budget_bytes: int | None  # None: no budget (CPU): the configured plan, only predicted
    changed: tuple[str, ...] = ()  # what the planner changed from the params, in words

    @property
    def predicted_peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def images_per_step(self) -> int:
        return self.micro_batch * self.accumulation

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.predicted_peak_bytes <= self.budget_bytes

    def describe(self) -> str:
        """A short table in GiB, printed before training."""
        budget = "no budget" if self.budget_bytes is None else f"budget {self.budget_bytes / GIB:.1f} GiB"
        lines = [f"memory plan: micro-batch {self.micro_batch} x {self.accumulation} accumulation = "
                 f"{self.images_per_step} images per optimizer step; gradient checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}; EMA {_where(self.ema_on_device)}; "
                 f"VAE {_where(self.vae_on_device)}"]
        lines += [f"  {part:<12}{size / GIB:8.2f} GiB" for part, size in self.parts.items()]
        lines.append(f"  {'peak':<12}{self.predicted_peak_bytes / GIB:8.2f} GiB predicted ({budget})")
        lines += [f"  changed: {change}" for change in self.changed]
        return "\n".join(lines)

    def as_log(self) -> dict[str, int | float | bool | str | None]:
        """Flat and JSON-able, for DVCLive params or a metrics file."""
        log: dict[str, int | float | bool | str | None] = {
            "memory/micro_batch": self.micro_batch, "memory/accumulation": self.accumulation,
            "memory/gradient_checkpointing": self.gradient_checkpointing,
            "memory/ema_on_device": self.ema_on_device, "memory/vae_on_device": self.vae_on_device,
            "memory/predicted_peak_gib": round(self.predicted_peak_bytes / GIB, 2),
            "memory/budget_gib": None if self.budget_bytes is None else round(self.budget_bytes / GIB, 2),
            "memory/changed": "; ".join(self.changed),
        }
        log.update({f"memory/{part}_gib": round(size / GIB, 2) for part, size in self.parts.items()})
        return log


def _where(on_device: bool) -> str:
    return "on the device" if on_device else "in host memory"


def plan_memory(train: TrainConfig, sample_size: int, channels: int, cross_attention_dim: int,
                condition_tokens: int, precision: str, budget_bytes: int | None, vae_parameters: int = 0,
                device_type: str = "cuda") -> MemoryPlan:
    """The configured plan when it fits ``budget_bytes`` (or there is no budget), else the first that fits
    of ``_relaxations``, with what still fits moved back onto the device. Images per optimizer step stay
    ``train.batch_size * train.gradient_accumulation``; the micro-batch always divides them."""
    parameters = unet_parameters(train.unet, sample_size, channels, cross_attention_dim)
    images_per_step = train.batch_size * train.gradient_accumulation
    state = sum(predict_parts(parameters, Activations(0, 0), 1, False).values())  # what no plan can shed
    if budget_bytes is not None and state > budget_bytes:  # refused before minutes of measuring activations
        raise MemoryPlanError(
            f"train.batch_size: no training plan fits the device's {budget_bytes / GIB:.1f} GiB budget: the UNet's "
            f"weights, gradients and optimizer state alone take {state / GIB:.1f} GiB; train on a card with more "
            f"memory or shrink the UNet (train.unet.block_out_channels)")

    def plan(micro_batch: int, checkpointing: bool, ema_on_device: bool, vae_on_device: bool) -> MemoryPlan:
        activations = measure_activations(train.unet, sample_size, channels, cross_attention_dim, condition_tokens,
                                          precision, checkpointing, device_type)
        parts = predict_parts(parameters, activations, micro_batch, ema_on_device, vae_parameters, vae_on_device)
        return MemoryPlan(micro_batch, images_per_step // micro_batch, checkpointing, ema_on_device, vae_on_device,
                          parts, budget_bytes)

    configured = plan(train.batch_size, train.gradient_checkpointing, True, vae_parameters > 0)
    if configured.fits:
        return configured
    for checkpointing, ema_on_device, floor in _relaxations(train):
        for micro_batch in _micro_batches(train.batch_size, images_per_step, floor):
            candidate = plan(micro_batch, checkpointing, ema_on_device, False)
            if candidate.fits:
                for moved_back in (dict(ema_on_device=True), dict(vae_on_device=vae_parameters > 0)):
                    back = plan(**{**_settings(candidate), **moved_back})
                    candidate = back if back.fits else candidate
                return replace(candidate, changed=_changes(configured, candidate))
    smallest = plan(1, True, False, False)
    raise MemoryPlanError(
        f"train.batch_size: no training plan fits the device's {budget_bytes / GIB:.1f} GiB budget, not even "
        f"1 image per micro-batch with gradient checkpointing, the EMA in host memory and the VAE on the CPU "
        f"(predicted {smallest.predicted_peak_bytes / GIB:.1f} GiB); train on a card with more memory or "
        f"shrink the UNet (train.unet.block_out_channels)")


def _relaxations(train: TrainConfig) -> list[tuple[bool, bool, int]]:
    """(gradient checkpointing, EMA on device, smallest micro-batch), cheapest first, each with the VAE on
    the CPU: a smaller micro-batch down to the floor, then the EMA to the host, then recomputing
    activations (from the configured micro-batch down to the floor), then micro-batches below it."""
    configured = train.gradient_checkpointing
    return [(configured, True, train.batch_size), (configured, True, MICRO_BATCH_FLOOR),
            (configured, False, MICRO_BATCH_FLOOR), (True, False, MICRO_BATCH_FLOOR), (True, False, 1)]


def _micro_batches(largest: int, images_per_step: int, floor: int) -> list[int]:
    """``largest``, then halvings rounded down to a divisor of ``images_per_step``, none below ``floor``."""
    sizes = [largest]
    while sizes[-1] > 1:
        smaller = max(d for d in range(1, sizes[-1] // 2 + 1) if images_per_step % d == 0)
        if smaller < floor:
            break
        sizes.append(smaller)
    return sizes


def _settings(plan: MemoryPlan) -> dict[str, int | bool]:
    return dict(micro_batch=plan.micro_batch, checkpointing=plan.gradient_checkpointing,
                ema_on_device=plan.ema_on_device, vae_on_device=plan.vae_on_device)


def _changes(configured: MemoryPlan, plan: MemoryPlan) -> tuple[str, ...]:
    changes = []
    if plan.micro_batch != configured.micro_batch:
        changes.append(f"micro-batch {configured.micro_batch} -> {plan.micro_batch} (train.batch_size), gradient "
                       f"accumulation {configured.accumulation} -> {plan.accumulation}: still "
                       f"{plan.images_per_step} images per optimizer step")
    if configured.vae_on_device and not plan.vae_on_device:
        changes.append("VAE on the CPU (it only decodes the sample grid)")
    if not plan.ema_on_device:
        changes.append("EMA in host memory")
    if plan.gradient_checkpointing and not configured.gradient_checkpointing:
        changes.append("gradient checkpointing on (recomputes activations in backward)")
    return tuple(changes)


def apply_memory_plan(train: TrainConfig, plan: MemoryPlan) -> TrainConfig:
    """``train`` with the plan's micro-batch, accumulation and gradient checkpointing."""
    return train.model_copy(update={"batch_size": plan.micro_batch, "gradient_accumulation": plan.accumulation,
                                    "gradient_checkpointing": plan.gradient_checkpointing})


def device_memory_budget(device: torch.device) -> int | None:
    """Bytes a training plan may fill on ``device``: ``BUDGET_HEADROOM`` of that CUDA card's memory;
    None on the CPU (no budget: the plan is only predicted)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).total_memory * BUDGET_HEADROOM)

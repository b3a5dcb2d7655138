"""A training run's arithmetic and rules: steps and images per step, the learning rate at each step, the data
order of each epoch, and when a run stops (non-finite steps in a row, early stopping on a validation plateau)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset

from cxr_diffusion.diffusion.checkpoints import TrainingState
from cxr_diffusion.diffusion.data import ConditionedImages, collate
from cxr_diffusion.diffusion.latent_data import LatentImages
from cxr_diffusion.diffusion.step import StepReading
from cxr_diffusion.errors import UserError


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to do."""


@dataclass(frozen=True)
class Plan:
    """A run's arithmetic: images per optimizer step, micro-batches per process and epoch, steps in all."""

    images_per_step: int
    micro_per_epoch: int
    total_steps: int


def plan_run(train, images: int, world: int) -> Plan:
    micro_per_epoch = images // (train.batch_size * world)
    total_steps = train.epochs * max(1, micro_per_epoch // train.gradient_accumulation)
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    return Plan(train.batch_size * train.gradient_accumulation * world, micro_per_epoch, total_steps)


def lr_factor(step: int, total_steps: int, schedule: str, warmup: int, plateau_scale: float) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then the schedule."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        progress = min(1.0, max(0, step - warmup) / max(1, total_steps - warmup))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "plateau":
        return warm * plateau_scale
    return warm


def epoch_batches(dataset: ConditionedImages | LatentImages, train, plan: Plan, seed: int, state: TrainingState,
                  rank: int, world: int, pin_memory: bool) -> Iterator[dict]:
    """This process's micro-batches of ``state.epoch`` from ``state.batch_in_epoch`` on. The order is a
    permutation seeded by (seed, epoch); each global batch is split across the processes. Latents held in
    memory are gathered batch by batch; images go through a DataLoader (``train.num_workers``)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + state.epoch))
    usable = plan.micro_per_epoch * train.batch_size * world
    mine = order[:usable].view(plan.micro_per_epoch, world, train.batch_size)[:, rank][state.batch_in_epoch:]
    if isinstance(dataset, LatentImages):
        return (dataset.batch(indices) for indices in mine)
    return iter(DataLoader(Subset(dataset, mine.reshape(-1).tolist()), batch_size=train.batch_size, shuffle=False,
                           num_workers=train.num_workers, collate_fn=collate, pin_memory=pin_memory))


def count_nonfinite(state: TrainingState, reading: StepReading, train, what_to_do: str) -> None:
    """``train.max_nonfinite`` skipped steps in a row (non-finite loss or gradients) stop the run."""
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if reading.skipped else 0
    if state.nonfinite_in_a_row >= train.max_nonfinite:
        raise TrainingError(f"{state.nonfinite_in_a_row} consecutive non-finite losses or gradients (steps "
                            f"skipped) by step {reading.step}. " + what_to_do)


def record_validation(state: TrainingState, val_loss: float | None, train) -> bool:
    """Keep the best validation loss, cut the plateau schedule's rate; True when early stopping says stop."""
    if val_loss is None:
        return False
    if not math.isfinite(val_loss):  # the conditions and latents were checked finite: the weights diverged
        raise TrainingError(f"the validation loss at step {state.step} is {val_loss}: the EMA weights give non-finite "
                            f"outputs; lower the learning rate (lr, or train.lr) or train.grad_clip and rerun")
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.bad_validations = val_loss, 0
    else:
        state.bad_validations += 1
        if train.lr_schedule == "plateau" and state.bad_validations % train.plateau_patience == 0:
            state.plateau_scale *= train.plateau_factor
    return train.early_stopping_patience is not None and state.bad_validations >= train.early_stopping_patience

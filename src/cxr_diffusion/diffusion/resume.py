"""Resume policy: which settings a checkpoint must share with a run to be resumed, and writing and restoring
the whole training state (weights, EMA, optimizer, every process's random generators, ``TrainingState``)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from cxr_diffusion.config import Params, to_dict
from cxr_diffusion.diffusion.checkpoints import TrainingState, load_latest_checkpoint, save_checkpoint
from cxr_diffusion.diffusion.ema import EMA
from cxr_diffusion.diffusion.run_plan import Plan


# Train settings that change how fast a run goes, what it logs or how often it saves, never the weights
# it computes: a checkpoint written under other values of these is resumed. `lr` and `mixed_precision`
# are replaced by what they resolve to (this branch's rate, this machine's precision).
NOT_MATHS = frozenset({
    "lr", "mixed_precision", "max_nonfinite", "sample_every_steps", "sample_grid_images", "sample_grid_steps",
    "checkpoint_every_steps", "checkpoints_total_limit", "gradient_checkpointing", "compile", "num_workers",
    "launch_config",
})
VALIDATION_SETTINGS = frozenset({"val_every_steps", "val_images"})  # maths only through plateau/early stopping


def maths_settings(params: Params, branch: str) -> dict:
    """The settings a checkpoint must share with this run to be resumed: those that change its weights.

    ``gradient_checkpointing`` and ``compile`` change how the same maths is computed (to rounding);
    validation settings count only when the validation loss steers the run (plateau, early stopping).
    """
    train = params.train
    steered = train.lr_schedule == "plateau" or train.early_stopping_patience is not None
    skipped = NOT_MATHS if steered else NOT_MATHS | VALIDATION_SETTINGS
    return {"train": {key: value for key, value in to_dict(train).items() if key not in skipped},
            "lr": params.learning_rate(branch), "branch": branch, "seed": params.seed,
            "image_size": params.image_size, "channels": params.channels}


def save_training_state(accelerator: Accelerator, directory: Path, state: TrainingState, model: nn.Module,
                        optimizer, ema: EMA, generator: torch.Generator, total_limit: int) -> None:
    """A checkpoint written by the main process alone, with every process's RNG states; the others wait."""
    rng = torch.stack([generator.get_state(), torch.get_rng_state()]).to(accelerator.device)
    rng = accelerator.gather(rng).cpu().view(accelerator.num_processes, 2, -1)  # [process, noise | torch]
    if accelerator.is_main_process:
        save_checkpoint(directory, state, {"denoiser": model}, optimizer, {"noise": rng[:, 0], "torch": rng[:, 1]},
                        total_limit, {"ema": ema.tensors()}, log=accelerator.print)
    accelerator.wait_for_everyone()


def state_misfit(state: TrainingState, plan: Plan) -> str | None:
    """Why a checkpoint's counters cannot come from this run's plan (None: they can). The run hash pins the
    batch, the accumulation and the processes, so every step saw ``plan.images_per_step`` images; the data
    position is a micro-batch of the epoch, at most its end (a save at the last step of an epoch)."""
    if state.batch_in_epoch > plan.micro_per_epoch:
        return (f"batch_in_epoch {state.batch_in_epoch} is past the end of an epoch of this run "
                f"({plan.micro_per_epoch} micro-batches)")
    if state.images_seen != state.step * plan.images_per_step:
        return (f"images_seen {state.images_seen} is not step {state.step} x {plan.images_per_step} images per "
                "step of this run")
    return None


def resume(accelerator: Accelerator, directory: Path, run_hash: str, model: nn.Module, optimizer, ema: EMA,
           generator: torch.Generator, plan: Plan) -> TrainingState | None:
    """Restore the newest usable checkpoint of this run in place (None: start from scratch)."""
    world = accelerator.num_processes
    rng_like = {"noise": torch.empty((world, generator.get_state().numel()), dtype=torch.uint8),
                "torch": torch.empty((world, torch.get_rng_state().numel()), dtype=torch.uint8)}
    loaded = load_latest_checkpoint(directory, run_hash, {"denoiser": model}, optimizer, {"ema": ema.tensors()},
                                    log=accelerator.print, rng_like=rng_like,
                                    state_misfit=lambda state: state_misfit(state, plan))
    if loaded is None:
        return None
    generator.set_state(loaded.rng["noise"][accelerator.process_index].clone())
    torch.set_rng_state(loaded.rng["torch"][accelerator.process_index].clone())
    accelerator.print(f"resuming from {loaded.path} (step {loaded.state.step})")
    return loaded.state

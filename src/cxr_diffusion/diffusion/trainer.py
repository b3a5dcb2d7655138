"""Stage `train` (one run per branch): the shared training loop for every conditioning branch.

The branches differ only in their condition store (shape and source); the UNet, diffusion
process, optimisation, EMA, validation, checkpoints and logging are the same code. ``train_branch``
reads top to bottom: the machine (``machine.py``), the data, the model, resume, the steps, the export.
Each job lives in its own module: the loss and validation (``loss.py``), the run's arithmetic and stopping
rules (``run_plan.py``), resume (``resume.py``), DVCLive upkeep (``live_log.py``), throughput
(``throughput.py``) and the pipeline export (``export.py``).

Exact resume: data order comes from a per-epoch permutation seeded by (seed, epoch), and all
training randomness (noise, timesteps, condition dropout) from one generator per process whose state
is in every checkpoint with the weights, EMA, optimizer state and ``TrainingState`` (data position,
validation history). A checkpoint is resumed only under the same ``maths_settings``.
EMA: ``diffusion/ema.py`` (EDM's half-life in images, with its ramp-up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cxr_diffusion.config import Params
from cxr_diffusion.device import describe_device
from cxr_diffusion.diffusion.checkpoints import TrainingState, config_hash
from cxr_diffusion.diffusion.denoiser import build_denoiser, compiles
from cxr_diffusion.diffusion.ema import EMA, ema_beta
from cxr_diffusion.diffusion.export import sample_grid, save_pipeline
from cxr_diffusion.diffusion.live_log import live_step_restore, log_metrics, open_live
from cxr_diffusion.diffusion.loss import Validator, training_loss
from cxr_diffusion.diffusion.machine import Machine, set_up_machine, training_data
from cxr_diffusion.diffusion.noise import training_scheduler
from cxr_diffusion.diffusion.precision import describe_machine
from cxr_diffusion.diffusion.resume import maths_settings, resume, save_training_state
from cxr_diffusion.diffusion.run_plan import (
    TrainingError, count_nonfinite, epoch_batches, lr_factor, plan_run, record_validation,
)
from cxr_diffusion.conditioning.store import check_store_branch, store_digest
from cxr_diffusion.data.shards import check_prepared_for, prepared_digest
from cxr_diffusion.diffusion.step import LaggedReadings, StepReading, backward, optimizer_step
from cxr_diffusion.diffusion.throughput import Throughput, dynamo_frames_compiled, peak_device_memory


@dataclass(frozen=True)
class TrainPaths:
    prepared: Path        # data/prepared
    store: Path           # data/embeddings/<branch>
    clip: str | None      # CLIP source for the pipeline's encoders (text/vision branches)
    model_out: Path       # models/<branch>: the final pipeline
    checkpoints: Path     # checkpoints/<branch> (DVC persist)
    live: Path            # dvclive/<branch> (DVC persist)
    latents: Path | None = None  # data/latents (latent space only)


def train_branch(params: Params, branch: str, paths: TrainPaths) -> dict:
    """Train ``branch``'s model, resuming from the newest usable checkpoint of the same run; save the EMA pipeline."""
    for option, folder in (("--checkpoints", paths.checkpoints), ("--live", paths.live), ("--out", paths.model_out)):
        if folder.exists() and not folder.is_dir():  # found before training, not at the first save minutes later
            raise TrainingError(f"{option} {folder}: a file, not a folder; move it away, then rerun")
    check_prepared_for(paths.prepared, params.image_size, params.filter.classes)
    machine = set_up_machine(params, paths.prepared, paths.store, paths.latents)
    check_store_branch(machine.store, paths.store, branch)
    params, train, accelerator = machine.params, machine.params.train, machine.accelerator
    world = accelerator.num_processes

    # Data: the training images with a condition, and the fixed validation set.
    train_set, val_set = training_data(params, paths.prepared, machine.store, machine.latents,
                                       pin_memory=machine.device.type == "cuda")
    if len(train_set) < train.batch_size * world:
        raise TrainingError(f"{branch}: {len(train_set)} training images with a condition, fewer than one global batch "
                            f"({train.batch_size} x {world}); lower train.batch_size or add data")
    if len(train_set) < train.batch_size * train.gradient_accumulation * world:  # a step would span two epochs
        raise TrainingError(f"{branch}: {len(train_set)} training images with a condition, fewer than one optimizer "
                            f"step takes ({train.batch_size} x {train.gradient_accumulation} accumulated x {world}); "
                            "lower train.gradient_accumulation or train.batch_size, or add data")
    plan = plan_run(train, len(train_set), world)

    # Model, optimizer, EMA, validation.
    model = build_denoiser(params, machine.store, machine.latents)
    if train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if compiles(train.compile, machine.device):
        model.compile_for_training()
    base_lr = params.learning_rate(branch)
    # fused: one kernel per step, and none of the per-parameter temporaries of the plain loop
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=train.weight_decay, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    weights = list(unwrapped.parameters())
    ema = EMA(weights, on_host=machine.memory is not None and not machine.memory.ema_on_device)
    scheduler = training_scheduler(train)
    validator = Validator(val_set, scheduler, train.min_snr_gamma, params.seed, max(train.batch_size, 32))

    # Resume from the newest usable checkpoint written under the same maths on the same data, else start from
    # scratch: a finished run's checkpoint resumed on new data would hand back the old model.
    store, latents = machine.store, machine.latents
    run_hash = config_hash({**maths_settings(params, branch), "precision": machine.precision, "world": world,
                            "store": store.meta.get("encoder"), "condition_shape": [store.tokens, store.dim],
                            "latents": latents.meta if latents is not None else None,
                            "data": {"prepared": prepared_digest(paths.prepared), "store": store_digest(store),
                                     "latents": store_digest(latents) if latents is not None else None}})
    generator = torch.Generator().manual_seed(params.seed * 7 + accelerator.process_index)  # noise, t, dropout
    resumed = resume(accelerator, paths.checkpoints, run_hash, unwrapped, optimizer, ema, generator, plan)

    run = TrainingRun(params, branch, paths, machine, model, unwrapped, weights, optimizer, ema, scheduler, validator,
                      generator, train_set, val_set, plan, base_lr, resumed,
                      resumed or TrainingState(config_hash=run_hash))
    run.train()
    return run.finish()


class TrainingRun:
    """The steps of one run: one optimizer step per ``train.gradient_accumulation`` micro-batches, to
    ``plan.total_steps`` or early stopping, with lagged logging, validation of the EMA weights, sample grids
    and checkpoints; then the EMA weights saved as the pipeline."""

    def __init__(self, params: Params, branch: str, paths: TrainPaths, machine: Machine, model, unwrapped, weights,
                 optimizer, ema: EMA, scheduler, validator: Validator, generator: torch.Generator, train_set, val_set,
                 plan, base_lr: float, resumed: TrainingState | None, state: TrainingState):
        self.params, self.train_config, self.branch, self.paths, self.machine = params, params.train, branch, paths, machine
        self.accelerator = machine.accelerator
        self.model, self.unwrapped, self.weights, self.optimizer, self.ema = model, unwrapped, weights, optimizer, ema
        self.scheduler, self.validator, self.generator = scheduler, validator, generator
        self.train_set, self.val_set, self.plan, self.base_lr = train_set, val_set, plan, base_lr
        self.resumed, self.state = resumed, state
        self.what_to_do = (f"{branch}: the last good checkpoint in {paths.checkpoints} is intact; lower the learning "
                           f"rate (lr / train.lr.{branch}) or disable mixed precision (train.mixed_precision: no) and "
                           f"rerun.")
        memory = machine.memory
        self.logged_params = {"branch": branch, "lr": base_lr, "precision": machine.precision, **machine.probe,
                              "images_per_step": plan.images_per_step, "device": describe_device(machine.device),
                              **{f"machine/{key}": value for key, value in describe_machine().items()},
                              **(memory.as_log() if memory is not None else {})}
        self.live = None  # opened after the first step: a fresh Live empties its folder, and a run that fails at
        #                   once (a damaged shard, out of memory) must leave the last run's logs as they were
        self.throughput, self.started, self.compiled_before = Throughput(), time.perf_counter(), dynamo_frames_compiled()
        self.first_step_seconds, self.compiled_in_first_step = None, 0
        self.peak_lr = 0.0  # the highest rate a step of this run used: below lr while the warm-up lasts
        self.readings, self.logged_with = LaggedReadings(machine.device), {}  # step -> its host-side metrics
        self.progress = None

    def train(self) -> None:
        """Epochs of micro-batches until the last step; each epoch resumes where the state says."""
        stop = self.state.step >= self.plan.total_steps
        self.model.train()
        with tqdm(total=self.plan.total_steps, initial=self.state.step, desc=f"train {self.branch}", unit="step",
                  disable=not self.accelerator.is_main_process) as self.progress:
            while not stop:
                for batch in self.throughput.timed(epoch_batches(
                        self.train_set, self.train_config, self.plan, self.params.seed, self.state,
                        self.accelerator.process_index, self.accelerator.num_processes,
                        pin_memory=self.machine.device.type == "cuda")):
                    stepped = self.micro_batch(batch)
                    if stepped is not None and self.after_step(*stepped):
                        stop = True
                        break
                else:
                    self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
            self.log_readings(self.readings.flush())

    def micro_batch(self, batch: dict) -> tuple[dict, float] | None:
        """Forward and backward of one micro-batch; at the end of an accumulation, the optimizer and EMA step
        (returns its device-side readings and learning rate), else None."""
        accelerator, state, train = self.accelerator, self.state, self.train_config
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                loss = training_loss(self.model, self.scheduler, batch, train, self.generator, accelerator.device)
            backward(accelerator, loss)
            if accelerator.sync_gradients:
                lr = self.base_lr * lr_factor(state.step, self.plan.total_steps, train.lr_schedule,
                                              train.warmup_steps, state.plateau_scale)
                step_tensors = optimizer_step(accelerator, self.model, self.optimizer, lr, train.grad_clip, loss)
                self.peak_lr = max(self.peak_lr, lr)
        state.batch_in_epoch += 1
        if not accelerator.sync_gradients:
            return None
        self.ema.update(self.weights, ema_beta(train.ema_half_life_images, state.images_seen, self.plan.images_per_step))
        state.step += 1
        state.images_seen += self.plan.images_per_step
        if self.first_step_seconds is None:
            self.first_step_seconds = round(time.perf_counter() - self.started, 2)
            self.compiled_in_first_step = dynamo_frames_compiled() - self.compiled_before
            self.throughput.mark_run()
        return step_tensors, lr

    def after_step(self, step_tensors: dict, lr: float) -> bool:
        """Log the step (read back once the device is done with it), validate, checkpoint; True to stop."""
        state, train = self.state, self.train_config
        stop = state.step >= self.plan.total_steps
        self.progress.update()
        self.logged_with[state.step] = {"train/lr": lr, **self.throughput.read(self.accelerator.num_processes)}
        validating = state.step % train.val_every_steps == 0 or stop
        checkpointing = train.checkpoint_every_steps is not None and (
            state.step % train.checkpoint_every_steps == 0 or stop)
        self.log_readings(self.readings.push(state.step, step_tensors))
        if validating or checkpointing:
            self.log_readings(self.readings.flush())
        if validating:
            stop = self.validate(stop) or stop
        if checkpointing:
            with self.throughput.paused():
                save_training_state(self.accelerator, self.paths.checkpoints, state, self.unwrapped, self.optimizer,
                                    self.ema, self.generator, train.checkpoints_total_limit)
        if self.live is not None and validating:
            self.live.make_summary()
        return stop

    def validate(self, last: bool) -> bool:
        """Validation losses of the EMA weights (swapped in, no copy), with a sample grid now and then; True
        when early stopping says stop."""
        train = self.train_config
        with self.throughput.paused(), self.ema.swapped_into(self.weights):
            self.unwrapped.eval()
            metrics = self.validator(self.unwrapped)
            if self.live is not None and train.sample_grid_images > 0 and (
                    self.state.step % train.sample_every_steps == 0 or last):
                self.live.log_image("samples.png", sample_grid(
                    self.unwrapped, self.scheduler, self.val_set, self.params.seed, vae=self.machine.vae,
                    count=train.sample_grid_images, steps=train.sample_grid_steps))
            self.unwrapped.train()
        log_metrics(self.live, metrics)
        return record_validation(self.state, metrics.get("val/loss"), train)

    def log_readings(self, ready: list[StepReading]) -> None:
        for reading in ready:
            count_nonfinite(self.state, reading, self.train_config, self.what_to_do)
            self.progress.set_postfix(loss=f"{reading.loss:.4f}")
            if self.accelerator.is_main_process:
                self.live = self.live or open_live(self.paths.live, self.resumed, self.logged_params)
                self.live.step = reading.step
                log_metrics(self.live, {"train/loss": reading.loss, **self.logged_with.pop(reading.step),
                                        "train/grad_norm": reading.grad_norm})
                self.live.make_summary()
            live_step_restore(self.live, self.state.step)

    def finish(self) -> dict:
        """The run's summary; the EMA weights saved as the pipeline (the last checkpoint keeps the training state)."""
        accelerator, state, memory, world = self.accelerator, self.state, self.machine.memory, self.accelerator.num_processes
        accelerator.wait_for_everyone()
        compiled = dynamo_frames_compiled() - self.compiled_before
        result = {"branch": self.branch, "steps": state.step, "images_seen": state.images_seen, "lr": self.base_lr,
                  "peak_lr_this_run": self.peak_lr, "processes": world, "device": describe_device(accelerator.device),
                  "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
                  "precision": self.machine.precision, **self.machine.probe,
                  "seconds_this_run": round(time.perf_counter() - self.started, 1),
                  "train_images": len(self.train_set), "missing_condition": self.train_set.missing_condition,
                  "best_val_loss": state.best_val_loss, "first_step_seconds": self.first_step_seconds,
                  **self.throughput.run_summary(world), "compilations": compiled,
                  "recompilations": compiled - self.compiled_in_first_step,
                  "peak_device_memory_bytes": peak_device_memory(accelerator.device),
                  "memory_plan": memory.as_log() if memory is not None else None}
        if accelerator.is_main_process:
            self.optimizer.state.clear()  # in the last checkpoint; the pipeline needs only the EMA weights
            self.ema.move_into(self.weights)
            save_pipeline(self.params, self.branch, self.unwrapped, self.scheduler, self.paths.model_out,
                          self.paths.clip, vae=self.machine.vae)
            self.live = self.live or open_live(self.paths.live, self.resumed, self.logged_params)  # only the summary
            self.live.summary["final"] = {key: value for key, value in result.items() if isinstance(value, (int, float))}
            self.live.end()
        return result

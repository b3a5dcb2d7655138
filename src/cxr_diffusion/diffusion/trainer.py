"""Stage `train` (one run per branch): the shared training loop for every conditioning branch.

The branches differ only in their condition store (shape and source); the UNet, diffusion
process, optimisation, EMA, validation, checkpoints and logging are the same code. ``train_branch``
reads top to bottom in sections (machine, data, model, resume, train, save); the helpers above it
each do one of its jobs and are tested on their own.

Exact resume: data order comes from a per-epoch permutation seeded by (seed, epoch), and all
training randomness (noise, timesteps, condition dropout) from one generator per process whose state
is in every checkpoint with the weights, EMA, optimizer state and ``TrainingState`` (data position,
validation history). A checkpoint is resumed only under the same ``maths_settings``.
EMA: ``diffusion/ema.py`` (EDM's half-life in images, with its ramp-up).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cxr_diffusion.errors import UserError
from cxr_diffusion.config import Params, to_dict
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.diffusion.checkpoints import TrainingState, config_hash, load_latest_checkpoint, save_checkpoint
from cxr_diffusion.diffusion.condition import ConditionAdapter
from cxr_diffusion.diffusion.cpu_threads import cpu_threads_per_process
from cxr_diffusion.diffusion.data import ConditionedImages, collate
from cxr_diffusion.diffusion.ema import EMA, ema_beta
from cxr_diffusion.diffusion.latent_data import LatentImages
from cxr_diffusion.diffusion.memory_plan import MemoryPlan, apply_memory_plan, device_memory_budget, plan_memory
from cxr_diffusion.diffusion.grid import image_grid, tensor_to_pil
from cxr_diffusion.diffusion.noise import (
    loss_weights, sample_noise, sampling_scheduler, training_scheduler, training_target,
)
from cxr_diffusion.diffusion.precision import choose_mixed_precision, describe_machine, unet_block_speedup
from cxr_diffusion.diffusion.step import LaggedReadings, StepReading, backward, optimizer_step
from cxr_diffusion.diffusion.unet import build_unet
from cxr_diffusion.device import claim_device, describe_device, module_device, resolve_device
from cxr_diffusion.io import atomic_directory


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to do."""


@dataclass(frozen=True)
class TrainPaths:
    prepared: Path        # data/prepared
    store: Path           # data/embeddings/<branch>
    clip: str | None      # CLIP source for the pipeline's encoders (text/vision branches)
    model_out: Path       # models/<branch>: the final pipeline
    checkpoints: Path     # checkpoints/<branch> (DVC persist)
    live: Path            # dvclive/<branch> (DVC persist)
    latents: Path | None = None  # data/latents (latent space only)


class Denoiser(nn.Module):
    """UNet + condition adapter: the one module that is optimised, wrapped by accelerate, averaged by EMA."""

    def __init__(self, unet: nn.Module, adapter: ConditionAdapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def compile_for_training(self) -> None:
        """torch.compile the UNet for the training step alone. Validation (no grad, EMA weights) and the
        sample grid (fp32, other batch sizes, a 0-dim timestep) would each recompile a compiled module, for
        minutes at SD-1.5 size; they call the plain module, which shares the same parameters. The compiled
        callable is kept outside the module tree, so state_dict and save_pretrained are unchanged."""
        self.__dict__["_training_unet"] = torch.compile(self.unet)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        unet = self.__dict__.get("_training_unet", self.unet) if self.training else self.unet
        return unet(noisy, timesteps, encoder_hidden_states=self.adapter(condition, drop)).sample


def build_denoiser(params: Params, store: ConditionStore, latents: ConditionStore | None = None) -> Denoiser:
    """In pixel space the UNet sees images (channels x image_size^2); in latent space, VAE latents."""
    train = params.train
    dim = train.unet.cross_attention_dim or store.dim
    out_tokens = train.condition_tokens if store.tokens == 1 else store.tokens
    adapter = ConditionAdapter(tokens=store.tokens, dim=store.dim, out_tokens=out_tokens, out_dim=dim)
    if latents is not None:
        channels, size, _ = latents.meta["latent_shape"]
        unet = build_unet(train.unet, size, channels, dim)
    else:
        unet = build_unet(train.unet, params.image_size, params.channels, dim)
    return Denoiser(unet, adapter)


def compiles(setting: str, device: torch.device) -> bool:
    """Whether to torch.compile the UNet: ``auto`` on CUDA, where it measured 1.35x on an H200; on a CPU
    the compile takes minutes for little gain."""
    return setting == "always" or (setting == "auto" and device.type == "cuda")


def lr_factor(step: int, total_steps: int, schedule: str, warmup: int, plateau_scale: float) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then the schedule."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        progress = min(1.0, max(0, step - warmup) / max(1, total_steps - warmup))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "plateau":
        return warm * plateau_scale
    return warm


def diffusion_loss(model: nn.Module, scheduler, batch_pixels: torch.Tensor, condition: torch.Tensor,
                   timesteps: torch.Tensor, noise: torch.Tensor, gamma: float | None,
                   drop: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image min-SNR-weighted MSE between the model output and its target (eps or v)."""
    noisy = scheduler.add_noise(batch_pixels, noise, timesteps)
    target = training_target(scheduler, batch_pixels, noise, timesteps)
    prediction = model(noisy, timesteps, condition, drop)
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_image * loss_weights(scheduler, timesteps, gamma)


def training_loss(model: nn.Module, scheduler, batch: dict, train, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """The mean loss of one micro-batch on ``device``.

    Timesteps, noise and condition dropout are drawn from ``generator`` on the CPU, in this order,
    and only then moved: the draws are the same on every device, which is what exact resume and
    CPU/GPU comparisons rely on (a CUDA generator would give other numbers).
    """
    pixels = batch["pixel_values"]
    timesteps = torch.randint(0, train.num_train_timesteps, (len(pixels),), generator=generator)
    noise = sample_noise(pixels.shape, train.offset_noise, generator)
    drop = torch.rand(len(pixels), generator=generator) < train.cfg_dropout
    # non_blocking: pinned batches reach the GPU while it still computes the previous micro-batch
    pixels, condition, timesteps, noise, drop = (tensor.to(device, non_blocking=True) for tensor in (
        pixels, batch["condition"], timesteps, noise, drop))
    return diffusion_loss(model, scheduler, pixels, condition, timesteps, noise, train.min_snr_gamma, drop=drop).mean()


class Validator:
    """Validation loss on fixed images, noise and timesteps (comparable across runs and branches),
    with the true conditions and with shuffled ones: their difference is the conditioning gap."""

    def __init__(self, dataset: ConditionedImages | LatentImages, scheduler, gamma: float | None, seed: int, batch_size: int):
        self.scheduler, self.gamma, self.batch_size = scheduler, gamma, batch_size
        items = [dataset[i] for i in range(len(dataset))]
        self.batch = collate(items) if items else None
        if self.batch is None:
            return
        generator = torch.Generator().manual_seed(seed + 7919)
        n = len(items)
        self.timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        self.noise = torch.randn(self.batch["pixel_values"].shape, generator=generator)
        order = torch.randperm(n, generator=generator)
        self.shuffled = torch.empty(n, dtype=torch.long)
        self.shuffled[order] = order.roll(1)  # a derangement: no image keeps its own condition

    @torch.no_grad()
    def losses(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image losses with the true and with the shuffled conditions, on the model's device."""
        device = module_device(model)
        true_losses, shuffled_losses = [], []
        pixels, condition = self.batch["pixel_values"], self.batch["condition"]
        for start in range(0, len(pixels), self.batch_size):
            part = slice(start, start + self.batch_size)
            args = (self.scheduler, pixels[part].to(device))
            timesteps, noise = self.timesteps[part].to(device), self.noise[part].to(device)
            true_losses.append(diffusion_loss(model, *args, condition[part].to(device), timesteps, noise, self.gamma))
            shuffled_losses.append(diffusion_loss(model, *args, condition[self.shuffled[part]].to(device),
                                                  timesteps, noise, self.gamma))
        return torch.cat(true_losses), torch.cat(shuffled_losses)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        if self.batch is None:
            return {}
        true_losses, shuffled_losses = self.losses(model)
        true_loss, shuffled_loss = true_losses.mean().item(), shuffled_losses.mean().item()
        return {"val/loss": true_loss, "val/loss_shuffled_condition": shuffled_loss,
                "val/conditioning_gap": shuffled_loss - true_loss}


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


def pick_precision(train, device: torch.device, feature_size: int) -> tuple[str, dict]:
    """accelerate's mixed precision for this machine, and the bf16 probe's result when it ran (it is logged)."""
    if train.mixed_precision != "auto" or device.type != "cpu":
        return choose_mixed_precision(train.mixed_precision, device), {}
    speedup = round(unet_block_speedup(train.unet.block_out_channels[0], train.unet.norm_num_groups, feature_size,
                                       train.batch_size), 3)
    return choose_mixed_precision("auto", device, cpu_speedup=lambda: speedup), {"bf16_speedup": speedup}


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
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.bad_validations = val_loss, 0
    else:
        state.bad_validations += 1
        if train.lr_schedule == "plateau" and state.bad_validations % train.plateau_patience == 0:
            state.plateau_scale *= train.plateau_factor
    return train.early_stopping_patience is not None and state.bad_validations >= train.early_stopping_patience


def save_training_state(accelerator: Accelerator, directory: Path, state: TrainingState, model: nn.Module,
                        optimizer, ema: EMA, generator: torch.Generator, total_limit: int) -> None:
    """A checkpoint written by the main process alone, with every process's RNG states; the others wait."""
    rng = torch.stack([generator.get_state(), torch.get_rng_state()]).to(accelerator.device)
    rng = accelerator.gather(rng).cpu().view(accelerator.num_processes, 2, -1)  # [process, noise | torch]
    if accelerator.is_main_process:
        save_checkpoint(directory, state, {"denoiser": model}, optimizer, {"noise": rng[:, 0], "torch": rng[:, 1]},
                        total_limit, {"ema": ema.tensors()}, log=accelerator.print)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, directory: Path, run_hash: str, model: nn.Module, optimizer, ema: EMA,
           generator: torch.Generator) -> TrainingState | None:
    """Restore the newest usable checkpoint of this run in place (None: start from scratch)."""
    loaded = load_latest_checkpoint(directory, run_hash, {"denoiser": model}, optimizer, {"ema": ema.tensors()},
                                    log=accelerator.print)
    if loaded is None:
        return None
    generator.set_state(loaded.rng["noise"][accelerator.process_index].clone())
    torch.set_rng_state(loaded.rng["torch"][accelerator.process_index].clone())
    accelerator.print(f"resuming from {loaded.path} (step {loaded.state.step})")
    return loaded.state


def open_live(directory: Path, resumed: TrainingState | None, logged_params: dict):
    """DVCLive for this run: a fresh run's folder starts empty, a resumed run's keeps its rows up to the checkpoint."""
    from dvclive import Live

    if resumed is None:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        _drop_unreadable_live_summaries(directory)
    live = Live(dir=str(directory), resume=resumed is not None, save_dvc_exp=False, dvcyaml=False)
    if resumed is not None:
        _log_truncated_live(directory, resumed.step)
    live.log_params(logged_params)
    return live


def _drop_unreadable_live_summaries(live_dir: Path) -> None:
    """DVCLive rewrites metrics.json and params.yaml in place, so a run killed mid-write leaves one cut short,
    and ``Live(resume=True)`` would fail on it. Both are summaries it writes again (the step is set from the
    checkpoint, params are logged at once); a cut-short one is dropped, a readable one kept."""
    for name, parse in (("metrics.json", json.loads), ("params.yaml", yaml.safe_load)):
        path = live_dir / name
        try:
            if path.is_file():
                parse(path.read_text(encoding="utf-8"))
        except (ValueError, yaml.YAMLError):
            print(f"{path}: cut short by an interrupted run; dropped (DVCLive writes it again)")
            path.unlink()


def _log_truncated_live(live_dir: Path, keep_until_step: int) -> None:
    """Drop DVCLive rows logged after the checkpoint we resume from (they will be logged again)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        step_column = lines[0].split("\t").index("step")
        kept = lines[:1] + [line for line in lines[1:] if int(line.split("\t")[step_column]) <= keep_until_step]
        tsv.write_text("\n".join(kept) + "\n")


def log_metrics(live, metrics: dict[str, float]) -> None:
    if live is not None:
        for name, value in metrics.items():
            live.log_metric(name, value)


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


def plan_device_memory(params: Params, device: torch.device, precision: str, store: ConditionStore,
                       latents: ConditionStore | None, vae) -> MemoryPlan | None:
    """The memory plan for training on ``device`` (diffusion/memory_plan.py): micro-batch, accumulation,
    gradient checkpointing, EMA and VAE placement that fit its memory. None where there is no budget (a CPU)."""
    budget = device_memory_budget(device)
    if budget is None:
        return None
    train = params.train
    dim = train.unet.cross_attention_dim or store.dim
    tokens = train.condition_tokens if store.tokens == 1 else store.tokens
    channels, size = (latents.meta["latent_shape"][0], latents.meta["latent_shape"][1]) if latents is not None else (
        params.channels, params.image_size)
    vae_parameters = sum(parameter.numel() for parameter in vae.parameters()) if vae is not None else 0
    return plan_memory(train, size, channels, dim, tokens, precision, budget, vae_parameters, device.type)


def training_data(params: Params, paths: TrainPaths, store: ConditionStore, latents: ConditionStore | None,
                  pin_memory: bool) -> tuple[ConditionedImages | LatentImages, ConditionedImages | LatentImages]:
    """The training images with a condition and the fixed validation set: latents held in memory in
    latent space (no image decoded), prepared images otherwise."""
    limit = params.train.val_images
    if latents is not None:
        return (LatentImages(paths.prepared, "train", store, latents, pin_memory=pin_memory),
                LatentImages(paths.prepared, "val", store, latents, limit=limit))
    return (ConditionedImages(paths.prepared, "train", store, params.channels),
            ConditionedImages(paths.prepared, "val", store, params.channels, limit=limit))


def train_branch(params: Params, branch: str, paths: TrainPaths) -> dict:
    """Train ``branch``'s model, resuming from the newest usable checkpoint of the same run; save the EMA pipeline."""
    train = params.train

    # Machine: device, CPU threads, mixed precision, accelerate.
    torch.manual_seed(params.seed)
    device = resolve_device(params.device)  # accelerate places each process on its GPU; `cpu` forces the CPU
    processes = int(os.environ.get("WORLD_SIZE", 1))
    claim_device(device, processes)
    if device.type == "cpu":  # undo accelerate's OMP_NUM_THREADS=1 for the processes it launches
        torch.set_num_threads(cpu_threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", processes))))
    if train.space == "latent" and paths.latents is None:
        raise TrainingError("train.space is 'latent' but no latent store was given (stage encode_latents)")
    store = ConditionStore(paths.store)
    latents = ConditionStore(paths.latents) if train.space == "latent" else None
    feature_size = latents.meta["latent_shape"][1] if latents is not None else params.image_size
    precision, probe = pick_precision(train, device, feature_size)
    vae = None
    if latents is not None:
        from cxr_diffusion.diffusion.latents import load_vae

        vae = load_vae(train.vae)
    # Memory: on a GPU the micro-batch, accumulation, checkpointing and where the EMA and VAE live follow the
    # plan for the card (same images per optimizer step); elsewhere the params as they are.
    memory = plan_device_memory(params, device, precision, store, latents, vae)
    if memory is not None:
        train = apply_memory_plan(train, memory)
        params = params.model_copy(update={"train": train})
    accelerator = Accelerator(gradient_accumulation_steps=train.gradient_accumulation, mixed_precision=precision,
                              cpu=device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    if memory is not None:
        accelerator.print(memory.describe())
    if vae is not None and (memory is None or memory.vae_on_device):
        vae = vae.to(accelerator.device)

    # Data: the training images with a condition, and the fixed validation set.
    on_gpu = accelerator.device.type == "cuda"
    train_set, val_set = training_data(params, paths, store, latents, pin_memory=on_gpu)
    if len(train_set) < train.batch_size * world:
        raise TrainingError(f"{branch}: {len(train_set)} training images with a condition, fewer than one global batch "
                            f"({train.batch_size} x {world}); lower train.batch_size or add data")
    plan = plan_run(train, len(train_set), world)

    # Model, optimizer, EMA, validation.
    model = build_denoiser(params, store, latents)
    if train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if compiles(train.compile, accelerator.device):
        model.compile_for_training()
    scheduler = training_scheduler(train)
    base_lr = params.learning_rate(branch)
    # fused: one kernel per step, and none of the per-parameter temporaries of the plain loop
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=train.weight_decay, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    weights = list(unwrapped.parameters())
    ema = EMA(weights, on_host=memory is not None and not memory.ema_on_device)
    validator = Validator(val_set, scheduler, train.min_snr_gamma, params.seed, max(train.batch_size, 32))

    # Resume from the newest usable checkpoint written under the same maths, else start from scratch.
    run_hash = config_hash({**maths_settings(params, branch), "precision": precision, "world": world,
                            "store": store.meta.get("encoder"), "condition_shape": [store.tokens, store.dim],
                            "latents": latents.meta if latents is not None else None})
    generator = torch.Generator().manual_seed(params.seed * 7 + rank)  # timesteps, noise, condition dropout
    resumed = resume(accelerator, paths.checkpoints, run_hash, unwrapped, optimizer, ema, generator)
    state = resumed or TrainingState(config_hash=run_hash)
    what_to_do = (f"{branch}: the last good checkpoint in {paths.checkpoints} is intact; lower the learning rate "
                  f"(lr / train.lr.{branch}) or disable mixed precision (train.mixed_precision: no) and rerun.")
    logged_params = {"branch": branch, "lr": base_lr, "precision": precision, **probe,
                     "images_per_step": plan.images_per_step, "device": describe_device(accelerator.device),
                     **{f"machine/{key}": value for key, value in describe_machine().items()},
                     **(memory.as_log() if memory is not None else {})}

    # Train: one optimizer step per train.gradient_accumulation micro-batches, to total_steps or early stopping.
    live = None  # opened after the first step: a fresh Live empties its folder, and a run that fails at once
    #              (a damaged shard, out of memory) must leave the last run's logs as they were
    throughput, started, compiled_before = Throughput(), time.perf_counter(), dynamo_frames_compiled()
    first_step_seconds, compiled_in_first_step = None, 0
    readings, logged_with = LaggedReadings(accelerator.device), {}  # step -> its host-side metrics (lr, rates)

    def log_readings(ready: list[StepReading]) -> None:
        nonlocal live
        for reading in ready:
            count_nonfinite(state, reading, train, what_to_do)
            progress.set_postfix(loss=f"{reading.loss:.4f}")
            if accelerator.is_main_process:
                live = live or open_live(paths.live, resumed, logged_params)
                live.step = reading.step
                log_metrics(live, {"train/loss": reading.loss, **logged_with.pop(reading.step),
                                   "train/grad_norm": reading.grad_norm})
                live.make_summary()
            live_step_restore(live, state.step)

    stop = state.step >= plan.total_steps
    model.train()
    with tqdm(total=plan.total_steps, initial=state.step, desc=f"train {branch}", unit="step",
              disable=not accelerator.is_main_process) as progress:
        while not stop:
            batches = epoch_batches(train_set, train, plan, params.seed, state, rank, world, pin_memory=on_gpu)
            for batch in throughput.timed(batches):
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = training_loss(model, scheduler, batch, train, generator, accelerator.device)
                    backward(accelerator, loss)
                    if accelerator.sync_gradients:
                        lr = base_lr * lr_factor(state.step, plan.total_steps, train.lr_schedule, train.warmup_steps,
                                                 state.plateau_scale)
                        step_tensors = optimizer_step(accelerator, model, optimizer, lr, train.grad_clip, loss)
                state.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                ema.update(weights, ema_beta(train.ema_half_life_images, state.images_seen, plan.images_per_step))
                state.step += 1
                state.images_seen += plan.images_per_step
                stop = state.step >= plan.total_steps
                if first_step_seconds is None:
                    first_step_seconds = round(time.perf_counter() - started, 2)
                    compiled_in_first_step = dynamo_frames_compiled() - compiled_before
                    throughput.mark_run()

                # Log the step (read back once the device is done with it).
                progress.update()
                logged_with[state.step] = {"train/lr": lr, **throughput.read(world)}
                validating = state.step % train.val_every_steps == 0 or stop
                checkpointing = train.checkpoint_every_steps is not None and (
                    state.step % train.checkpoint_every_steps == 0 or stop)
                log_readings(readings.push(state.step, step_tensors))
                if validating or checkpointing:
                    log_readings(readings.flush())

                # Validate the EMA weights (swapped in, no copy), with a sample grid now and then.
                if validating:
                    with throughput.paused(), ema.swapped_into(weights):
                        unwrapped.eval()
                        metrics = validator(unwrapped)
                        if live is not None and train.sample_grid_images > 0 and (
                                state.step % train.sample_every_steps == 0 or stop):
                            live.log_image("samples.png", sample_grid(
                                unwrapped, scheduler, val_set, params.seed, vae=vae, count=train.sample_grid_images,
                                steps=train.sample_grid_steps))
                        unwrapped.train()
                    log_metrics(live, metrics)
                    stop = record_validation(state, metrics.get("val/loss"), train) or stop

                # Checkpoint the training state.
                if checkpointing:
                    with throughput.paused():
                        save_training_state(accelerator, paths.checkpoints, state, unwrapped, optimizer, ema,
                                            generator, train.checkpoints_total_limit)
                if live is not None and validating:
                    live.make_summary()
                if stop:
                    break
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        log_readings(readings.flush())

    # Save the EMA weights as the pipeline; the last checkpoint keeps the training state.
    accelerator.wait_for_everyone()
    result = {"branch": branch, "steps": state.step, "images_seen": state.images_seen, "lr": base_lr,
              "processes": world, "device": describe_device(accelerator.device),
              "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
              "precision": precision, **probe, "seconds_this_run": round(time.perf_counter() - started, 1),
              "train_images": len(train_set), "missing_condition": train_set.missing_condition,
              "best_val_loss": state.best_val_loss, "first_step_seconds": first_step_seconds,
              **throughput.run_summary(world), "compilations": dynamo_frames_compiled() - compiled_before,
              "recompilations": dynamo_frames_compiled() - compiled_before - compiled_in_first_step,
              "peak_device_memory_bytes": peak_device_memory(accelerator.device),
              "memory_plan": memory.as_log() if memory is not None else None}
    if accelerator.is_main_process:
        optimizer.state.clear()  # in the last checkpoint; the pipeline needs only the EMA weights
        ema.move_into(weights)
        save_pipeline(params, branch, unwrapped, scheduler, paths, vae=vae)
        live = live or open_live(paths.live, resumed, logged_params)  # no step left to take: only the summary
        live.summary["final"] = {key: value for key, value in result.items() if isinstance(value, (int, float))}
        live.end()
    return result


def live_step_restore(live, step: int) -> None:
    """Lagged rows set ``live.step`` to their own step; put it back to the current one for what follows."""
    if live is not None:
        live.step = step


@torch.no_grad()
def sample_grid(model: Denoiser, scheduler, dataset: ConditionedImages | LatentImages, seed: int, count: int = 8, steps: int = 20,
                vae=None):
    """Generations for the first ``count`` validation conditions (DPM-Solver++, guidance 3) above their
    real images: a quick look during training."""
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    count = min(count, len(dataset))
    if count == 0:
        return image_grid([], 1)
    items = [dataset[i] for i in range(count)]
    pipeline = CXRDiffusionPipeline(unet=model.unet, scheduler=sampling_scheduler(scheduler), condition_adapter=model.adapter,
                                    vae=vae)
    generated = pipeline(condition=torch.stack([i["condition"] for i in items]), guidance_scale=3.0,
                         num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), progress=False).images
    real = torch.stack([i["pixel_values"] for i in items])
    if vae is not None:  # latent space: the real latents decoded, as the generations are (no PNG is read)
        real = vae.decode((real / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample.float().cpu()
    return image_grid([tensor_to_pil(image.clamp(-1, 1)) for image in real] + list(generated), rows=2)


def save_pipeline(params: Params, branch: str, model: Denoiser, scheduler, paths: TrainPaths, vae=None) -> Path:
    """The final model as a diffusers pipeline directory (safetensors), with the encoders its branch needs."""
    from cxr_diffusion.conditioning.clip import load_text_encoder, load_vision_encoder
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    components = {}
    if branch == "clip_text":
        text = load_text_encoder(paths.clip, params.clip.revision)
        components = {"tokenizer": text.tokenizer, "text_encoder": text.model}
    elif branch == "clip_vision":
        vision = load_vision_encoder(paths.clip, params.clip.revision)
        components = {"image_processor": vision.processor, "image_encoder": vision.model}
    pipeline = CXRDiffusionPipeline(unet=model.unet, scheduler=sampling_scheduler(scheduler),
                                    condition_adapter=model.adapter, branch=branch, channels=params.channels,
                                    vae=vae, **components)
    with atomic_directory(paths.model_out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return paths.model_out

"""Stage `train` (one run per branch): the shared training loop for every conditioning branch.

The branches differ only in their condition store (shape and source); the UNet, diffusion
process, optimisation, EMA, validation, checkpoints and logging are the same code.

Exact resume: data order comes from a per-epoch permutation seeded by (seed, epoch), and all
training randomness (noise, timesteps, condition dropout) from one generator whose state is in
every checkpoint with the weights, EMA, optimizer, learning-rate state and data position.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
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
from cxr_diffusion.diffusion.grid import image_grid, tensor_to_pil
from cxr_diffusion.diffusion.noise import (
    loss_weights, sample_noise, sampling_scheduler, training_scheduler, training_target,
)
from cxr_diffusion.diffusion.precision import choose_mixed_precision, describe_machine, unet_block_speedup
from cxr_diffusion.diffusion.unet import build_unet
from cxr_diffusion.device import describe_device, module_device, resolve_device
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

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=self.adapter(condition, drop)).sample


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


def ema_decay(half_life_images: float, images_per_step: int) -> float:
    """Per-step EMA decay whose weights halve every ``half_life_images`` images (EDM's definition)."""
    return 0.5 ** (images_per_step / half_life_images)


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
    return diffusion_loss(model, scheduler, pixels.to(device), batch["condition"].to(device), timesteps.to(device),
                          noise.to(device), train.min_snr_gamma, drop=drop.to(device)).mean()


class Validator:
    """Validation loss on fixed images, noise and timesteps (comparable across runs and branches),
    with the true conditions and with shuffled ones: their difference is the conditioning gap."""

    def __init__(self, dataset: ConditionedImages, scheduler, gamma: float | None, seed: int, batch_size: int):
        self.scheduler, self.gamma, self.batch_size = scheduler, gamma, batch_size
        # collate keeps no full-size image, so drop each one as it is read (latent space keeps it in the item)
        items = [{k: v for k, v in dataset[i].items() if k != "image"} for i in range(len(dataset))]
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


@torch.no_grad()
def swap_weights(parameters, others) -> None:
    """Exchange the values of two same-shaped tensor lists in place (storage pointers, no copy):
    EMA's store/copy_to/restore would hold a third copy of the weights."""
    for parameter, other in zip(parameters, others, strict=True):
        parameter.data, other.data = other.data, parameter.data


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _log_truncated_live(live_dir: Path, keep_until_step: int) -> None:
    """Drop DVCLive rows logged after the checkpoint we resume from (they will be logged again)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        step_column = lines[0].split("\t").index("step")
        kept = lines[:1] + [line for line in lines[1:] if int(line.split("\t")[step_column]) <= keep_until_step]
        tsv.write_text("\n".join(kept) + "\n")


def train_branch(params: Params, branch: str, paths: TrainPaths) -> dict:
    """Train ``branch``'s model; resume from the newest valid checkpoint; save the EMA pipeline."""
    from dvclive import Live

    train = params.train
    torch.manual_seed(params.seed)
    device = resolve_device(params.device)  # accelerate places each process on its GPU; `cpu` forces the CPU
    if device.type == "cpu":  # undo accelerate's OMP_NUM_THREADS=1 for the processes it launches
        torch.set_num_threads(cpu_threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                         os.environ.get("WORLD_SIZE", 1)))))
    store = ConditionStore(paths.store)
    latents, vae = None, None
    if train.space == "latent":
        if paths.latents is None:
            raise TrainingError("train.space is 'latent' but no latent store was given (stage encode_latents)")
        latents = ConditionStore(paths.latents)
    feature_size = latents.meta["latent_shape"][1] if latents is not None else params.image_size
    probe: dict[str, float] = {}

    def bf16_speedup() -> float:  # measured only when mixed_precision is auto on a CPU; logged with the choice
        probe["bf16_speedup"] = round(unet_block_speedup(train.unet.block_out_channels[0], train.unet.norm_num_groups,
                                                         feature_size, train.batch_size), 3)
        return probe["bf16_speedup"]

    precision = choose_mixed_precision(train.mixed_precision, device, cpu_speedup=bf16_speedup)
    accelerator = Accelerator(gradient_accumulation_steps=train.gradient_accumulation, mixed_precision=precision,
                              cpu=device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    if latents is not None:
        from cxr_diffusion.diffusion.latents import load_vae

        vae = load_vae(train.vae).to(accelerator.device)
    train_set = ConditionedImages(paths.prepared, "train", store, params.channels, latents=latents)
    val_set = ConditionedImages(paths.prepared, "val", store, params.channels, limit=train.val_images, latents=latents)
    if len(train_set) < train.batch_size * world:
        raise TrainingError(f"{branch}: {len(train_set)} training images with a condition, fewer than one global batch "
                            f"({train.batch_size} x {world}); lower train.batch_size or add data")

    model = build_denoiser(params, store, latents)
    if train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if compiles(train.compile, accelerator.device):
        model.unet.compile()  # in place: state_dict keys and save_pretrained are unchanged
    scheduler = training_scheduler(train)
    base_lr = params.learning_rate(branch)
    # fused: one kernel per step, and none of the per-parameter temporaries of the plain loop
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=train.weight_decay, fused=True)
    images_per_step = train.batch_size * train.gradient_accumulation * world
    micro_per_epoch = len(train_set) // (train.batch_size * world)
    steps_per_epoch = max(1, micro_per_epoch // train.gradient_accumulation)
    total_steps = train.epochs * steps_per_epoch
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    ema = EMAModel(model.parameters(), decay=ema_decay(train.ema_half_life_images, images_per_step))

    run_config = {"params": to_dict(train), "lr": base_lr, "latents": latents.meta if latents else None, "branch": branch, "image_size": params.image_size,
                  "channels": params.channels, "seed": params.seed, "world": world,
                  "store": store.meta.get("encoder"), "condition_shape": [store.tokens, store.dim]}
    run_hash = config_hash(run_config)
    state = TrainingState(step=0, images_seen=0, epoch=0, batch_in_epoch=0, config_hash=run_hash,
                          extra={"plateau_scale": 1.0, "best_val": None, "bad_validations": 0, "nonfinite": 0})
    generator = torch.Generator().manual_seed(params.seed * 7 + rank)
    checkpoint_dir = paths.checkpoints / f"rank{rank}" if world > 1 else paths.checkpoints
    ema_tensors = {"ema": {str(i): p for i, p in enumerate(ema.shadow_params)}}
    loaded = load_latest_checkpoint(checkpoint_dir, run_hash, {"denoiser": model}, optimizer, ema_tensors,
                                    log=accelerator.print)
    if loaded is not None:
        state = loaded.state
        generator.set_state(loaded.rng["noise"])
        torch.set_rng_state(loaded.rng["torch"])
        ema.optimization_step = int(state.extra.get("ema_step", state.step))
        accelerator.print(f"{branch}: resuming from {loaded.path} (step {state.step})")
    ema.to(accelerator.device)  # the shadow weights follow the model; `to` makes new tensors, so re-point the saver
    ema_tensors = {"ema": {str(i): p for i, p in enumerate(ema.shadow_params)}}

    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    validator = Validator(val_set, scheduler, train.min_snr_gamma, params.seed, max(train.batch_size, 32))
    if accelerator.is_main_process and loaded is None:  # a fresh run: the old log goes only once all else is set up
        shutil.rmtree(paths.live, ignore_errors=True)
    live = Live(dir=str(paths.live), resume=loaded is not None, save_dvc_exp=False, dvcyaml=False) \
        if accelerator.is_main_process else None
    if live is not None and loaded is not None:
        _log_truncated_live(paths.live, state.step)
    if live is not None:
        live.log_params({"branch": branch, "lr": base_lr, "precision": precision, **probe,
                         "images_per_step": images_per_step,
                         "device": describe_device(accelerator.device),
                         **{f"machine/{k}": v for k, v in describe_machine().items()}})

    def set_lr() -> float:
        lr = base_lr * lr_factor(state.step, total_steps, train.lr_schedule, train.warmup_steps,
                                 state.extra["plateau_scale"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def checkpoint() -> None:
        state.extra["ema_step"] = ema.optimization_step
        save_checkpoint(checkpoint_dir, state, {"denoiser": unwrapped}, optimizer.optimizer
                        if hasattr(optimizer, "optimizer") else optimizer,
                        {"noise": generator.get_state(), "torch": torch.get_rng_state()}, train.checkpoints_total_limit,
                        ema_tensors)

    def validate_and_log() -> bool:
        """Validate the EMA weights; returns True when early stopping says stop."""
        swap_weights(unwrapped.parameters(), ema.shadow_params)  # no copy: a third set of weights is 3.4 GB at SD size
        unwrapped.eval()
        metrics = validator(unwrapped)
        if live is not None and train.sample_grid_images > 0 and (
                state.step % train.sample_every_steps == 0 or state.step >= total_steps):
            live.log_image("samples.png", sample_grid(unwrapped, scheduler, val_set, params.seed, vae=vae,
                                                      count=train.sample_grid_images, steps=train.sample_grid_steps))
        unwrapped.train()
        swap_weights(unwrapped.parameters(), ema.shadow_params)
        if live is not None:
            for name, value in metrics.items():
                live.log_metric(name, value)
        val = metrics.get("val/loss")
        if val is None:
            return False
        if state.extra["best_val"] is None or val < state.extra["best_val"]:
            state.extra["best_val"], state.extra["bad_validations"] = val, 0
        else:
            state.extra["bad_validations"] += 1
            if train.lr_schedule == "plateau" and state.extra["bad_validations"] % train.plateau_patience == 0:
                state.extra["plateau_scale"] *= train.plateau_factor
        patience = train.early_stopping_patience
        return patience is not None and state.extra["bad_validations"] >= patience

    progress = tqdm(total=total_steps, initial=state.step, desc=f"train {branch}", unit="step",
                    disable=not accelerator.is_main_process)
    started, waited, step_images, last_log = time.perf_counter(), 0.0, 0, time.perf_counter()
    model.train()
    stop = state.step >= total_steps
    while not stop:
        order = _epoch_order(len(train_set), params.seed, state.epoch)
        usable = micro_per_epoch * train.batch_size * world
        global_batches = order[:usable].view(micro_per_epoch, world, train.batch_size)[:, rank]
        indices = global_batches[state.batch_in_epoch:].reshape(-1).tolist()
        loader = DataLoader(Subset(train_set, indices), batch_size=train.batch_size, shuffle=False,
                            num_workers=train.num_workers, collate_fn=collate)
        fetch_started = time.perf_counter()
        for batch in loader:
            waited += time.perf_counter() - fetch_started
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = training_loss(model, scheduler, batch, train, generator, accelerator.device)
                finite = bool(torch.isfinite(loss))
                if finite:
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for parameter in model.parameters():
                        if parameter.grad is not None:  # EDM: never let one bad batch poison the weights
                            torch.nan_to_num(parameter.grad, nan=0.0, posinf=0.0, neginf=0.0, out=parameter.grad)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), train.grad_clip)
                    lr = set_lr()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            step_images += len(batch["pixel_values"]) * world
            if not finite:
                state.extra["nonfinite"] += 1
                if state.extra["nonfinite"] >= train.max_nonfinite:
                    progress.close()
                    raise TrainingError(
                        f"{branch}: {state.extra['nonfinite']} consecutive non-finite losses at step {state.step}. "
                        f"The last good checkpoint in {checkpoint_dir} is intact; lower the learning rate "
                        f"(lr / train.lr.{branch}) or disable mixed precision (train.mixed_precision: no) and rerun.")
            else:
                state.extra["nonfinite"] = 0
            if not accelerator.sync_gradients:
                fetch_started = time.perf_counter()
                continue
            ema.step(unwrapped.parameters())
            state.step += 1
            state.images_seen += images_per_step
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if live is not None:
                live.step = state.step
                now = time.perf_counter()
                live.log_metric("train/loss", loss.item())
                live.log_metric("train/lr", lr)
                live.log_metric("train/grad_norm", float(grad_norm))
                live.log_metric("train/img_per_s", step_images / max(now - last_log, 1e-9))
                live.log_metric("train/data_wait_fraction", waited / max(now - last_log, 1e-9))
                step_images, waited, last_log = 0, 0.0, now
            stop = state.step >= total_steps
            if state.step % train.val_every_steps == 0 or stop:
                stop = validate_and_log() or stop
                last_log = time.perf_counter()
            if train.checkpoint_every_steps is not None and (state.step % train.checkpoint_every_steps == 0 or stop):
                checkpoint()
            if live is not None:
                live.make_summary()
            if stop:
                break
            fetch_started = time.perf_counter()
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    seconds = time.perf_counter() - started

    accelerator.wait_for_everyone()
    result = {"branch": branch, "steps": state.step, "images_seen": state.images_seen, "lr": base_lr,
              "processes": world, "device": describe_device(accelerator.device), "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
              "precision": precision, **probe, "seconds_this_run": round(seconds, 1), "train_images": len(train_set),
              "missing_condition": train_set.missing_condition, "best_val_loss": state.extra["best_val"]}
    if accelerator.is_main_process:
        ema.copy_to(unwrapped.parameters())
        optimizer.state.clear()  # saved with the last checkpoint; the pipeline needs only the EMA weights
        ema.shadow_params = []
        save_pipeline(params, branch, unwrapped, scheduler, paths, vae=vae)
        if live is not None:
            live.summary["final"] = {k: v for k, v in result.items() if isinstance(v, (int, float))}
            live.end()
    return result


@torch.no_grad()
def sample_grid(model: Denoiser, scheduler, dataset: ConditionedImages, seed: int, count: int = 8, steps: int = 20,
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
    real = [tensor_to_pil(i.get("image", i["pixel_values"])) for i in items]  # latent space keeps the image too
    return image_grid(real + list(generated), rows=2)


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

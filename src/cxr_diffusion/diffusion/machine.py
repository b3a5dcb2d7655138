"""What a run gets from the machine it runs on: the device, CPU threads, mixed precision (probed on a CPU), the
memory plan for the card, accelerate, the VAE in latent space, and the data it trains on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.config import Params
from cxr_diffusion.device import claim_device, resolve_device
from cxr_diffusion.diffusion.cpu_threads import cpu_threads_per_process
from cxr_diffusion.diffusion.data import ConditionedImages
from cxr_diffusion.diffusion.latent_data import LatentImages
from cxr_diffusion.diffusion.latents import check_image_size, check_latents_fit, latent_shape, load_vae, vae_revision
from cxr_diffusion.diffusion.memory_plan import MemoryPlan, apply_memory_plan, device_memory_budget, plan_memory
from cxr_diffusion.diffusion.precision import choose_mixed_precision, unet_block_speedup
from cxr_diffusion.diffusion.run_plan import TrainingError
from cxr_diffusion.safe_text import visible_text


@dataclass
class Machine:
    """A run's machine: ``params`` as the memory plan left them (same images per optimizer step)."""

    params: Params
    accelerator: Accelerator
    precision: str
    probe: dict                   # the bf16 probe's result, when it ran (logged)
    memory: MemoryPlan | None     # None where there is no device budget (a CPU)
    store: ConditionStore
    latents: ConditionStore | None
    vae: object | None            # latent space only; on the device unless the plan keeps it on the host

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def processes_from_environment(variable: str, default: int) -> int:
    """A process count that a launcher (accelerate, torchrun) sets in the environment, checked."""
    value = os.environ.get(variable)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 1 << 16):
        raise TrainingError(f"the environment variable {variable} is {visible_text(repr(value), 40)}, expected a whole "
                            "number of processes from 1 (unset it, or launch through accelerate)")
    return int(value)


def set_up_machine(params: Params, prepared_dir: Path, store_dir: Path, latents_dir: Path | None) -> Machine:
    """Device, CPU threads, mixed precision, memory plan, accelerate and VAE, in the order the results depend on:
    the global seed first, then the precision probe, before any model weight is drawn."""
    train = params.train
    torch.manual_seed(params.seed)
    device = resolve_device(params.device)  # accelerate places each process on its GPU; `cpu` forces the CPU
    processes = processes_from_environment("WORLD_SIZE", 1)
    claim_device(device, processes)
    if device.type == "cpu":  # undo accelerate's OMP_NUM_THREADS=1 for the processes it launches
        torch.set_num_threads(cpu_threads_per_process(processes_from_environment("LOCAL_WORLD_SIZE", processes)))
    if train.space == "latent" and latents_dir is None:
        raise TrainingError("train.space is 'latent' but no latent store was given (stage encode_latents)")
    store = ConditionStore(store_dir)
    latents = ConditionStore(latents_dir) if train.space == "latent" else None
    feature_size = latent_shape(latents)[1] if latents is not None else params.image_size
    precision, probe = pick_precision(train, device, feature_size)
    vae = None
    if latents is not None:
        vae = load_vae(train.vae, vae_revision(params))
        check_image_size(params.image_size, vae)
        check_latents_fit(latents, vae, train.vae, params.image_size, prepared_dir)
    # On a GPU the micro-batch, accumulation, checkpointing and where the EMA and VAE live follow the plan for
    # the card (same images per optimizer step); elsewhere the params as they are.
    memory = plan_device_memory(params, device, precision, store, latents, vae)
    if memory is not None:
        params = params.model_copy(update={"train": apply_memory_plan(train, memory)})
    accelerator = Accelerator(gradient_accumulation_steps=params.train.gradient_accumulation,
                              mixed_precision=precision, cpu=device.type == "cpu")
    if memory is not None:
        accelerator.print(memory.describe())
    if vae is not None and (memory is None or memory.vae_on_device):
        vae = vae.to(accelerator.device)
    return Machine(params, accelerator, precision, probe, memory, store, latents, vae)


def pick_precision(train, device: torch.device, feature_size: int) -> tuple[str, dict]:
    """accelerate's mixed precision for this machine, and the bf16 probe's result when it ran (it is logged).

    The probe builds a layer, which draws from the global random generator: it runs on a fork of it, so the
    model's initial weights are the same whether the probe ran (``auto`` on a CPU) or not (``no``, a GPU)."""
    if train.mixed_precision != "auto" or device.type != "cpu":
        return choose_mixed_precision(train.mixed_precision, device), {}
    with torch.random.fork_rng(devices=[]):
        speedup = round(unet_block_speedup(train.unet.block_out_channels[0], train.unet.norm_num_groups,
                                           feature_size, train.batch_size), 3)
    return choose_mixed_precision("auto", device, cpu_speedup=lambda: speedup), {"bf16_speedup": speedup}


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
    channels, size = latent_shape(latents)[:2] if latents is not None else (params.channels, params.image_size)
    vae_parameters = sum(parameter.numel() for parameter in vae.parameters()) if vae is not None else 0
    return plan_memory(train, size, channels, dim, tokens, precision, budget, vae_parameters, device.type)


def training_data(params: Params, prepared: Path, store: ConditionStore, latents: ConditionStore | None,
                  pin_memory: bool) -> tuple[ConditionedImages | LatentImages, ConditionedImages | LatentImages]:
    """The training images with a condition and the fixed validation set: latents held in memory in
    latent space (no image decoded), prepared images otherwise."""
    limit = params.train.val_images
    if latents is not None:
        sets = (LatentImages(prepared, "train", store, latents, pin_memory=pin_memory),
                LatentImages(prepared, "val", store, latents, limit=limit))
    else:
        sets = (ConditionedImages(prepared, "train", store, params.channels),
                ConditionedImages(prepared, "val", store, params.channels, limit=limit))
    used = [name for images in sets for name in images.image_indices]
    store.check_finite(used)
    if latents is not None:
        latents.check_finite(used, "latent", "rerun the encode_latents stage (dvc repro encode_latents)")
    return sets

"""Stage `encode_latents`: VAE latents of every prepared image, computed once (latent space only).

As the reference work did with Stable Diffusion's VAE: each image is encoded once (the posterior
mean, times the VAE's scaling factor) and the UNet trains on those latents. Stored in the
condition-store format (rows x channels x height*width), keyed by Image Index, read row by row.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxr_diffusion.config import Params
from cxr_diffusion.conditioning.store import ConditionStore, ConditionStoreWriter, StoreError
from cxr_diffusion.data.filter import SPLITS
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.data.shards import PreparedImages, check_prepared_for, prepared_digest
from cxr_diffusion.device import describe_device
from cxr_diffusion.io import atomic_directory, write_json
from cxr_diffusion.safe_text import visible_text
from cxr_diffusion.whole_number import is_whole_number


def vae_revision(params: Params) -> str | None:
    """The revision ``fetch`` downloaded (and ``doctor`` checks) when ``train.vae`` is the fetched hub id."""
    return params.fetch.vae_revision if params.train.vae == params.fetch.vae_repo else None


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The hub id's config in the local Hugging Face cache at ``revision``, as a folder; None when not cached."""
    from cxr_diffusion.assets.download import AssetError, hub_snapshot

    try:
        return hub_snapshot(repo_id, revision=revision, local_files_only=True, allow_patterns=("config.json",))
    except (OSError, ValueError, AssetError):
        return None


def load_vae(source: str, revision: str | None = None):
    """The AutoencoderKL ``train.vae`` names: a folder, checked before it is built, or a hub id read from the local
    cache at ``revision`` (``vae_revision``), never downloaded at run time."""
    from diffusers import AutoencoderKL

    from cxr_diffusion.diffusion.model_limits import check_vae_folder

    folder = Path(source) if Path(source).is_dir() else _cached_snapshot(source, revision)
    if folder is not None:  # a hub id not in the cache is said by from_pretrained below
        check_vae_folder(folder)
    try:  # never a pickled .bin
        return AutoencoderKL.from_pretrained(source, use_safetensors=True, revision=revision,
                                             local_files_only=True).eval()
    except (OSError, ValueError) as error:
        raise DataError(
            f"train.vae: '{source}' could not be loaded{f' at revision {revision}' if revision else ''} "
            f"({type(error).__name__}). Point train.vae at a local AutoencoderKL directory, place the hub id in the "
            f"cache with `cxr-diffusion fetch`, or use train.space: pixel."
        ) from error


_REENCODE = "rerun the encode_latents stage (dvc repro -f encode_latents)"


def latent_shape(store: ConditionStore) -> tuple[int, int, int]:
    """The (channels, side, side) that ``encode_latents`` recorded in the store's store.json, checked against the
    rows it holds (channels x side*side values each): the trainer builds its UNet and views its data by it."""
    shape = store.meta.get("latent_shape")
    where = f"{store.path / 'store.json'}: latent_shape is {visible_text(repr(shape), 80)}"
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_whole_number(size, 1, 1 << 16) for size in shape)):
        raise StoreError(f"{where}, expected [channels, side, side] as whole numbers; {_REENCODE}")
    channels, height, width = shape
    if height != width or (channels, height * width) != (store.tokens, store.dim):
        raise StoreError(f"{where}, but its rows hold {store.tokens} x {store.dim} values (latents are square: "
                         f"channels x side x side); {_REENCODE}")
    return channels, height, width


def vae_factor(vae) -> int:
    """How many pixels a latent's side spans: each level of the VAE's encoder but the last halves the side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_latents_fit(store: ConditionStore, vae, vae_source: str, image_size: int, prepared_dir: Path) -> None:
    """The latent store was encoded by this VAE (``train.vae``, at its scaling factor) at this image size from
    these prepared images: else the UNet trains on latents its VAE cannot decode, its samples decode to the wrong
    size, or it trains on other images than the prepared ones (those without a latent left out silently)."""
    if store.meta.get("prepared") != prepared_digest(prepared_dir):
        raise StoreError(f"{store.path / 'store.json'}: latents encoded from other prepared images than "
                         f"{prepared_dir} (the dataset or the prepare stage changed since); {_REENCODE}")
    recorded = (store.meta.get("vae"), store.meta.get("scaling_factor"))
    if recorded != (vae_source, vae.config.scaling_factor):
        raise StoreError(f"{store.path / 'store.json'}: latents encoded by {visible_text(repr(recorded[0]), 120)} "
                         f"(scaling factor {visible_text(repr(recorded[1]), 30)}), but train.vae is "
                         f"{visible_text(repr(vae_source), 120)} (scaling factor {vae.config.scaling_factor}); "
                         f"{_REENCODE}")
    channels, side, _ = latent_shape(store)
    wanted = (vae.config.latent_channels, image_size // vae_factor(vae))
    if (channels, side) != wanted:
        raise StoreError(f"{store.path / 'store.json'}: latents of {channels} channels at {side}x{side}, but train.vae "
                         f"gives {wanted[0]} channels at {wanted[1]}x{wanted[1]} for image_size {image_size}; "
                         f"{_REENCODE}")


def check_image_size(image_size: int, vae) -> None:
    """``image_size`` is a multiple of the VAE's factor: each encoder level floors the side, so 17 px under a
    factor of 2 would silently train on 16 px and sample 16 px images."""
    factor = vae_factor(vae)
    if image_size % factor:
        raise DataError(f"image_size {image_size} is not a multiple of {factor}, the downscale factor of train.vae "
                        f"({len(vae.config.block_out_channels)} levels); choose a multiple of {factor}, or "
                        "train.space: pixel")


@torch.no_grad()
def encode_batch(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Scaled posterior means of a batch of [-1, 1] images, on the VAE's device."""
    pixels = pixel_values.to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def encode_latents(params: Params, prepared_dir: Path, out_dir: Path, metrics_path: Path | None = None,
                   device: torch.device = torch.device("cpu")) -> dict:
    """Posterior means x scaling factor of every prepared image, in fp32 on ``device`` (SD VAEs can
    overflow in fp16, and the latents are computed once, so full precision costs little). Images are
    read, encoded and written ``encode_latents.batch_size`` at a time: memory grows with that, not
    with the dataset."""
    if params.train.space != "latent":
        with atomic_directory(out_dir) as tmp:
            write_json(tmp / "not_used.json", {"reason": "train.space is 'pixel': no latents needed"})
        if metrics_path is not None:
            write_json(metrics_path, {"latents": False})
        return {"latents": False}
    vae = load_vae(params.train.vae, vae_revision(params)).to(device)
    manifest = check_prepared_for(prepared_dir, params.image_size, params.filter.classes)
    check_image_size(params.image_size, vae)
    channels, side = vae.config.latent_channels, params.image_size // vae_factor(vae)
    total, batch_size = manifest["written"], params.encode_latents.batch_size
    names: list[str] = []
    started = time.perf_counter()
    with ConditionStoreWriter(out_dir, total, channels, side * side, dtype="float32") as store:
        with tqdm(total=total, desc="encode_latents", unit="img") as progress:
            for split in SPLITS:
                images = PreparedImages(prepared_dir, split, channels=3)
                for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
                    latents = encode_batch(vae, batch["pixel_values"])
                    store.write(len(names), latents.reshape(len(latents), channels, side * side))
                    names += list(batch["image_index"])
                    progress.update(len(latents))
        store.finish(names, np.arange(len(names)), {"what": "vae latents", "vae": params.train.vae,
                                                    "prepared": prepared_digest(prepared_dir),
                                                    "latent_shape": [channels, side, side],
                                                    "scaling_factor": vae.config.scaling_factor})
    metrics = {"latents": True, "images": len(names), "latent_shape": [channels, side, side],
               "device": describe_device(device), "batch_size": batch_size,
               "seconds": round(time.perf_counter() - started, 1)}
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics

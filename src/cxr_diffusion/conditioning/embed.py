"""Stages `embed_clip_text`, `embed_clip_vision` and `elixr_standin`: conditions from a CLIP.

Each writes a condition store (``conditioning/store.py``) keyed by Image Index.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cxr_diffusion.config import ClipConfig, ParamsError
from cxr_diffusion.conditioning.clip import clip_source, encode_images, encode_prompts, load_text_encoder, load_vision_encoder
from cxr_diffusion.conditioning.prompts import check_one_prompt_per_finding, prompt_for, prompts_cut_alike
from cxr_diffusion.conditioning.store import ConditionStoreWriter
from cxr_diffusion.data.filtered_table import check_each_image_once, read_filtered_csv
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.data.shards import MANIFEST, iter_row_groups, read_manifest
from cxr_diffusion.device import describe_device, half_dtype
from cxr_diffusion.io import write_csv, write_json
from cxr_diffusion.safe_text import visible_text

CPU = torch.device("cpu")


def embed_clip_text(filtered_csv: str | Path, config: ClipConfig, demo_dir: str | Path, out_dir: str | Path,
                    metrics_path: str | Path | None = None, device: torch.device = CPU) -> dict:
    """Encode each distinct prompt once; every image points at its prompt's row."""
    table = read_filtered_table(Path(filtered_csv))
    prompts = []
    for line, labels in enumerate(table["Finding Labels"], start=2):
        try:
            prompts.append(prompt_for(labels, config))
        except DataError as error:
            raise DataError(f"{filtered_csv}: line {line}: {error}; rerun the filter stage") from None
    check_one_prompt_per_finding(table["Finding Labels"], prompts)
    unique = sorted(set(prompts))
    row_of = {prompt: i for i, prompt in enumerate(unique)}
    source = clip_source(config, demo_dir)
    encoder = load_text_encoder(source, config.revision).to(device, half_dtype(device))
    tokens, dim = encoder.shape
    alike = prompts_cut_alike(encoder.tokenizer, unique, tokens)
    if alike is not None:  # one condition for two findings: the branch could not learn them apart
        (other, prompt), longest = alike
        raise ParamsError(f"params: the prompts {visible_text(repr(other), 160)} and {visible_text(repr(prompt), 160)} "
                          f"are encoded as the same first {tokens} tokens by {visible_text(source, 120)} (the "
                          f"longest prompt has {longest}); change clip.prompt_template / clip.normal_prompt so that "
                          "the findings differ within the first tokens (case and extra spaces do not count)")
    started = time.perf_counter()
    hidden, mask, truncated = encode_prompts(encoder, unique, config.batch_size)
    with ConditionStoreWriter(out_dir, len(unique), tokens, dim, config.dtype) as store:
        store.write(0, hidden, mask)
        store.finish(list(table["Image Index"]), [row_of[p] for p in prompts],
                     {"branch": "clip_text", "encoder": source, "revision": config.revision, "what": "last_hidden_state"})
        counts = pd.Series(prompts).value_counts()
        write_csv(store.sidecar("prompts.csv"), pd.DataFrame({
            "row": range(len(unique)), "prompt": unique, "images": [int(counts[p]) for p in unique],
            "tokens": [len(encoder.tokenizer(p)["input_ids"]) for p in unique],
        }))
    metrics = {"images": len(table), "unique_prompts": len(unique), "truncated_prompts": truncated,
               "tokens": tokens, "dim": dim, "encoder": source, "device": describe_device(device), "seconds": round(time.perf_counter() - started, 2)}
    if metrics_path:
        write_json(metrics_path, metrics)
    return metrics


def read_filtered_table(path: Path) -> pd.DataFrame:
    """The filter stage's table (``Image Index``, ``Finding Labels``, as text), refused when it lists no image."""
    table = read_filtered_csv(path, dtype=str, keep_default_na=False)
    for column in ("Image Index", "Finding Labels"):
        if column not in table.columns:
            raise DataError(f"{path}: no '{column}' column (found {list(table.columns)}); pass the filter stage's output")
    if table.empty:
        raise DataError(f"{path}: no images (0 rows); nothing to embed. Check that the filter stage keeps images "
                        f"(filter.* params) and rerun it")
    check_each_image_once(path, table)  # the store holds one condition per image
    return table


def iter_prepared_images(prepared_dir: str | Path, batch_size: int) -> Iterator[tuple[list[str], list[Image.Image]]]:
    """(Image Index list, PIL list) batches over every prepared image, all splits, one row group at a time."""
    names, images = [], []
    for group in iter_row_groups(prepared_dir, ["image", "image_index"]):  # checked, decoded by the one decoder
        for image, name in zip(group["image"], group["image_index"]):
            names.append(name)
            images.append(image)
            if len(names) == batch_size:
                yield names, images
                names, images = [], []
    if names:
        yield names, images


def count_prepared_images(prepared_dir: Path) -> int:
    """How many images the prepare stage wrote, refused when none: there is nothing to embed."""
    total = read_manifest(prepared_dir).get("written")
    if not isinstance(total, int) or total <= 0:
        raise DataError(f"{prepared_dir / MANIFEST}: no prepared images (written: {total!r}); nothing to embed. "
                        f"Check that the filter stage keeps images (filter.* params) and rerun `dvc repro prepare`")
    return total


def embed_clip_vision(prepared_dir: str | Path, config: ClipConfig, demo_dir: str | Path, out_dir: str | Path,
                      metrics_path: str | Path | None = None, device: torch.device = CPU) -> dict:
    """One projected CLIP image embedding (1, projection_dim) per prepared image."""
    total = count_prepared_images(Path(prepared_dir))
    source = clip_source(config, demo_dir)
    encoder = load_vision_encoder(source, config.revision).to(device, half_dtype(device))
    tokens, dim = encoder.shape
    names: list[str] = []
    started = time.perf_counter()
    with ConditionStoreWriter(out_dir, total, tokens, dim, config.dtype) as store:
        with tqdm(total=total, desc="embed_clip_vision", unit="img") as progress:
            for batch_names, images in iter_prepared_images(prepared_dir, config.batch_size):
                store.write(len(names), encode_images(encoder, images))
                names += batch_names
                progress.update(len(batch_names))
        store.finish(names, np.arange(len(names)), {"branch": "clip_vision", "encoder": source,
                                                    "revision": config.revision, "what": "image_embeds"})
    seconds = time.perf_counter() - started
    metrics = {"images": len(names), "tokens": tokens, "dim": dim, "encoder": source,
               "device": describe_device(device), "images_per_second": round(len(names) / max(seconds, 1e-9), 1)}
    if metrics_path:
        write_json(metrics_path, metrics)
    return metrics


@torch.no_grad()
def standin_tokens(encoder, images: list[Image.Image], tokens: int) -> torch.Tensor:
    """ELIXR-B-shaped (n, tokens, width) stand-in: the vision tower's patch tokens, average-pooled."""
    inputs = encoder.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    pixels = inputs["pixel_values"].to(encoder.model.device, encoder.model.dtype)
    hidden = encoder.model.vision_model(pixel_values=pixels).last_hidden_state[:, 1:].float()
    return F.adaptive_avg_pool1d(hidden.transpose(1, 2), tokens).transpose(1, 2)

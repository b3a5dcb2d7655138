"""Stage `sample` (per branch): generate one image per test condition, plus the figures people look at.

Conditions come from the test images themselves (their prompt, the image as reference, their
ELIXR embedding), read from the branch's condition store. Generated images are written as
Parquet shards in exactly the `prepare` format (split "test", the source image's id and labels),
so every reader of real images reads them too.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cxr_diffusion.errors import UserError
from cxr_diffusion.config import NO_FINDING, Params
from cxr_diffusion.conditioning.prompts import prompt_for
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.data.decode import encode_png
from cxr_diffusion.data.shards import MANIFEST, ShardRecord, SplitShardWriter, close_writers, shard_schema
from cxr_diffusion.diffusion.data import ConditionedImages
from cxr_diffusion.diffusion.grid import image_grid, tensor_to_pil
from cxr_diffusion.diffusion.noise import sampling_scheduler
from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline
from cxr_diffusion.device import describe_device, half_dtype, resolve_device
from cxr_diffusion.io import atomic_directory, write_json


# Originals and generations kept for the figures: original_vs_generated_24.png shows this many pairs.
FIGURE_PAIRS = 24


class SamplingError(UserError, ValueError):
    """The model or the data cannot be sampled as asked; the message says why."""


def load_pipeline(model_dir: str | Path, sampler: str, device: torch.device = torch.device("cpu")) -> CXRDiffusionPipeline:
    """A saved model on ``device``: UNet, adapter and CLIP towers in bf16/fp16 on a GPU (fp32 on the CPU);
    the VAE in fp32 (SD VAEs can overflow in fp16), decoding one image at a time so that memory does
    not grow with ``sample.batch_size`` (50 decoded 512px images take ~36 GB on a CPU otherwise)."""
    pipeline = CXRDiffusionPipeline.from_pretrained(str(model_dir))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler, sampler)
    return place_pipeline(pipeline, device)


def place_pipeline(pipeline: CXRDiffusionPipeline, device: torch.device) -> CXRDiffusionPipeline:
    dtype = half_dtype(device)
    for name in ("unet", "condition_adapter", "text_encoder", "image_encoder"):
        module = getattr(pipeline, name, None)
        if module is not None:  # diffusers warns on any dtype cast, so cast only when it changes something
            module.to(device) if module.dtype == dtype else module.to(device, dtype)
    if pipeline.vae is not None:
        pipeline.vae.to(device, torch.float32)
        pipeline.vae.enable_slicing()
    return pipeline


def generate(pipeline: CXRDiffusionPipeline, conditions: torch.Tensor, params: Params, seed: int,
             batch_size: int | None = None) -> list[Image.Image]:
    """One image per condition row, batch by batch; batch ``i`` uses generator seed ``seed + i``."""
    batch_size = batch_size or params.sample.batch_size
    images = []
    for i, start in enumerate(range(0, len(conditions), batch_size)):
        out = pipeline(condition=conditions[start:start + batch_size], guidance_scale=params.sample.guidance_scale,
                       num_inference_steps=params.sample.steps, generator=torch.Generator().manual_seed(seed + i),
                       progress=False)
        images += out.images
    return images


def original_vs_generated(originals: list[Image.Image], generated: list[Image.Image], per_row: int = 6) -> Image.Image:
    """Rows of ``per_row`` originals, each followed by the row of their generations."""
    tiles = []
    for start in range(0, len(originals), per_row):
        tiles += originals[start:start + per_row] + generated[start:start + per_row]
    return image_grid(tiles, rows=2 * ((len(originals) + per_row - 1) // per_row))


def findings_grid(pipeline: CXRDiffusionPipeline, params: Params, seed: int) -> tuple[Image.Image, list[str]]:
    """clip_text only: one row per class, ``per_finding`` images of its prompt."""
    prompts = []
    for name, members in params.filter.class_members().items():
        label = NO_FINDING if name == NO_FINDING else members[0]
        prompts.append(prompt_for(label, params.clip))
    condition = pipeline.make_condition(prompt=prompts).repeat_interleave(params.sample.per_finding, 0)
    images = generate(pipeline, condition, params, seed + 10_000)
    return image_grid(images, rows=len(prompts)), prompts


def sample_branch(params: Params, branch: str, model_dir: Path, prepared_dir: Path, store_dir: Path,
                  out_dir: Path, figures_dir: Path, metrics_path: Path | None = None) -> dict:
    torch.manual_seed(params.seed)
    device = resolve_device(params.device)
    pipeline = load_pipeline(model_dir, params.sample.sampler, device)
    if pipeline.config.branch != branch:
        raise SamplingError(f"{model_dir} holds a {pipeline.config.branch} model, not {branch}")
    test = ConditionedImages(prepared_dir, "test", ConditionStore(store_dir), params.channels, limit=params.sample.count)
    if len(test) == 0:
        raise SamplingError(f"no test images with a {branch} condition in {prepared_dir}; check the filter split")
    # Streamed batch by batch: each batch of generations is written as it comes, and only the first
    # FIGURE_PAIRS originals and generations are kept (for the figures), so memory does not grow with sample.count.
    classes, size = tuple(params.filter.classes), params.sample.batch_size
    originals: list[Image.Image] = []
    generated: list[Image.Image] = []
    seconds = 0.0
    with atomic_directory(out_dir) as tmp:
        writer = SplitShardWriter(tmp, "test", shard_schema(classes), shard_size=10_000, row_group_size=64)
        with tqdm(total=len(test), desc=f"sample {branch}", unit="img") as progress:
            for i, start in enumerate(range(0, len(test), size)):
                items = [test[j] for j in range(start, min(start + size, len(test)))]
                started = time.perf_counter()
                batch = generate(pipeline, torch.stack([item["condition"] for item in items]), params,
                                 params.seed + i, batch_size=size)
                seconds += time.perf_counter() - started
                for item, image in zip(items, batch):  # each generation carries its source image's id and labels
                    writer.write(ShardRecord(image_png=encode_png(np.asarray(image)), image_index=item["image_index"],
                                             patient_id=item["patient_id"], view=item["view"],
                                             finding_labels=item["finding_labels"], split="test",
                                             labels=tuple(int(v) for v in item["labels"].tolist())))
                    if len(generated) < FIGURE_PAIRS:
                        originals.append(tensor_to_pil(item["pixel_values"]))
                        generated.append(image)
                progress.update(len(batch))
        shards = close_writers(tmp, {"test": writer})
        write_json(tmp / MANIFEST, {
            "images_in": len(test), "written": len(test), "rejected": 0, "rejected_by_reason": {},
            "per_split": {"train": 0, "val": 0, "test": len(test)}, "classes": list(classes),
            "image_size": params.image_size, "square": "generated", "shards": shards,
            "generated": {"branch": branch, "model": str(model_dir), "sampler": params.sample.sampler,
                          "steps": params.sample.steps, "guidance_scale": params.sample.guidance_scale,
                          "seed": params.seed},
        })

    with atomic_directory(figures_dir) as tmp:
        original_vs_generated(originals[:6], generated[:6]).save(tmp / "original_vs_generated_6.png")
        original_vs_generated(originals[:24], generated[:24]).save(tmp / "original_vs_generated_24.png")
        if branch == "clip_text" and params.sample.per_finding > 0:
            grid, prompts = findings_grid(pipeline, params, params.seed)
            grid.save(tmp / "one_row_per_finding.png")
            (tmp / "one_row_per_finding.txt").write_text("\n".join(prompts) + "\n")
    metrics = {"branch": branch, "images": len(test), "sampler": params.sample.sampler, "steps": params.sample.steps,
               "guidance_scale": params.sample.guidance_scale, "device": describe_device(device),
               "seconds": round(seconds, 1),
               "images_per_second": round(len(test) / max(seconds, 1e-9), 2)}
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics

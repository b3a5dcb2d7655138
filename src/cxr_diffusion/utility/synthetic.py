"""Synthetic training sets of the utility study, written in exactly the prepare format (split "train").

Each generated image carries the labels it was asked for (those of the real train image whose condition
it was generated from), never re-predicted. Variation ``r`` of every condition is generated with its own
seeds, so a k x N set holds k variations of each of the N conditions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.data.decode import encode_png
from cxr_diffusion.data.shards import MANIFEST, PreparedImages, ShardRecord, SplitShardWriter, close_writers, shard_schema
from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline
from cxr_diffusion.io import atomic_directory, write_json
from cxr_diffusion.sampling.sample import SamplerSettings, SamplingError, generate
from cxr_diffusion.config import Params

# Seeds of variation r start at seed + (r + 1) * VARIATION_SEED_STRIDE: far from the sample stage's seed + i.
VARIATION_SEED_STRIDE = 1_000_003


def synthetic_name(source: str, variation: int) -> str:
    """The image_index of variation ``variation`` generated from real image ``source``."""
    return f"{source}#syn{variation}"


def write_synthetic_set(pipeline: CXRDiffusionPipeline, branch: str, train: PreparedImages, positions: Sequence[int],
                        store: ConditionStore, params: Params, variations: int, out_dir: Path) -> dict:
    """Generate ``variations`` images per condition of the train images ``positions`` (those with a condition in
    ``store``) into ``out_dir`` as prepare-format shards; rows are ordered variation by variation. Returns the
    generation's facts (conditions, missing ones, settings, speed)."""
    usable = [p for p in positions if train.image_indices[p] in store]
    if not usable:
        raise SamplingError(f"none of the {len(positions)} train images of the utility subset has a condition in "
                         f"{store.path}; check the branch's embed stage")
    settings = SamplerSettings(params.utility.steps, params.utility.guidance_scale, params.sample.batch_size, "utility")
    classes, size = tuple(train.classes), settings.batch_size
    seconds = 0.0
    with atomic_directory(out_dir) as tmp:
        writer = SplitShardWriter(tmp, "train", shard_schema(classes), shard_size=10_000, row_group_size=64)
        with tqdm(total=variations * len(usable), desc="utility synthetic set", unit="img") as progress:
            for variation in range(variations):
                seed = params.seed + (variation + 1) * VARIATION_SEED_STRIDE
                for i, start in enumerate(range(0, len(usable), size)):
                    batch = usable[start:start + size]
                    conditions = torch.stack([store[train.image_indices[p]].embeddings for p in batch])
                    started = time.perf_counter()
                    images = generate(pipeline, conditions, params, seed + i, settings=settings)
                    seconds += time.perf_counter() - started
                    for position, image in zip(batch, images):
                        source = train[position]
                        writer.write(ShardRecord(
                            image_png=encode_png(np.asarray(image)),
                            image_index=synthetic_name(source["image_index"], variation),
                            patient_id=source["patient_id"], view=source["view"],
                            finding_labels=source["finding_labels"], split="train",
                            labels=tuple(int(v) for v in source["labels"].tolist())))
                    progress.update(len(batch))
        shards = close_writers(tmp, {"train": writer})
        count = variations * len(usable)
        facts = {"conditions": len(usable), "conditions_missing": len(positions) - len(usable),
                 "variations": variations, "images": count, "sampler": params.sample.sampler,
                 "steps": settings.steps, "guidance_scale": settings.guidance_scale, "batch_size": size,
                 "seconds": round(seconds, 1), "images_per_second": round(count / max(seconds, 1e-9), 2)}
        write_json(tmp / MANIFEST, {
            "images_in": count, "written": count, "rejected": 0, "rejected_by_reason": {},
            "per_split": {"train": count, "val": 0, "test": 0}, "classes": list(classes),
            "image_size": params.image_size, "square": "generated", "shards": shards,
            "generated": {**{k: facts[k] for k in ("sampler", "steps", "guidance_scale", "variations")},
                          "seed": params.seed, "branch": branch, "stage": "utility"},
        })
    return facts

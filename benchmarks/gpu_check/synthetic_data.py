"""A synthetic training set in the formats the pipeline writes, for timing the trainer without real data.

- ``prepared/``: prepare-format Parquet shards and manifest (``data/shards.py``'s writer), smooth grayscale
  images of ``image_size`` pixels;
- ``store/``: an ELIXR-like condition store (``ConditionStoreWriter``), random (tokens, 768) float16 rows;
- ``latents/``: the latent store of stage encode_latents, made by ``encode_latents`` itself with ``vae``.

The pixels and conditions carry no meaning: only shapes, formats and data paths matter for throughput.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_diffusion.conditioning.store import ConditionStoreWriter
from cxr_diffusion.config import Params
from cxr_diffusion.data.decode import encode_png
from cxr_diffusion.data.shards import MANIFEST, ShardRecord, SplitShardWriter, close_writers, shard_schema
from cxr_diffusion.diffusion.latents import encode_latents
from cxr_diffusion.io import write_json

CONDITION_DIM = 768  # ELIXR-B img_emb and CLIP ViT-L/14 width: nih-512's cross_attention_dim


def synthetic_image(size: int, seed: int) -> np.ndarray:
    """A smooth uint8 picture (compresses like a radiograph, not like noise)."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, np.pi)
    pattern = np.sin(fx * np.pi * axis[None, :] + phase) * np.cos(fy * np.pi * axis[:, None])
    return np.round(127.5 + 100 * pattern).astype(np.uint8)


def write_prepared(out: Path, image_size: int, counts: dict[str, int], classes: tuple[str, ...]) -> list[str]:
    """Prepare-format shards with ``counts[split]`` images per split; returns every Image Index written."""
    out.mkdir(parents=True)
    names: list[str] = []
    writers = {split: SplitShardWriter(out, split, shard_schema(classes), shard_size=10_000, row_group_size=64)
               for split in counts}
    for split, count in counts.items():
        for i in range(count):
            name = f"{len(names):08d}_000.png"
            labels = tuple(int(c == i % len(classes)) for c in range(len(classes)))
            writers[split].write(ShardRecord(
                image_png=encode_png(synthetic_image(image_size, len(names))), image_index=name,
                patient_id=str(len(names)), view="PA", finding_labels=classes[i % len(classes)], split=split,
                labels=labels))
            names.append(name)
    shards = close_writers(out, writers)
    total = len(names)
    write_json(out / MANIFEST, {
        "images_in": total, "written": total, "rejected": 0, "rejected_by_reason": {},
        "per_split": {split: counts.get(split, 0) for split in ("train", "val", "test")},
        "classes": list(classes), "image_size": image_size, "square": "synthetic", "shards": shards})
    return names


def write_condition_store(out: Path, names: list[str], tokens: int, seed: int = 0) -> None:
    """One random (tokens, CONDITION_DIM) condition per image, as embed_elixr stores them."""
    rng = np.random.default_rng(seed)
    with ConditionStoreWriter(out, len(names), tokens, CONDITION_DIM) as store:
        for start in range(0, len(names), 256):
            rows = min(256, len(names) - start)
            store.write(start, rng.standard_normal((rows, tokens, CONDITION_DIM), dtype=np.float32))
        store.finish(names, np.arange(len(names)), {"branch": "elixr", "encoder": "gpu_check synthetic (random)"})


def build_training_set(root: Path, params: Params, train_images: int, val_images: int, tokens: int,
                       device) -> dict[str, Path]:
    """prepared/, store/ and latents/ under ``root``; the latents are encoded with ``params.train.vae`` on ``device``."""
    names = write_prepared(root / "prepared", params.image_size, {"train": train_images, "val": val_images},
                           tuple(params.filter.classes))
    write_condition_store(root / "store", names, tokens)
    encode_latents(params, root / "prepared", root / "latents", device=device)
    return {"prepared": root / "prepared", "store": root / "store", "latents": root / "latents"}

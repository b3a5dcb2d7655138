"""A random ELIXR-B snapshot in the published layout, for a given list of NIH image ids.

The files are what ``Yasintuncer/nih-cxr14-elixr`` publishes and ``conditioning.elixr_files`` reads: a
``datasets.json`` at the root and ``elixrb/img_emb/img_emb_1.h5`` ... ``img_emb_12.h5``, each with an
``Image Index`` of byte strings (``b"00000001_000.png"``) and float32 ``img_emb`` rows of [32, 768], written by
that module's own writers. The embeddings are deterministic random numbers, NOT ELIXR: one standard-normal
[32, 768] array per image, drawn from (seed, the image id), so an image keeps its embedding whatever the
other ids are. They are not label-informed (the pipeline's in-pipeline ELIXR stand-in pools CLIP vision
tokens, which a rehearsal's random CLIP would not make more informative).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr_diffusion.conditioning.elixr_format import FeatureSpec, normalize_image_id
from cxr_diffusion.conditioning.elixr_index import read_snapshot_index
from cxr_diffusion.conditioning.elixr_writers import write_snapshot_index, write_snapshot_shard

DATASET, FEATURE, ROW_SHAPE = "elixrb/img_emb", "img_emb", (32, 768)
SHARDS = 12  # the published snapshot's shard count


def image_embedding(image_id: str, seed: int, shape: tuple[int, ...] = ROW_SHAPE) -> np.ndarray:
    """The stand-in embedding of one image: seeded by ``seed`` and the id itself."""
    digest = int.from_bytes(hashlib.sha256(normalize_image_id(image_id).encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest]).standard_normal(shape, dtype=np.float32)


def write_elixr_snapshot(folder: Path, image_ids: list[str], seed: int, what: str, progress: bool = True) -> dict:
    """Write the snapshot for ``image_ids`` (sorted, split over 12 shards) in ``folder``; read its index back."""
    ids = sorted({normalize_image_id(i) for i in image_ids})
    if len(ids) < SHARDS:
        raise ValueError(f"the ELIXR stand-in needs at least {SHARDS} image ids (one per shard), got {len(ids)}")
    shards = np.array_split(np.arange(len(ids)), SHARDS)
    for number, rows in enumerate(tqdm(shards, desc="elixr stand-in", unit="shard", disable=not progress), start=1):
        names = [ids[i] for i in rows]
        embeddings = np.stack([image_embedding(name, seed) for name in names])
        write_snapshot_shard(folder / DATASET / f"{FEATURE}_{number}.h5", names, FEATURE, embeddings,
                             attrs={"standin": what})
    write_snapshot_index(folder, {DATASET: [FeatureSpec(FEATURE, "float32", ROW_SHAPE)]},
                         {"name": "nih-cxr14-elixr", "standin": True, "description": what, "images": len(ids),
                          "shards": SHARDS})
    offered, _ = read_snapshot_index(folder)
    return {"images": len(ids), "architecture": {"layout": "published ELIXR snapshot", "dataset": DATASET,
                                                 "feature": FEATURE, "dtype": "float32",
                                                 "row_shape": list(offered[DATASET][FEATURE].shape),
                                                 "shards": SHARDS}}

"""Stage `elixr_standin`: an ELIXR-B stand-in written in the published snapshot layout.

The stand-in is NOT ELIXR: it is the in-pipeline CLIP's vision patch tokens, average-pooled to
``elixr.standin_tokens`` tokens (``embed.standin_tokens``). It is written exactly as the reference
work publishes ELIXR-B (``datasets.json`` + ``elixrb/img_emb/img_emb_N.h5`` with ``Image Index`` and
``img_emb``), so the offline default runs the same reader as the real snapshot; ``datasets.json``'s
``info`` and every shard's attributes say it is a stand-in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr_diffusion.config import ClipConfig, ElixrConfig
from cxr_diffusion.conditioning.clip import clip_source, load_vision_encoder
from cxr_diffusion.conditioning.elixr_format import FeatureSpec
from cxr_diffusion.conditioning.elixr_writers import write_snapshot_index, write_snapshot_shard
from cxr_diffusion.conditioning.embed import iter_prepared_images, standin_tokens
from cxr_diffusion.data.shards import read_manifest
from cxr_diffusion.device import describe_device, half_dtype
from cxr_diffusion.io import atomic_directory, write_json

# What the stand-in imitates: ELIXR-B's img_emb, the default elixr.dataset / elixr.feature.
STANDIN_DATASET, STANDIN_FEATURE = "elixrb/img_emb", "img_emb"


def write_elixr_standin(prepared_dir: str | Path, elixr: ElixrConfig, clip: ClipConfig, demo_dir: str | Path,
                        out_dir: str | Path, shard_size: int = 2000,
                        device: torch.device = torch.device("cpu")) -> dict:
    """Write the stand-in snapshot at ``out_dir``; when ``elixr.path`` names real files, only a note."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        if elixr.path is not None:
            write_json(tmp / "not_used.json", {"reason": f"elixr.path is '{elixr.path}': the real files are used"})
            return {"standin": False}
        source = clip_source(clip, demo_dir)
        what = (f"ELIXR-B stand-in: NOT ELIXR. Patch tokens of the in-pipeline CLIP vision tower, "
                f"average-pooled to {elixr.standin_tokens} tokens, in the published ELIXR snapshot layout.")
        encoder = load_vision_encoder(source, clip.revision).to(device, half_dtype(device))
        total = read_manifest(prepared_dir)["written"]
        names, blocks, shards, row_shape = [], [], 0, None

        def flush() -> None:
            nonlocal names, blocks, shards, row_shape
            if names:
                shards += 1  # published shards are numbered from 1
                embeddings = np.concatenate(blocks)
                row_shape = tuple(embeddings.shape[1:])
                write_snapshot_shard(tmp / STANDIN_DATASET / f"{STANDIN_FEATURE}_{shards}.h5", names,
                                     STANDIN_FEATURE, embeddings, attrs={"standin": what})
                names, blocks = [], []

        with tqdm(total=total, desc="elixr_standin", unit="img") as progress:
            for batch_names, images in iter_prepared_images(prepared_dir, clip.batch_size):
                blocks.append(standin_tokens(encoder, images, elixr.standin_tokens).float().cpu().numpy())
                names += batch_names
                progress.update(len(batch_names))
                if len(names) >= shard_size:
                    flush()
        flush()
        write_snapshot_index(tmp, {STANDIN_DATASET: [FeatureSpec(STANDIN_FEATURE, "float32", row_shape)]},
                             {"standin": True, "description": what, "encoder": source, "images": total,
                              "shards": shards, "device": describe_device(device)})
    return {"standin": True, "images": total, "shards": shards}

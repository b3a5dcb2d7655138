"""`embed_clip_vision` throughput against the bare vision-model forward on the same batches.

    python benchmarks/embed_vision_throughput.py --prepared data/prepared --clip models/clip

The stage reads shards, decodes PNGs, runs the CLIP image processor and the vision tower with
projection, and writes the store; the bound is the tower's forward alone on the same, already
preprocessed batches, measured in the same run. Target: ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table

from cxr_diffusion.config import ClipConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.conditioning.clip import load_vision_encoder
from cxr_diffusion.conditioning.embed import embed_clip_vision, iter_prepared_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--clip", default="models/clip", help="CLIP directory or hub id")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    encoder = load_vision_encoder(args.clip)
    batches = [encoder.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
               for _, images in iter_prepared_images(args.prepared, args.batch_size)]
    count = sum(len(b) for b in batches)
    with torch.no_grad():
        encoder.model(pixel_values=batches[0])  # warm-up
        started = time.perf_counter()
        for pixel_values in batches:
            encoder.model(pixel_values=pixel_values)
        bound = count / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        embed_clip_vision(args.prepared, profile_section(ClipConfig, model=args.clip, batch_size=args.batch_size), args.clip,
                          Path(tmp) / "store")
        stage = count / (time.perf_counter() - started)
    ratio = stage / bound
    print(markdown_table(["images", "bare forward img/s", "embed_clip_vision img/s", "ratio", ">= 0.8"],
                         [[count, f"{bound:.1f}", f"{stage:.1f}", f"{ratio:.2f}", "yes" if ratio >= 0.8 else "NO"]]))


if __name__ == "__main__":
    main()

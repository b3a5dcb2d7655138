"""Benchmark the `prepare` stage: throughput against the decode+resize bound, and flat memory.

    python benchmarks/prepare_benchmark.py                       # defaults below
    python benchmarks/prepare_benchmark.py --throughput-images 400 --rss-sizes 2000 8000

Throughput: images/s of `prepare_shards` (all cores) divided by the bound measured in the same run:
a tight single-process decode+resize+encode loop over the same files, times the worker count.
Target >= 0.7. Memory: peak RSS of the whole process tree of `prepare` at two dataset sizes.
Target ratio (large/small) <= 1.3.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import PeakTreeRss, machine_line, markdown_table

from cxr_diffusion.profiles import params_with
from cxr_diffusion.data.decode import DecodeBudget, encode_png, preprocess
from cxr_diffusion.data.filter import run_filter
from cxr_diffusion.data.nih import NIH_HEADER
from cxr_diffusion.data.prepare import prepare_shards
from cxr_diffusion.data.sources import build_dataset, default_workers


def synthetic_download(root: Path, n_images: int, source_size: int, seed: int = 0) -> Path:
    """An NIH-layout folder of smooth, noisy grayscale PNGs (compress like radiographs do)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:source_size, 0:source_size] / source_size
    base = 120 + 80 * np.sin(6 * xx) * np.cos(4 * yy)
    templates = [np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8) for _ in range(16)]
    rows = []
    for i in range(n_images):
        name = f"{i + 1:08d}_000.png"
        Image.fromarray(templates[i % 16]).save(folder / name, compress_level=6)
        rows.append([name, "Effusion" if i % 3 else "No Finding", 0, i + 1, 50, "M", "PA", 2500, 2048, 0.143, 0.143])
    pd.DataFrame(rows, columns=list(NIH_HEADER)).to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    return root


def params_for(root: Path, image_size: int):
    return params_with({
        "image_size": image_size,
        "dataset": {"source": "nih", "nih_root": str(root)},
        "filter": {"classes": ["Effusion", "No Finding"], "merges": {}},
        "prepare": {"shard_size": 2000, "row_group_size": 64},
    })


def staged(work: Path, n_images: int, source_size: int, image_size: int):
    root = synthetic_download(work / "nih", n_images, source_size)
    params = params_for(root, image_size)
    build_dataset(params, work / "dataset")
    run_filter(work / "dataset", params.filter, params.seed, work / "filtered", work / "filter.json")
    return params


def throughput(n_images: int, source_size: int, image_size: int) -> list[object]:
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = staged(work, n_images, source_size, image_size)
        files = sorted((work / "nih" / "images_001" / "images").glob("*.png"))
        started = time.perf_counter()
        for path in files:
            encode_png(preprocess(path.read_bytes(), image_size, "pad", DecodeBudget.from_config(params.prepare)))
        bound = len(files) / (time.perf_counter() - started) * workers
        started = time.perf_counter()
        prepare_shards(params, work / "dataset", work / "filtered" / "filtered.csv", work / "prepared", workers=workers)
        measured = len(files) / (time.perf_counter() - started)
    ratio = measured / bound
    return [f"{n_images} x {source_size}px -> {image_size}px", workers, f"{bound:.1f}", f"{measured:.1f}",
            f"{ratio:.2f}", "yes" if ratio >= 0.7 else "NO"]


def peak_rss_of_prepare(n_images: int, source_size: int, image_size: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        staged(work, n_images, source_size, image_size)
        code = (
            "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "from prepare_benchmark import params_for; from cxr_diffusion.data.prepare import prepare_shards;"
            "w = Path(sys.argv[2]); prepare_shards(params_for(w / 'nih', int(sys.argv[3])), w / 'dataset',"
            " w / 'filtered' / 'filtered.csv', w / 'prepared')"
        )
        process = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(work), str(image_size)],
                                   stderr=subprocess.DEVNULL)
        with PeakTreeRss(process.pid) as sampler:
            process.wait()
        if process.returncode:
            raise SystemExit(f"prepare failed with exit code {process.returncode}")
        return sampler.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput-images", type=int, default=300)
    parser.add_argument("--source-size", type=int, default=1024, help="side of the synthetic source PNGs")
    parser.add_argument("--image-size", type=int, default=64, help="prepared size")
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=[2000, 8000])
    parser.add_argument("--rss-source-size", type=int, default=256)
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    print(f"cpu: {machine_line()}; {default_workers()} workers\n")
    row = throughput(args.throughput_images, args.source_size, args.image_size)
    print(markdown_table(["images", "workers", "bound img/s", "prepare img/s", "ratio", ">= 0.7"], [row]))
    small, large = (peak_rss_of_prepare(n, args.rss_source_size, args.image_size) for n in args.rss_sizes)
    ratio = large / small
    print()
    print(markdown_table(
        ["images", "peak RSS (MiB)", "ratio to smallest", "<= 1.3"],
        [[args.rss_sizes[0], f"{small / 2**20:.0f}", "1.00", ""],
         [args.rss_sizes[1], f"{large / 2**20:.0f}", f"{ratio:.2f}", "yes" if ratio <= 1.3 else "NO"]],
    ))


if __name__ == "__main__":
    main()

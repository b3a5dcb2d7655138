"""Benchmark memory of the ELIXR branch at full NIH size: building the store, then a training-style pass.

    nice -n 10 python benchmarks/elixr_memory.py                    # 48,311 x 32 x 768, ~4.7 GB of HDF5
    nice -n 10 python benchmarks/elixr_memory.py --rows 5000        # quick check

Writes a synthetic ELIXR-B set (float32 HDF5 shards in the published layout) and a matching filtered
CSV to a temporary folder, then measures the peak RSS of this process for:
  build  `build_elixr_store`: ids scanned, embeddings streamed chunk by chunk into the store
  train  every row read once in random order through `ConditionStore`, batches of 64, as a DataLoader would
Target: peak RSS < 2048 MiB for each. RssAnon (heap, not file-backed pages) is shown beside it, because
pages of a memory-mapped file count in RSS while mapped yet are page cache the kernel can reclaim.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import PeakSampler, PeakTreeRss, anon_rss_bytes, markdown_table

from cxr_diffusion.conditioning.elixr import build_elixr_store
from cxr_diffusion.conditioning.elixr_writers import write_elixr_hdf5_shard
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.profiles import profile_section

FULL_ROWS = 48_311          # images in NIH ChestX-ray14 with published ELIXR-B embeddings
ELIXR_SHAPE = (32, 768)     # ELIXR-B tokens x dim
TARGET_MIB = 2048           # peak RSS each stage must stay under
MIN_FREE_BYTES = 15 << 30   # below this, the full set (~4.7 GB HDF5 + ~2.4 GB store) is not attempted
BATCH = 64                  # training batch size
MIB = 1 << 20


def rows_that_fit(workdir: Path, wanted: int) -> int:
    free = shutil.disk_usage(workdir).free
    if free >= MIN_FREE_BYTES:
        return wanted
    per_row = np.prod(ELIXR_SHAPE) * (4 + 2)  # float32 source + float16 store
    rows = max(1_000, min(wanted, int(free * 0.4 / per_row)))
    print(f"WARNING: only {free / (1 << 30):.1f} GiB free in {workdir} (< {MIN_FREE_BYTES >> 30} GiB); "
          f"using {rows} rows instead of {wanted}: not the full-size measurement", file=sys.stderr)
    return rows


def write_synthetic_set(folder: Path, rows: int, shards: int, seed: int = 0) -> list[str]:
    """Published-layout shards of random float32 embeddings; returns the Image Index of every row in order."""
    rng = np.random.default_rng(seed)
    names = [f"{i // 10 + 1:08d}_{i % 10:03d}.png" for i in range(rows)]
    for shard, part in enumerate(np.array_split(np.arange(rows), shards)):
        embeddings = rng.standard_normal((len(part), *ELIXR_SHAPE), dtype=np.float32)
        write_elixr_hdf5_shard(folder / f"elixr_{shard:03d}.h5", [names[i] for i in part], embeddings)
        del embeddings
    return names


class StoreDataset(Dataset):
    def __init__(self, store: ConditionStore, names: list[str]):
        self.store, self.names = store, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store[self.names[i]].embeddings


def training_pass(store_dir: Path, names: list[str], seed: int = 0) -> int:
    """Read every row once in random order, batched, as training does; returns rows read."""
    store = ConditionStore(store_dir)
    loader = DataLoader(StoreDataset(store, names), batch_size=BATCH, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    seen = 0
    for batch in loader:
        assert batch.shape[1:] == ELIXR_SHAPE and torch.isfinite(batch).all()
        seen += len(batch)
    return seen


def measure(stage: str, rows: int, work) -> list[object]:
    start = time.perf_counter()
    with PeakTreeRss() as rss, PeakSampler(anon_rss_bytes) as anon:
        done = work()
    seconds = time.perf_counter() - start
    peak = rss.peak / MIB
    return [stage, done if done is not None else rows, f"{peak:.0f}", f"{anon.peak / MIB:.0f}", f"< {TARGET_MIB}",
            "pass" if peak < TARGET_MIB else "FAIL", f"{seconds:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="store dtype")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    rows = rows_that_fit(args.workdir, args.rows)
    root = Path(tempfile.mkdtemp(prefix="elixr_memory.", dir=args.workdir))
    try:
        (root / "elixr").mkdir()
        start = time.perf_counter()
        names = write_synthetic_set(root / "elixr", rows, args.shards)
        pd.DataFrame({"Image Index": names, "Finding Labels": "No Finding"}).to_csv(root / "filtered.csv", index=False)
        print(f"synthetic set: {rows} x {ELIXR_SHAPE} float32 in {args.shards} shards, "
              f"{sum(p.stat().st_size for p in (root / 'elixr').iterdir()) / (1 << 30):.2f} GiB, "
              f"written in {time.perf_counter() - start:.0f} s", file=sys.stderr)

        config = profile_section(ElixrConfig, path=str(root / "elixr"), shape=ELIXR_SHAPE, dtype=args.dtype)
        build_row = measure("build_elixr_store", rows, lambda: build_elixr_store(
            root / "filtered.csv", config, root / "store", root / "rejects.csv", root / "metrics.json",
            "elixr")["written"])
        train_row = measure(f"training pass (random order, batch {BATCH})", rows,
                            lambda: training_pass(root / "store", names))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nELIXR memory, {rows} x {ELIXR_SHAPE}, store dtype {args.dtype}:\n")
    print(markdown_table(["stage", "rows", "peak RSS MiB", "peak anon MiB", "target MiB", "pass/fail", "seconds"],
                         [build_row, train_row]))


if __name__ == "__main__":
    main()

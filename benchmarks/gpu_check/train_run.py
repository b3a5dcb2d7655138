"""One timed run of the project's trainer (``train_branch``) on a synthetic set; its numbers as JSON.

Run by train_check.py, one process per run, so that a run that runs out of GPU memory or hangs in a
compile leaves the next one a clean GPU. Numbers the trainer returns are read with ``.get()`` (older
trainers lack some); where one is missing, this process measures it itself and says so:

- img/s after the first step and the data-wait fraction: from the trainer's own DVCLive rows
  (``train/img_per_s``, ``train/data_wait_fraction``), first step left out;
- first-step seconds: images per step / the first row's img/s (that row also holds the loader's start);
- dynamo compilations: torch._dynamo's count of frames it compiled in this process;
- peak GPU memory: torch.cuda.max_memory_allocated() over the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from common import check_device, peak_memory_gib, reset_peak_memory, write_result

from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

TRAINER_KEYS = ("first_step_seconds", "compilations", "recompilations", "img_per_s", "data_wait_fraction",
                "peak_device_memory_bytes", "memory_plan")


def run_params(settings: dict, compile_mode: str, batch: int, accumulation: int):
    """The profile's params with what a short timed run changes: no checkpoints, no sample grid, one validation."""
    train = {"vae": settings["vae"], "compile": compile_mode, "batch_size": batch, "gradient_accumulation": accumulation,
             "max_steps": settings["steps"], "checkpoint_every_steps": None, "sample_grid_images": 0,
             "val_images": settings["val_images"], "val_every_steps": 1_000_000, "space": "latent"}
    train.update(settings.get("train_overrides", {}))
    overrides = {"device": settings["device"], "image_size": settings["image_size"], "train": train}
    return params_with(overrides, profile=settings["profile"])


def live_rows(live: Path, name: str) -> list[float]:
    path = live / "plots" / "metrics" / "train" / f"{name}.tsv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [float(row[name]) for row in csv.DictReader(handle, delimiter="\t")]


def dynamo_frames_compiled() -> int:
    """Frames torch.compile compiled in this process, each recompile once more (0 when it never ran)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def measure(result: dict, live: Path, images_per_step: int, device: str) -> dict:
    """The trainer's numbers where it gave them, else this process's own measurement (``*_source`` says which)."""
    rates, waits = live_rows(live, "img_per_s"), live_rows(live, "data_wait_fraction")
    own = {
        "img_per_s": statistics.fmean(rates[1:]) if len(rates) > 1 else None,
        "data_wait_fraction": statistics.fmean(waits[1:]) if len(waits) > 1 else None,
        "first_step_seconds": images_per_step / rates[0] if rates else None,
        "compilations": dynamo_frames_compiled(),
        "peak_device_memory_bytes": (peak_memory_gib(device) or 0) * 2**30 if device.startswith("cuda") else None,
    }
    measured = {}
    for key, value in own.items():
        from_trainer = result.get(key)
        measured[key] = from_trainer if from_trainer is not None else value
        measured[f"{key}_source"] = "trainer" if from_trainer is not None else "gpu_check"
    measured["recompilations"] = result.get("recompilations")  # the trainer alone tells first-step compiles apart
    plan = result.get("memory_plan") or {}  # CUDA only: the micro-batch the trainer chose to fit the card
    measured["memory_plan"] = plan or None
    measured["planned_batch"] = plan.get("memory/micro_batch")
    measured["planned_accumulation"] = plan.get("memory/accumulation")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="JSON written by train_check.py")
    parser.add_argument("--compile", choices=("never", "always"), required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="this run's folder")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    settings = json.loads(args.settings.read_text())
    device = settings["device"]
    check_device(device)
    params = run_params(settings, args.compile, args.batch, args.accumulation)
    data = {key: Path(value) for key, value in settings["data"].items()}
    paths = TrainPaths(prepared=data["prepared"], store=data["store"], clip=None, model_out=args.out / "model",
                       checkpoints=args.out / "checkpoints", live=args.out / "live", latents=data["latents"])
    row = {"compile": args.compile, "batch": args.batch, "accumulation": args.accumulation}
    reset_peak_memory(device)
    started = time.perf_counter()
    try:
        result = train_branch(params, "elixr", paths)
    except Exception as error:  # reported in the table; the next run goes on
        out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        traceback.print_exc()
        write_result(args.result, {**row, "status": "out of memory" if out_of_memory else "failed",
                                   "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}",
                                   "seconds": round(time.perf_counter() - started, 1)})
        sys.exit(3)
    images_per_step = args.batch * args.accumulation * int(result.get("processes", 1))
    write_result(args.result, {**row, "status": "ok", "seconds": round(time.perf_counter() - started, 1),
                               "images_per_step": images_per_step, "steps": result.get("steps"),
                               "precision": result.get("precision"), "device": result.get("device"),
                               "trainer_keys_missing": [key for key in TRAINER_KEYS if key not in result],
                               **measure(result, paths.live, images_per_step, device)})


if __name__ == "__main__":
    main()

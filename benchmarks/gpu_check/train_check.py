"""Part (b): the project's own trainer at nih-512's train settings on a synthetic set, compile off and on.

    python benchmarks/gpu_check/train_check.py --device cuda --work /tmp/b --result b.json

Builds a synthetic prepared set, condition store and latent store (synthetic_data.py; the latents made by
stage encode_latents' own code with a random-weight SD VAE), then runs ``train_branch`` (train_run.py, one
process per run) with ``train.compile: never`` and then ``always``: latent space, batch 64 x 4, bf16 (auto),
a few optimizer steps. On CUDA the trainer's memory plan picks the micro-batch and accumulation that fit the
card (same images per step; the table shows what it chose). Should a run still run out of GPU memory, it is
reported and retried at half the batch and twice the accumulation (the same 256 images per step).

MFU: the UNet's forward + backward FLOPs per image (counted on the meta device with train_throughput's
``step_flops``) times img/s, over a large bf16 matmul's rate measured here (its ``matmul_tflops``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import (
    REPO, check_device, markdown_table, run_with_limit, shown, sizes_dict, sizes_for, write_result,
)
from train_throughput import matmul_tflops, step_flops

from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion.unet import build_unet
from cxr_diffusion.rehearsal.standin_models import write_vae
from synthetic_data import CONDITION_DIM, build_training_set

HERE = Path(__file__).resolve().parent
CPU_TRAIN_OVERRIDES = {"num_workers": 0}  # 2-core machines: loader workers only compete with the model


def flops_per_image(unet_config, latent_size: int, tokens: int) -> float:
    """Forward + backward FLOPs of the UNet for one image, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        unet = build_unet(unet_config, latent_size, 4, unet_config.cross_attention_dim or CONDITION_DIM)
        batch = (torch.randn(2, 4, latent_size, latent_size), torch.randint(0, 1000, (2,)),
                 torch.randn(2, tokens, unet_config.cross_attention_dim or CONDITION_DIM))
    return step_flops(unet, batch) / 2


def timed_runs(settings_path: Path, work: Path, batch: int, accumulation: int, deadline: float) -> list[dict]:
    """compile never, then always. The trainer's memory plan should make out-of-memory rare; a run that still
    runs out of GPU memory is retried at batch / 2 x accumulation * 2 (a fallback, it costs nothing otherwise)."""
    rows = []
    for compile_mode in ("never", "always"):
        while True:
            left = deadline - time.monotonic()
            name = f"compile-{compile_mode}-b{batch}x{accumulation}"
            if left < 10:
                rows.append({"compile": compile_mode, "batch": batch, "accumulation": accumulation,
                             "status": "skipped: part time limit reached"})
                break
            result_path = work / f"{name}.json"
            print(f"\n--- train_branch, train.compile: {compile_mode}, batch {batch} x {accumulation} "
                  f"(limit {left:.0f} s)", flush=True)
            code, seconds = run_with_limit(
                [sys.executable, str(HERE / "train_run.py"), "--settings", str(settings_path), "--compile", compile_mode,
                 "--batch", str(batch), "--accumulation", str(accumulation), "--out", str(work / name),
                 "--result", str(result_path)], left)
            row = json.loads(result_path.read_text()) if result_path.is_file() else {
                "compile": compile_mode, "batch": batch, "accumulation": accumulation,
                "status": "timed out" if code == 124 else f"failed (exit {code}, no result)", "seconds": round(seconds, 1)}
            rows.append(row)
            if row["status"] == "out of memory" and batch > 1:
                batch, accumulation = batch // 2, accumulation * 2
                continue
            break
    return rows


def batch_text(row: dict) -> str:
    """Batch x accumulation asked for, and what the trainer's memory plan ran where it changed them."""
    asked = f"{row['batch']} x {row['accumulation']}"
    planned = (row.get("planned_batch"), row.get("planned_accumulation"))
    if None in planned or planned == (row["batch"], row["accumulation"]):
        return asked
    return f"{asked} (plan: {planned[0]} x {planned[1]})"


def table(rows: list[dict], flops: float, peak_tflops: float) -> str:
    body = []
    for row in rows:
        rate = row.get("img_per_s")
        mfu = rate * flops / (peak_tflops * 1e12) if rate else None
        memory = row.get("peak_device_memory_bytes")
        marks = {key: "*" if row.get(f"{key}_source") == "gpu_check" else "" for key in
                 ("img_per_s", "first_step_seconds", "compilations", "peak_device_memory_bytes", "data_wait_fraction")}
        body.append([row["compile"], batch_text(row), row["status"],
                     shown(rate) + marks["img_per_s"], shown(mfu * 100 if mfu else None, 1, "%"),
                     shown(memory / 2**30 if memory else None) + marks["peak_device_memory_bytes"],
                     shown(row.get("first_step_seconds")) + marks["first_step_seconds"],
                     shown(row.get("compilations")) + marks["compilations"], shown(row.get("recompilations")),
                     shown(row.get("data_wait_fraction"), 3) + marks["data_wait_fraction"],
                     shown(row.get("seconds")), row.get("precision") or "n/a"])
    return markdown_table(["train.compile", "batch x accumulation", "status", "img/s", "MFU", "peak GPU memory GiB",
                           "first step s", "compilations", "recompilations", "data wait", "run s", "precision"], body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the data, the runs)")
    parser.add_argument("--result", type=Path, default=None)
    parser.add_argument("--time-limit", type=float, default=220.0, help="seconds for this whole part")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    check_device(args.device)
    sizes = sizes_for(args.device)
    print(f"part (b) sizes: {sizes.note}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    write_vae(args.work / "vae", seed=0)  # the SD VAE's architecture (sd-vae-ft-mse config), random weights
    settings = {"device": args.device, "profile": sizes.profile, "image_size": sizes.image_size,
                "vae": str(args.work / "vae"), "steps": sizes.train_steps, "val_images": 16,
                "train_overrides": {} if args.device.startswith("cuda") else CPU_TRAIN_OVERRIDES}
    params = params_with({"device": args.device, "image_size": sizes.image_size,
                          "train": {"space": "latent", "vae": settings["vae"]}}, profile=sizes.profile)
    images_per_step = sizes.train_batch * sizes.train_accumulation
    data = build_training_set(args.work / "data", params, train_images=2 * images_per_step, val_images=16,
                              tokens=sizes.condition_tokens, device=torch.device(args.device))
    settings["data"] = {key: str(value) for key, value in data.items()}
    settings_path = args.work / "settings.json"
    settings_path.write_text(json.dumps(settings, indent=2))
    setup_seconds = time.perf_counter() - started

    latent = sizes.image_size // 8
    flops = flops_per_image(params.train.unet, latent, sizes.condition_tokens)
    peak = matmul_tflops(torch.device(args.device), 8192 if args.device.startswith("cuda") else 2048)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the matmul's buffers: the runs get the whole GPU
    print(f"synthetic set, stand-in VAE and latents: {setup_seconds:.1f} s; UNet {flops / 1e9:.1f} GFLOP per image "
          f"(fwd + bwd, {latent}x{latent}x4 latents, {sizes.condition_tokens}x{CONDITION_DIM} condition); "
          f"bf16 matmul peak measured {peak:.1f} TFLOP/s", flush=True)

    rows = timed_runs(settings_path, args.work, sizes.train_batch, sizes.train_accumulation, deadline)
    print(f"\n## (b) train_branch, profile {sizes.profile}'s train settings, latent space, "
          f"{sizes.train_steps} optimizer steps per run ({sizes.note})\n")
    print(table(rows, flops, peak))
    missing = sorted({key for row in rows for key in row.get("trainer_keys_missing", [])})
    print("\n* measured by gpu_check, not returned by train_branch (its result lacks: "
          f"{', '.join(missing) or 'nothing'}); img/s and data wait leave out the first step. "
          f"GPU: {torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'none (CPU)'}; "
          f"repo {REPO}")
    memory_plans = [row.get("memory_plan") for row in rows if row.get("memory_plan")]
    if memory_plans:
        print(f"memory_plan (trainer): {json.dumps(memory_plans[-1])}")
    ok = [row for row in rows if row["status"] == "ok"]
    write_result(args.result, {"part": "b", "sizes": sizes_dict(sizes), "setup_seconds": round(setup_seconds, 1),
                               "flops_per_image": flops, "peak_tflops": peak, "runs": rows,
                               "status": "ok" if len(ok) == 2 else "failed"})
    if len(ok) != 2:
        sys.exit(1)


if __name__ == "__main__":
    main()

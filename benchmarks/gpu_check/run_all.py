"""The GPU check's parts, each in its own process under its own time limit, then one summary table.

    python benchmarks/gpu_check/run_all.py --device cuda            # from a scratch copy of the repo (run.sh)
    python benchmarks/gpu_check/run_all.py --device cpu --parts c,d # a CPU rehearsal of two parts

(a) pipeline_check.py  the tiny profile's dvc repro + generate, and the device each model stage recorded
(b) train_check.py     train_branch at nih-512's train settings, compile off and on
(c) vae_check.py       the SD VAE encoder at 512 px
(d) sampling_check.py  sampling at 512 px, DPM-Solver++ 20 and DDPM 50 steps

A part that fails or runs past its limit is reported and the next one runs. The default limits add up to
8 minutes on CUDA; on a CPU (shrunk sizes, see common.py) they are longer, since nothing there is rationed.
Exit status: 0 when every part passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import check_device, markdown_table, run_with_limit, sizes_for

HERE = Path(__file__).resolve().parent
PARTS = {"a": "pipeline_check.py", "b": "train_check.py", "c": "vae_check.py", "d": "sampling_check.py"}
TITLES = {"a": "tiny pipeline + generate, devices", "b": "train_branch nih-512 settings, compile off/on",
          "c": "SD VAE encoder", "d": "sampling DPM++ 20 / DDPM 50"}
GPU_LIMITS = {"a": 170, "b": 220, "c": 30, "d": 60}   # seconds: 480 in all, the GPU check's 8 minutes
CPU_LIMITS = {"a": 1200, "b": 600, "c": 180, "d": 300}  # caps only: a shared 2-core CPU varies 5x
PART_BUDGET = {"a", "b"}  # parts that take --time-limit and share it out among their own steps


def headline(part: str, result: dict) -> str:
    """The one number of each part that goes into the summary."""
    if part == "a":
        steps = result.get("steps", [])
        return f"{sum(s['status'] == 'ok' for s in steps)}/{len(steps)} steps ok; " + (
            "; ".join(result.get("problems", [])[:2]) or "every model stage on the device")
    if part == "b":
        runs = [f"compile {r['compile']} {r['batch']}x{r['accumulation']}" + (
            f" (plan {r['planned_batch']}x{r['planned_accumulation']})" if r.get("planned_batch") not in
            (None, r["batch"]) else "") + ": " + (
            f"{r['img_per_s']:.1f} img/s" if r.get("img_per_s") else r["status"]) for r in result.get("runs", [])]
        return "; ".join(runs)
    if part == "c":
        return f"{result['img_per_s']:.1f} img/s"
    if part == "d":
        return "; ".join(f"{name} {r['steps']} steps: {r['img_per_s']:.2f} img/s"
                         for name, r in result.get("samplers", {}).items())
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a rehearsal at shrunk sizes)")
    parser.add_argument("--parts", default="a,b,c,d", help="comma-separated, from a, b, c, d")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="override one part's time limit, e.g. --limit b=300 (repeatable)")
    parser.add_argument("--results", type=Path, default=Path("gpu_check_results"), help="each part's JSON and work")
    args = parser.parse_args()
    check_device(args.device)
    limits = dict(GPU_LIMITS if args.device.startswith("cuda") else CPU_LIMITS)
    for item in args.limit:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--limit {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        limits[part] = float(seconds)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    args.results.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {args.device}: parts {', '.join(parts)}; limits "
          f"{', '.join(f'{p} {limits[p]:.0f} s' for p in parts)}; {sizes_for(args.device).note}", flush=True)

    summary = []
    for part in parts:
        result_path = (args.results / f"{part}.json").resolve()
        result_path.unlink(missing_ok=True)
        command = [sys.executable, str(HERE / PARTS[part]), "--device", args.device, "--result", str(result_path)]
        if part in PART_BUDGET:
            command += ["--time-limit", str(limits[part] - 5)]  # the part stops itself first, and still reports
        if part == "b":
            command += ["--work", str((args.results / "train_work").resolve())]
        print(f"\n===== part ({part}) {TITLES[part]}: {PARTS[part]}, limit {limits[part]:.0f} s =====", flush=True)
        code, seconds = run_with_limit(command, limits[part])
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        status = ("timed out" if code == 124 else result.get("status", "ok" if code == 0 else f"failed (exit {code})"))
        if code not in (0, 124) and status == "ok":
            status = f"failed (exit {code})"
        try:
            line = headline(part, result) if result else "no result written"
        except (KeyError, TypeError) as error:
            line = f"result unreadable ({error!r})"
        summary.append([f"({part}) {TITLES[part]}", status, f"{seconds:.1f}", line])

    print(f"\n## gpu_check summary ({args.device}; {sizes_for(args.device).note})\n")
    print(markdown_table(["part", "status", "seconds", "result"], summary))
    total = sum(float(row[2]) for row in summary)
    print(f"\ntotal {total:.1f} s of the parts; results in {args.results.resolve()}")
    sys.exit(0 if all(row[1] == "ok" for row in summary) else 1)


if __name__ == "__main__":
    main()

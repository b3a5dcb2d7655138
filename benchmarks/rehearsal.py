"""The nih-512 rehearsal, end to end on this machine, offline: the real architectures and formats with
random-weight stand-ins, a real-layout NIH folder of phantom images, and every stage of `dvc repro`.

In a scratch copy of this working tree it runs `cxr-diffusion profile rehearsal`, `cxr-diffusion
standins`, `cxr-diffusion doctor`, then each stage of `dvc repro` on its own, and measures each one's
wall time and peak RSS (the largest process of the stage, from the kernel's rusage). It fails when a
stage fails or a metric the evaluation promises was not computed. The table goes to stdout and to
benchmarks/results/rehearsal.md, with the run's totals next to the budget of issue 12 (30 min, 20 GB
on a 2-core CPU) as ratios.

    python benchmarks/rehearsal.py              # as CI runs it (after the tests)
    python benchmarks/rehearsal.py --keep       # keep the scratch copy to look at its outputs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine_line

REPO = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 30 * 60
BUDGET_RSS_GB = 20.0
BRANCHES = ("clip_text", "clip_vision", "elixr")
RESNET_ARMS = ("real", "synthetic", "real_plus_synthetic", "synthetic_then_real")
# Must be numbers in every branch's metrics/evaluate/<branch>.json (dotted paths): each stands for a code path.
REQUIRED_METRICS = ("closeness.inception_fid", "closeness.reference_compatible_fid", "xrv_densenet.fd",
                    "raddino.fd", "raddino.kid", "raddino.coverage",
                    "closeness.domain_fd", "closeness.kid", "closeness.untrained_fd_matched", "prdc.precision",
                    "memorization.features.fraction_at_or_below_threshold", "diversity.ms_ssim_same_labels_generated")
# Shown in the table per branch.
SHOWN_METRICS = {"FID": "closeness.inception_fid", "reference FID": "closeness.reference_compatible_fid",
                 "FD (DenseNet)": "xrv_densenet.fd", "FD (RadDINO)": "raddino.fd", "domain FD": "closeness.domain_fd"}


@dataclass
class Step:
    name: str
    seconds: float
    peak_rss_gb: float


def working_tree_copy(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files as they are now, plus .git (DVC needs the repository)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    shutil.copytree(REPO / ".git", destination / ".git", symlinks=True)


def run_measured(name: str, command: list[str], cwd: Path, log_dir: Path) -> Step:
    """Run ``command``; its wall time and the peak RSS of its largest process (it or a descendant)."""
    log = log_dir / f"{name.replace('@', '-')}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(log.read_text()[-6000:], file=sys.stderr)
        raise SystemExit(f"rehearsal: {name} failed (exit {code}); log: {log}")
    step = Step(name, seconds, usage.ru_maxrss * 1024 / 1e9)  # Linux reports ru_maxrss in KiB
    print(f"{name:28s} {seconds:8.1f} s {step.peak_rss_gb:7.2f} GB", flush=True)
    return step


def stage_names(cwd: Path) -> list[str]:
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=cwd, check=True, capture_output=True, text=True)
    return listed.stdout.split()


def check_outputs(work: Path) -> dict:
    """Every branch's evaluation computed every metric that is defined at this size, and its utility study trained
    the full-scale classifier (ResNet-50) for every arm, and the reader-study kit was built; returns what the
    table shows.

    A handful of images leaves some values undefined (a per-class AUROC needs both labels among the
    generations): those are listed, not failed. The metrics that stand for a whole code path must be
    numbers (the pretrained networks, the domain FD and KID, the untrained baseline, PRDC, memorization).
    """
    summary = {}
    for branch in BRANCHES:
        metrics = json.loads((work / "metrics" / "evaluate" / f"{branch}.json").read_text())
        flat = dict(_flatten(metrics))
        missing = [key for key in REQUIRED_METRICS if not isinstance(flat.get(key), (int, float))]
        if missing:
            raise SystemExit(f"rehearsal: metrics/evaluate/{branch}.json did not compute {missing}")
        utility = json.loads((work / "metrics" / "utility" / f"{branch}.json").read_text())
        if utility["classifier"] != "resnet50" or not set(RESNET_ARMS) <= set(utility["arms"]):
            raise SystemExit(f"rehearsal: metrics/utility/{branch}.json: expected the resnet50 arms "
                             f"{', '.join(RESNET_ARMS)}, got {utility['classifier']} {sorted(utility['arms'])}")
        live = (work / "dvclive" / branch / "params.yaml").read_text().splitlines()
        precision = next((line.split(":", 1)[1].strip() for line in live if line.startswith("precision:")), "?")
        undefined = sorted(key for key, value in flat.items() if value is None or value != value)
        summary[branch] = {"precision": precision, "undefined": undefined,
                           **{name: flat[key] for name, key in SHOWN_METRICS.items()}}
    check_reader_study(work)
    return summary


def check_reader_study(work: Path) -> None:
    """The kit holds its page and one image per item, at display size; its key lies outside it; no answers yet."""
    kit, key = work / "reports" / "reader_study", json.loads((work / "data" / "reader_study" / "key.json").read_text())
    images = sorted((kit / "images").glob("*.png"))
    items = len(key["items"]) + len(key["calibration"])
    if not (kit / "index.html").is_file() or len(images) != items or not key["items"]:
        raise SystemExit(f"rehearsal: reports/reader_study holds {len(images)} images for the key's {items} items")
    scores = json.loads((work / "metrics" / "reader_study.json").read_text())
    if scores["readers"] != 0 or scores["items"] != len(key["items"]):
        raise SystemExit(f"rehearsal: metrics/reader_study.json: expected no readers and {len(key['items'])} items, "
                         f"got {scores['readers']} and {scores['items']}")


def _flatten(metrics: dict, prefix: str = ""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def write_table(steps: list[Step], summary: dict, images: int, out: Path) -> str:
    total = sum(step.seconds for step in steps)
    peak = max(step.peak_rss_gb for step in steps)
    lines = [
        "# nih-512 rehearsal (`python benchmarks/rehearsal.py`)", "",
        f"Machine: {machine_line()}. {images} phantom images at 1024 px, nih-512's architectures with random-weight stand-ins.",
        "", "| step | seconds | peak RSS (GB) |", "|---|---:|---:|",
        *[f"| {step.name} | {step.seconds:.1f} | {step.peak_rss_gb:.2f} |" for step in steps],
        f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | **{peak:.2f}** (largest step) |", "",
        f"Budget (issue 12: 30 min, 20 GB on a 2-core CPU): time {total / BUDGET_SECONDS:.2f}x, "
        f"peak RSS {peak / BUDGET_RSS_GB:.2f}x.", "",
        "| branch | training precision | " + " | ".join(SHOWN_METRICS) + " |",
        "|---|---|" + "---:|" * len(SHOWN_METRICS),
        *[f"| {branch} | {row['precision']} | " + " | ".join(f"{row[name]:.4g}" for name in SHOWN_METRICS) + " |"
          for branch, row in summary.items()], "",
        *[f"Undefined at this size in {branch}: {', '.join(row['undefined']) or 'none'}." for branch, row in summary.items()],
        "",
        "The FIDs are of random-weight networks on phantom images: they check that every metric is computed, "
        "nothing more.", "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="phantom NIH images (default: the command's own)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage (no checks, no table): to debug one")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rehearsal.md")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"  # dvc, accelerate, cxr-diffusion of this venv

    work = Path(tempfile.mkdtemp(prefix="cxr-rehearsal-"))
    print(f"scratch copy: {work}", flush=True)
    try:
        working_tree_copy(work)
        logs = work / "rehearsal-logs"
        logs.mkdir()
        subprocess.run(["cxr-diffusion", "profile", "rehearsal"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        standins = ["cxr-diffusion", "standins"] + (["--images", str(args.images)] if args.images else [])
        steps = [run_measured("standins", standins, work, logs)]
        doctor = subprocess.run(["cxr-diffusion", "doctor"], cwd=work, capture_output=True, text=True)
        print(doctor.stdout + doctor.stderr, flush=True)
        for stage in stage_names(work):
            steps.append(run_measured(stage, ["dvc", "repro", "--single-item", stage], work, logs))
            if stage == args.until:
                return
        summary = check_outputs(work)
        images = len(json.loads((work / "external" / "nih-rehearsal" / "STANDIN.json").read_text())["ids"])
        print(write_table(steps, summary, images, args.out))
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

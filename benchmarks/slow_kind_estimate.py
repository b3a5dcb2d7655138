"""How long would the default run take on the slower CPU kind (2-core AMD, AVX2 only)? An estimate.

That machine kind was never lent to us, so its time cannot be measured. What is known of it (fp32,
batch-32 training steps): the default profile's own UNet shape (1.4M parameters, 32x32, channels
32/64/64, attention only at 8x8) ran 39 img/s there (issue 4), a 32x32 4M-parameter UNet 18 img/s and
a 64x64 6.5M-parameter UNet 6.5 img/s (the project brief; shapes not given, so two of ours each).
This script trains the same UNets here, turns each into a speed ratio slow kind / this machine, and
scales a timed run of this machine by the default UNet's own ratio (the best-matched estimate),
and by the most and the least favourable ratio.

    python benchmarks/slow_kind_estimate.py                       # ratios only
    python benchmarks/slow_kind_estimate.py --log run.log         # and the per-stage projection

``run.log`` is the output of ``make run`` with each line prefixed by its Unix time, e.g.
``make run 2>&1 | python3 -u -c "import sys, time; [print(f'{time.time():.1f} {l}', end='') for l in sys.stdin]"``.
Everything before the first stage (venv, pip) is installation and is not scaled; every stage is scaled,
which overstates the stages that mostly wait on imports or disk.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table
from train_throughput import time_steps

from cxr_diffusion.config import UNetConfig
from cxr_diffusion.params_file import load_params
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.diffusion.precision import describe_machine
from cxr_diffusion.diffusion.unet import build_unet

REPO = Path(__file__).resolve().parents[1]
SLOW_KIND = {32: 18.0, 64: 6.5}  # img/s, fp32, batch 32: the brief's figures for the AVX2-only kind
SLOW_KIND_DEFAULT_UNET = 39.0    # img/s of the default profile's UNet there (issue 4's measured reference point)
REFERENCE_SHAPES = {  # (size, UNet) of about the brief's parameter counts; attention only at <= 16x16
    "32x32, 4.2M, attention at 16 and 8": (32, profile_section(UNetConfig, block_out_channels=(32, 64, 128),
                                                          cross_attention=(False, True, True))),
    "32x32, 3.9M, attention at 8": (32, profile_section(UNetConfig, block_out_channels=(48, 96, 112),
                                                   cross_attention=(False, False, True))),
    "64x64, 6.6M, attention at 16 and 8": (64, profile_section(UNetConfig, block_out_channels=(32, 64, 128, 128),
                                                          cross_attention=(False, False, True, True))),
    "64x64, 6.3M, attention at 8": (64, profile_section(UNetConfig, block_out_channels=(48, 96, 128, 128),
                                                   cross_attention=(False, False, False, True))),
}
STAGE_LINE = re.compile(r"^(\d+(?:\.\d+)?) .*Running stage '([^']+)'")


def train_images_per_second(config: UNetConfig, size: int, steps: int, batch: int = 32, tokens: int = 32,
                            dim: int = 128) -> tuple[float, int]:
    """fp32 training img/s on the CPU (train_throughput's plain loop) and the parameter count."""
    torch.manual_seed(0)
    unet = build_unet(config, size, 3, dim)
    inputs = (torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,)), torch.randn(batch, tokens, dim))
    return time_steps(unet, inputs, steps, 2, None, torch.device("cpu")), sum(p.numel() for p in unet.parameters())


def stage_seconds(log: Path) -> tuple[float, list[tuple[str, float]], float]:
    """(seconds before the first stage, [(stage, seconds)], total) from a timestamped `make run` log."""
    stamps, starts = [], []
    for line in log.read_text(errors="replace").splitlines():
        stamp = line.split(" ", 1)[0]
        if not re.fullmatch(r"\d+(?:\.\d+)?", stamp):
            continue
        stamps.append(float(stamp))
        match = STAGE_LINE.match(line)
        if match:
            starts.append((match.group(2), float(match.group(1))))
    if not starts:
        raise SystemExit(f"{log}: no timestamped \"Running stage '...'\" lines; see this script's docstring")
    ends = [t for _, t in starts[1:]] + [stamps[-1]]
    return starts[0][1] - stamps[0], [(name, end - t) for (name, t), end in zip(starts, ends)], stamps[-1] - stamps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--log", type=Path, help="timestamped output of `make run` on this machine")
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    machine = describe_machine()
    print(f"this machine: {machine['device']}; cpu capability {machine['cpu_capability']}, threads {machine['threads']}\n")
    rows, ratios = [], []
    for name, (size, config) in REFERENCE_SHAPES.items():
        here, parameters = train_images_per_second(config, size, args.steps)
        ratio = SLOW_KIND[size] / here
        ratios.append(ratio)
        rows.append([name, f"{parameters / 1e6:.2f}M", f"{here:.1f}", f"{SLOW_KIND[size]:.1f}", f"{ratio:.2f}"])
    params = load_params(REPO / "params.yaml")
    default, parameters = train_images_per_second(params.train.unet, params.image_size, args.steps)
    ratios.append(SLOW_KIND_DEFAULT_UNET / default)
    rows.insert(0, [f"the default profile's ({params.image_size}x{params.image_size}, "
                    f"{'/'.join(map(str, params.train.unet.block_out_channels))})", f"{parameters / 1e6:.2f}M",
                    f"{default:.1f}", f"{SLOW_KIND_DEFAULT_UNET:.1f}", f"{ratios[-1]:.2f}"])
    print(markdown_table(["reference UNet (fp32, batch 32)", "parameters", "img/s here", "img/s slow kind (brief)",
                          "speed ratio slow / here"], rows))
    matched, worst, best = ratios[-1], min(ratios), max(ratios)
    if args.log is None:
        return
    setup, stages, total = stage_seconds(args.log)
    columns = (matched, best, worst)
    table = [["(install: venv, pip; not scaled)", f"{setup:.0f}", *[f"{setup:.0f}"] * len(columns)]]
    table += [[name, f"{seconds:.0f}", *[f"{seconds / r:.0f}" for r in columns]] for name, seconds in stages]
    compute = sum(seconds for _, seconds in stages)
    table.append(["total", f"{total:.0f} ({total / 60:.1f} min)",
                  *[f"{(setup + compute / r) / 60:.1f} min" for r in columns]])
    print(f"\nper stage, from {args.log} (every stage scaled by 1/ratio):\n")
    print(markdown_table(["stage", "seconds here", f"slow kind, default UNet's ratio {matched:.2f}",
                          f"best ratio {best:.2f}", f"worst ratio {worst:.2f}"], table))


if __name__ == "__main__":
    main()

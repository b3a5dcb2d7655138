"""How each branch's condition reaches the UNet, and how much of it the model uses: an ablation on the default.

Run from a repository after `dvc repro` (it reads the prepared data, the condition stores, the demo CLIP
and the evaluator, and writes nothing outside its scratch folder):

    python benchmarks/conditioning_ablation.py --variants today timestep timestep_levels --branches clip_vision elixr

Every (variant, branch, seed) trains, samples and evaluates with the pipeline's own stages (`stages/train.py`,
`stages/sample.py`, `stages/evaluate.py`), from params.yaml with only the variant's keys changed, so each arm
gets the same data, steps, batch and sampler as the default run. The table goes to stdout and to
benchmarks/results/conditioning_ablation.md: macro AUROC of the evaluator on the generations against the
labels they were asked for (with its bootstrap interval), the validation conditioning gap (loss with shuffled
conditions minus loss with the true ones), domain FD over its real-vs-real floor, PRDC coverage, and the
training time as a ratio to the first variant's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine_line, markdown_table

from cxr_diffusion.params_file import load_params, read_params_file

# Each variant: what it changes (dotted params keys) and what it means.
VARIANTS: dict[str, tuple[dict, str]] = {
    "today": ({}, "the default adapter: condition tokens in cross-attention at the 8x8 level and the mid block"),
    "timestep": ({"train.unet.timestep_condition": True},
                 "+ the pooled condition added to the timestep embedding (every ResNet block sees it)"),
    "timestep_only": ({"train.unet.timestep_condition": True, "train.unet.cross_attention": [False, False, False]},
                      "the pooled condition in the timestep embedding; cross-attention in the mid block only"),
    "levels": ({"train.unet.cross_attention": [False, True, True]}, "cross-attention at 16x16 and 8x8 (and mid)"),
    "timestep_levels": ({"train.unet.timestep_condition": True, "train.unet.cross_attention": [False, True, True]},
                        "timestep embedding + cross-attention at 16x16 and 8x8"),
    "tokens16": ({"train.condition_tokens": 16}, "a single vector expanded to 16 learned tokens instead of 4"),
    # Not an adapter change: whether the image conditions are learned later than the prompt, not never.
    "steps4x": ({"train.max_steps": 1600, "train.val_every_steps": 800, "train.sample_every_steps": 800},
                "today's adapter trained 4x longer (1600 steps instead of 400), same schedule shape"),
}


def variant_params(base: dict, changes: dict, seed: int, mixed_precision: str) -> dict:
    """``base`` (params.yaml's mapping) with the dotted keys of ``changes`` set, and ``seed`` and the precision."""
    params = json.loads(json.dumps(base))
    for dotted, value in {**changes, "seed": seed, "train.mixed_precision": mixed_precision}.items():
        *parents, key = dotted.split(".")
        section = params
        for parent in parents:
            section = section[parent]
        if key not in section:
            raise SystemExit(f"variant key {dotted} is not in params.yaml")
        section[key] = value
    return params


def run_arm(scratch: Path, params_file: Path, branch: str) -> float:
    """Train, sample and evaluate one branch under ``params_file``; the training seconds."""
    python = sys.executable
    common = ["--branch", branch, "--params", str(params_file)]
    started = time.perf_counter()
    subprocess.run([python, "stages/train.py", *common, "--prepared", "data/prepared",
                    "--store", f"data/embeddings/{branch}", "--demo-clip", "models/clip", "--latents", "data/latents",
                    "--out", str(scratch / "models" / branch), "--checkpoints", str(scratch / "checkpoints" / branch),
                    "--live", str(scratch / "dvclive" / branch)], check=True)
    train_seconds = time.perf_counter() - started
    subprocess.run([python, "stages/sample.py", *common, "--model", str(scratch / "models" / branch),
                    "--prepared", "data/prepared", "--store", f"data/embeddings/{branch}",
                    "--out", str(scratch / "samples" / branch), "--figures", str(scratch / "figures" / "samples" / branch),
                    "--metrics", str(scratch / "metrics" / "sample" / f"{branch}.json")], check=True)
    subprocess.run([python, "stages/evaluate.py", *common, "--evaluator", "models/evaluator",
                    "--prepared", "data/prepared", "--samples", str(scratch / "samples" / branch),
                    "--model", str(scratch / "models" / branch), "--store", f"data/embeddings/{branch}",
                    "--figures", str(scratch / "figures" / "evaluate" / branch),
                    "--metrics", str(scratch / "metrics" / "evaluate" / f"{branch}.json")], check=True)
    return train_seconds


def arm_row(scratch: Path, branch: str) -> dict:
    """The numbers the table reports, from the arm's evaluate metrics and DVCLive summary."""
    evaluation = json.loads((scratch / "metrics" / "evaluate" / f"{branch}.json").read_text())
    live = json.loads((scratch / "dvclive" / branch / "metrics.json").read_text())
    faithfulness, closeness = evaluation["faithfulness"], evaluation["closeness"]
    return {"macro_auroc": faithfulness["macro_auroc_vs_requested_labels"],
            "macro_auroc_95ci": faithfulness.get("macro_auroc_vs_requested_labels_95ci"),
            "conditioning_gap": live["val"]["conditioning_gap"],
            "fd_over_floor": closeness["domain_fd_ratio_to_floor"],
            "coverage": evaluation["prdc"]["coverage"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--branches", nargs="+", default=["clip_vision", "elixr"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16",
                        help="pinned for every arm: `auto` probes at each start, and under load the probe can choose "
                             "differently for two arms (the default run's probe chose bf16 on AMX and Zen 4 CPUs)")
    parser.add_argument("--scratch", type=Path, default=Path("benchmarks/.ablation"),
                        help="trained models, samples and metrics of every arm (kept: an arm already evaluated "
                             "there is read, not rerun)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conditioning_ablation.md"))
    args = parser.parse_args()
    command = f"$ python {' '.join(sys.argv)}"
    print(command)
    load_params("params.yaml")  # validated as the stages will read it
    base = read_params_file("params.yaml")
    rows, results = [], {}
    for variant in args.variants:
        changes, meaning = VARIANTS[variant]
        for seed in args.seeds:
            scratch = args.scratch / f"{variant}_seed{seed}"
            scratch.mkdir(parents=True, exist_ok=True)
            params_file = scratch / "params.yaml"
            params_file.write_text(yaml.safe_dump(variant_params(base, changes, seed, args.mixed_precision), sort_keys=False))
            load_params(params_file)
            for branch in args.branches:
                done = scratch / "metrics" / "evaluate" / f"{branch}.json"
                timing = scratch / f"train_seconds_{branch}.txt"
                if not done.is_file():
                    timing.write_text(f"{run_arm(scratch, params_file, branch):.1f}\n")
                row = arm_row(scratch, branch)
                results[(variant, seed, branch)] = row
                first = results.get((args.variants[0], seed, branch))
                seconds = float(timing.read_text())
                first_seconds = float((args.scratch / f"{args.variants[0]}_seed{seed}" /
                                       f"train_seconds_{branch}.txt").read_text())
                interval = row["macro_auroc_95ci"]
                rows.append([variant, branch, seed,
                             f"{row['macro_auroc']:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""),
                             f"{row['macro_auroc'] - first['macro_auroc']:+.3f}",
                             f"{row['conditioning_gap']:.4f}", f"{row['fd_over_floor']:.1f}", f"{row['coverage']:.2f}",
                             f"{seconds:.0f} s ({seconds / first_seconds:.2f}x)"])
                print(rows[-1], flush=True)
    header = ["variant", "branch", "seed", "macro AUROC vs requested [95% CI]", "vs first", "conditioning gap",
              "FD / floor", "coverage", "train time (ratio)"]
    legend = "\n".join(f"- `{name}`: {VARIANTS[name][1]}" for name in args.variants)
    text = (f"# Conditioning ablation\n\n{command}\n\nMachine: {machine_line()}; params.yaml with only each variant's "
            f"keys changed, train.mixed_precision {args.mixed_precision} in every arm.\n\n{legend}\n\n"
            f"{markdown_table(header, rows)}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""DPM-Solver++ at one or more step counts vs DDPM with every training step, same model and conditions.

    python benchmarks/sampler_comparison.py --model models/clip_text --count 64
    python benchmarks/sampler_comparison.py --count 200 --dpm-steps 10 15 20 --ddpm-steps 0   # DPM++ steps only

Quality: Frechet distance to real test images in the evaluator's features (and the real-vs-real
floor at the same n), and the text branch's macro AUROC against the requested labels; speed:
images/s of each sampler, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table

from cxr_diffusion.params_file import load_params
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.diffusion.data import ConditionedImages
from cxr_diffusion.evaluation.distances import frechet_distance, real_vs_real_floor
from cxr_diffusion.evaluation.evaluate import _features_of_images
from cxr_diffusion.evaluation.evaluator import embed_and_predict, load_classifier
from cxr_diffusion.evaluation.faithfulness import macro_auroc, per_label_auroc
from cxr_diffusion.sampling.sample import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/clip_text"))
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--dpm-steps", type=int, nargs="+", default=None, help="default: params sample.steps")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="0 skips DDPM")
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    params = load_params("params.yaml")
    branch = load_pipeline(args.model, "dpm++", torch.device("cpu")).config.branch
    test = ConditionedImages("data/prepared", "test", ConditionStore(Path("data/embeddings") / branch),
                             params.channels, limit=args.count)
    conditions = torch.stack([test[i]["condition"] for i in range(len(test))])
    labels = np.stack([test[i]["labels"].numpy() for i in range(len(test))]).astype(int)
    classifier = load_classifier("models/evaluator")
    real = embed_and_predict(classifier, PreparedImages("data/prepared", "test"))["features"]
    pool = np.concatenate([real, embed_and_predict(classifier, PreparedImages("data/prepared", "val"))["features"]])
    n = min(len(test), len(pool) // 2)
    real_a, real_b = real_vs_real_floor(pool, n, seed=params.seed)
    rows = []
    runs = [("dpm++", steps) for steps in args.dpm_steps or [params.sample.steps]]
    runs += [("ddpm", args.ddpm_steps)] if args.ddpm_steps > 0 else []
    for name, steps in runs:
        pipeline = load_pipeline(args.model, name, torch.device("cpu"))
        started = time.perf_counter()
        images = []
        for start in range(0, len(conditions), params.sample.batch_size):
            images += pipeline(condition=conditions[start:start + params.sample.batch_size],
                               guidance_scale=params.sample.guidance_scale, num_inference_steps=steps,
                               generator=torch.Generator().manual_seed(params.seed), progress=False).images
        seconds = time.perf_counter() - started
        features = _features_of_images(classifier, images, params.evaluate.batch_size)
        probabilities = torch.sigmoid(classifier.head(torch.from_numpy(features))).detach().numpy()
        auroc = macro_auroc(per_label_auroc(labels, probabilities, list(classifier.spec.classes)))
        rows.append([name, steps, f"{len(images) / seconds:.2f}", f"{frechet_distance(features[:n], real_a):.2f}",
                     f"{auroc:.3f}" if auroc is not None else "n/a"])
    print(f"\n{branch} model {args.model}, {len(test)} test conditions, guidance {params.sample.guidance_scale}; "
          f"real-vs-real FD floor at n={n}: {frechet_distance(real_a, real_b):.2f}\n")
    print(markdown_table(["sampler", "steps", "img/s", f"FD vs real (n={n})", "macro AUROC vs requested"], rows))
    if runs[-1][0] == "ddpm":
        print(f"\nDPM-Solver++ ({runs[0][1]} steps) speed-up over DDPM: {float(rows[0][2]) / float(rows[-1][2]):.1f}x")


if __name__ == "__main__":
    main()

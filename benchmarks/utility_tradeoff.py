"""What the utility study's synthetic sets cost and what cheaper sampling loses: sampler steps x guidance
vs generation speed, closeness to real images and the synthetic-only arm's AUROC on the real test split.

Run after `dvc repro` (it reads the trained model, the evaluator and the real-only arm):

    python benchmarks/utility_tradeoff.py --branch clip_text --steps 4 10 20 --guidance 1 3

Every setting generates the same N conditions (utility.train_images, the real arm's subset) with the
utility stage's own code, then trains the synthetic-only arm exactly as the stage does. The table goes to
stdout and to benchmarks/results/utility_tradeoff_<branch>.md; the baseline row is the sample stage's
setting (sample.steps, sample.guidance_scale), and each row's time is a ratio to it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine_line, markdown_table

from cxr_diffusion.config import changed
from cxr_diffusion.params_file import load_params
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.device import resolve_device
from cxr_diffusion.evaluation.distances import frechet_distance
from cxr_diffusion.evaluation.evaluator import embed_and_predict, load_classifier
from cxr_diffusion.sampling.sample import load_pipeline
from cxr_diffusion.utility.arms import predict, train_arm
from cxr_diffusion.utility.images import classifier_side, read_arm_images, train_subset
from cxr_diffusion.utility.real_arm import read_real_arm, test_split
from cxr_diffusion.utility.statistics import auroc_with_intervals, paired_difference
from cxr_diffusion.utility.synthetic import write_synthetic_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branch", default="clip_text")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 10, 20])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 50, 128],
                        help="generation speed of the utility setting at these batch sizes (no arms trained)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/utility_tradeoff_<branch>.md")
    args = parser.parse_args()
    command = f"$ python {' '.join(sys.argv)}"
    print(command)
    params = load_params("params.yaml")
    device = resolve_device(params.device)
    prepared = Path("data/prepared")
    train = PreparedImages(prepared, "train", channels=1)
    positions = train_subset(train, params.utility.train_images, params.seed)
    test_set = test_split(params, prepared)
    test, test_names, groups = test_set.images, test_set.image_indices, test_set.patients
    classes = list(train.classes)
    _, real_scores = read_real_arm(Path("data/utility/real"), classes, test_names, params.utility.seeds)
    classifier = load_classifier("models/evaluator")
    real_features = embed_and_predict(classifier, PreparedImages(prepared, "test"), params.evaluate.batch_size)["features"]
    pipeline = load_pipeline(Path("models") / args.branch, params.sample.sampler, device)
    store = ConditionStore(Path("data/embeddings") / args.branch)
    side = classifier_side(train.image_size, params.utility.classifier.max_image_size)
    baseline = (params.sample.steps, params.sample.guidance_scale)
    settings = sorted({(s, g) for s in args.steps for g in args.guidance} | {baseline})
    results = {}
    for steps, guidance in settings:
        run = changed(params, utility=changed(params.utility, steps=steps, guidance_scale=guidance))
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "synthetic"
            facts = write_synthetic_set(pipeline, args.branch, train, positions, store, run, 1, folder)
            synthetic = PreparedImages(folder, "train", channels=1)
            features = embed_and_predict(classifier, PreparedImages(folder, "train"), params.evaluate.batch_size)["features"]
            images = read_arm_images(synthetic, range(len(synthetic)), side, f"steps {steps}, guidance {guidance}")
        model = train_arm(images, classes, params.utility.classifier, params.seed, device, name=f"steps {steps} g {guidance}")
        scores = predict(model, test, params.utility.classifier.batch_size)
        auroc = auroc_with_intervals(test.labels, scores, classes, groups, params.utility.bootstrap, params.seed)["macro"]
        difference = paired_difference(test.labels, scores, real_scores, classes, groups, params.utility.bootstrap,
                                       params.seed)["macro"]
        results[(steps, guidance)] = (facts, frechet_distance(features, real_features), auroc, difference)
    base_seconds = results[baseline][0]["seconds"]
    rows = []
    for (steps, guidance), (facts, fd, auroc, difference) in results.items():
        mark = " (sample stage)" if (steps, guidance) == baseline else ""
        chosen = " (utility default)" if (steps, guidance) == (params.utility.steps, params.utility.guidance_scale) else ""
        rows.append([f"{steps}{mark}{chosen}", f"{guidance:g}", f"{facts['images_per_second']:.1f}",
                     f"{facts['seconds']:.1f}", f"{facts['seconds'] / base_seconds:.2f}", f"{fd:.2f}",
                     f"{auroc['auroc']:.3f} [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}]",
                     f"{difference['difference']:+.3f} [{difference['ci_low']:.3f}, {difference['ci_high']:.3f}]"])
    real = auroc_with_intervals(test.labels, real_scores, classes, groups, params.utility.bootstrap, params.seed)["macro"]
    header = (f"{args.branch}: N = {len(positions)} conditions, {params.sample.sampler}, batch {params.sample.batch_size}, "
              f"{machine_line()}; real-only arm macro AUROC {real['auroc']:.3f} "
              f"[{real['ci_low']:.3f}, {real['ci_high']:.3f}] on {len(test)} real test images")
    table = markdown_table(["steps", "guidance", "img/s", "seconds", "time / sample-stage setting",
                            f"FD vs real test (n={len(real_features)})", "synthetic-only macro AUROC [95% CI]",
                            "vs real-only [95% CI]"], rows)
    text = f"# Utility synthetic sets: sampler steps x guidance\n\n{command}\n\n{header}\n\n{table}\n"
    if args.batch_sizes:
        text += "\n" + batch_size_table(params, pipeline, args.branch, train, positions, store, args.batch_sizes) + "\n"
    print("\n" + text)
    out = args.out or Path("benchmarks/results") / f"utility_tradeoff_{args.branch}.md"
    out.write_text(text)


def batch_size_table(params, pipeline, branch, train, positions, store, batch_sizes: list[int]) -> str:
    """Generation speed of the utility stage's own setting at each batch size, the sample stage's first."""
    rows, base = [], None
    for size in [params.sample.batch_size, *[b for b in batch_sizes if b != params.sample.batch_size]]:
        run = changed(params, sample=changed(params.sample, batch_size=size))
        with tempfile.TemporaryDirectory() as scratch:
            facts = write_synthetic_set(pipeline, branch, train, positions, store, run, 1, Path(scratch) / "s")
        base = base or facts["images_per_second"]
        rows.append([f"{size}{' (sample.batch_size)' if size == params.sample.batch_size else ''}",
                     f"{facts['images_per_second']:.1f}", f"{facts['images_per_second'] / base:.2f}"])
    return (f"Batch size at {params.utility.steps} steps, guidance {params.utility.guidance_scale:g} "
            f"({len(positions)} images):\n\n" + markdown_table(["batch size", "img/s", "speed / sample.batch_size"], rows))


if __name__ == "__main__":
    main()

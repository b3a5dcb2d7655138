"""Stage `evaluate` (per branch): how close, how faithful, how diverse, how original the generations are.

Every distance is computed in the shared evaluator's feature space (a CXR classifier trained on the
real train split) and reported beside its real-vs-real floor at the same sample size; intervals are
percentile bootstraps. Standard and reference-compatible Inception FID (evaluation/inception_fid.py) and
CheXGenBench's RadDINO distances (evaluation/raddino.py) run when their weights are configured; otherwise
they are recorded as null with the reason.

`evaluate_branch` reads top to bottom: load the evaluator, embed every set, then one function per section
(closeness in evaluation/closeness.py; faithfulness, diversity, memorization and figures below), then write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from cxr_diffusion.config import EvaluateConfig, Params
from cxr_diffusion.conditioning.store import ConditionStore, check_store_branch
from cxr_diffusion.data.shards import (
    PreparedDataError, PreparedImages, check_generated_manifest, check_prepared_for,
)
from cxr_diffusion.evaluation.closeness import (
    closeness_metrics, inception_fid_metrics, prdc_metrics, real_floor, untrained_closeness,
)
from cxr_diffusion.evaluation.evaluator import CXRClassifier, embed_and_predict, load_classifier
from cxr_diffusion.evaluation.diversity import pairwise_ms_ssim, same_condition_pairs
from cxr_diffusion.evaluation.faithfulness import label_agreement, macro_auroc, per_label_auroc
from cxr_diffusion.utility.statistics import auroc_with_intervals
from cxr_diffusion.evaluation.memorization import memorization_report
from cxr_diffusion.evaluation.pca_plot import pca_scatter
from cxr_diffusion.evaluation.raddino import raddino_metrics
from cxr_diffusion.evaluation.xrv_metrics import xrv_metrics
from cxr_diffusion.device import describe_device, module_device, resolve_device
from cxr_diffusion.diffusion.grid import image_grid
from cxr_diffusion.io import atomic_directory, atomic_path, write_json
from cxr_diffusion.safe_text import visible_text
from cxr_diffusion.sampling.settings import changed_setting


@dataclass(frozen=True)
class EvaluatePaths:
    """Where one branch's evaluation reads and writes; the stage takes each from its command line (dvc.yaml)."""

    evaluator: Path  # models/evaluator: the shared evaluator (output of stage evaluator)
    prepared: Path   # data/prepared: the real splits
    samples: Path    # data/samples/<branch>: the generations (output of stage sample)
    model: Path      # models/<branch>: the trained pipeline (its architecture makes the untrained baseline)
    store: Path      # data/embeddings/<branch>: the conditions of the untrained baseline
    figures: Path    # reports/evaluate/<branch>
    metrics: Path    # metrics/evaluate/<branch>.json


@dataclass(frozen=True)
class BranchImages:
    """The image sets one evaluation reads: the real splits and the branch's generations (as a 'test' split)."""

    test: PreparedImages
    val: PreparedImages
    train: PreparedImages
    generated: PreparedImages

    @classmethod
    def open(cls, prepared: Path, samples: Path) -> BranchImages:
        images = cls(test=PreparedImages(prepared, "test"), val=PreparedImages(prepared, "val"),
                     train=PreparedImages(prepared, "train"), generated=PreparedImages(samples, "test"))
        images.check_generated_from_test(samples)
        return images

    def check_generated_from_test(self, samples: Path) -> None:
        """Each generation is named after the test image whose condition it used and labelled under the same
        classes: faithfulness reads its requested labels column by column and pairs it with that image."""
        fix = "rerun its sample stage (dvc repro -f sample@<branch>) on these prepared data"
        if self.generated.classes != self.test.classes:
            raise PreparedDataError(f"{samples / 'manifest.json'}: generations labelled under the classes "
                                    f"{visible_text(list(self.generated.classes), 200)}, the prepared data under "
                                    f"{visible_text(list(self.test.classes), 200)}; {fix}")
        more_test = "raise filter.split.test_fraction (with method random; official uses NIH's test_list.txt) or widen the filter"
        for name, images, what in (("generations", self.generated, "raise sample.count"),
                                   ("test images", self.test, more_test),
                                   ("val images", self.val, "raise filter.split.val_fraction (or widen the filter)")):
            if len(images) < 2:  # a Frechet distance, PRDC and the real floor need two of each
                raise PreparedDataError(f"{len(images)} {name} to evaluate, fewer than 2 (distances between sets "
                                        f"need two images of each); {what}, then rerun (dvc repro)")
        unknown = sorted(set(self.generated.image_indices) - set(self.test.image_indices))
        if unknown:
            raise PreparedDataError(f"{samples}: {len(unknown)} generation(s) named after no image of the test split "
                                    f"(first: {visible_text(unknown[0], 80)}); {fix}")
        seen: set[str] = set()
        twice = next((name for name in self.generated.image_indices if name in seen or seen.add(name)), None)
        if twice is not None:  # sample writes one generation per condition: each would count twice
            raise PreparedDataError(f"{samples}: the test image {visible_text(twice, 80)} names a generation twice "
                                    f"(each would count twice); {fix}")


@dataclass(frozen=True)
class SplitEmbedding:
    """One image set as the evaluator sees it (evaluator.embed_and_predict): one row per image."""

    features: np.ndarray       # evaluator features
    probabilities: np.ndarray  # evaluator's probability of each class
    labels: np.ndarray         # 0/1 per class; of a generation, the labels its condition asked for
    pixels: np.ndarray         # grayscale in [0, 1], downsized
    image_index: np.ndarray    # image names; a generation has the name of the real image whose condition it used


@dataclass(frozen=True)
class EmbeddedSplits:
    test: SplitEmbedding
    val: SplitEmbedding
    generated: SplitEmbedding
    train: SplitEmbedding  # the first `evaluate.train_reference` train images: the memorization reference


def embed_splits(classifier: CXRClassifier, images: BranchImages, config: EvaluateConfig) -> EmbeddedSplits:
    """Evaluator embeddings of every set; of the train split only its first ``config.train_reference`` images."""
    batch = config.batch_size  # images held at once (read and embedded): memory does not grow with a split

    def embed(split) -> SplitEmbedding:
        return SplitEmbedding(**embed_and_predict(classifier, split, batch))

    reference = Subset(images.train, range(min(config.train_reference, len(images.train))))
    return EmbeddedSplits(test=embed(images.test), val=embed(images.val), generated=embed(images.generated),
                          train=embed(reference))


@torch.no_grad()
def untrained_samples(params: Params, model_dir: Path, conditions: torch.Tensor, branch: str,
                      device: torch.device = torch.device("cpu")) -> list[Image.Image]:
    """Generations of the same architecture as ``branch``'s model with freshly initialised weights: the 'no
    training' baseline."""
    from diffusers import UNet2DConditionModel

    from cxr_diffusion.diffusion.condition import ConditionAdapter
    from cxr_diffusion.sampling.sample import generate, load_pipeline, output_side

    pipeline = load_pipeline(model_dir, params.sample.sampler, device)
    if pipeline.config.branch != branch:  # another architecture's baseline: a gap the model did not make
        raise PreparedDataError(f"{model_dir} holds a {visible_text(pipeline.config.branch, 60)} model, not "
                                f"{branch}'s; pass models/{branch}")
    if output_side(pipeline) != params.image_size:
        raise PreparedDataError(f"{model_dir} generates {output_side(pipeline)} px images but image_size is "
                                f"{params.image_size}; retrain it (dvc repro) after changing image_size")
    torch.manual_seed(params.seed)
    dtype = pipeline.unet.dtype  # fresh weights are initialised on the CPU (same draws everywhere), then moved
    pipeline.unet = UNet2DConditionModel.from_config(pipeline.unet.config).to(device, dtype)
    pipeline.condition_adapter = ConditionAdapter.from_config(pipeline.condition_adapter.config).to(device, dtype)
    return generate(pipeline, conditions, params, params.seed)


@torch.no_grad()
def _features_of_images(classifier: CXRClassifier, images: list[Image.Image], batch_size: int) -> np.ndarray:
    """Evaluator features of PIL images, ``batch_size`` at a time (float32 copies of one batch only)."""
    device, parts = module_device(classifier), []
    for start in range(0, len(images), batch_size):
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
                         for im in images[start:start + batch_size]])[:, None]
        parts.append(classifier.features(x.to(device)).cpu().numpy())
    return np.concatenate(parts)


def untrained_features(params: Params, paths: EvaluatePaths, classifier: CXRClassifier,
                       condition_names: np.ndarray, device: torch.device, branch: str) -> np.ndarray:
    """Evaluator features of the untrained baseline, one generation per named condition of the branch's store."""
    store = ConditionStore(paths.store)
    check_store_branch(store, paths.store, branch)
    conditions = torch.stack([store[name].embeddings for name in condition_names])
    images = untrained_samples(params, paths.model, conditions, branch, device)
    return _features_of_images(classifier, images, params.evaluate.batch_size)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def faithfulness_metrics(generated: SplitEmbedding, test: SplitEmbedding, classes: list[str], resamples: int,
                         seed: int) -> dict:
    """Does a generation show what its condition asked for? The evaluator's AUROC against the requested labels,
    with a bootstrap 95% interval over the generations (beside its own AUROC on real test images), and the
    feature cosine to the real image the condition came from."""
    requested = generated.labels.astype(int)
    per_class = per_label_auroc(requested, generated.probabilities, classes)
    macro = auroc_with_intervals(requested, generated.probabilities, classes, generated.image_index, resamples,
                                 seed)["macro"]
    real_per_class = per_label_auroc(test.labels.astype(int), test.probabilities, classes)
    test_row = {name: row for row, name in enumerate(test.image_index)}
    source_rows = np.array([test_row[name] for name in generated.image_index])
    # Each test image against another one: a random order shifted by a non-zero offset pairs no image with itself
    # (a permutation's fixed points would add cosines of 1: with two images, often every pair).
    count = len(test.features)
    order = np.random.default_rng(seed).permutation(count)
    shuffled = np.empty(count, dtype=np.int64)
    shuffled[order] = np.roll(order, -int(np.random.default_rng([seed, 1]).integers(1, count)) if count > 1 else 0)
    return {
        "auroc_vs_requested_labels": per_class,
        "macro_auroc_vs_requested_labels": macro_auroc(per_class),
        "macro_auroc_vs_requested_labels_95ci": [macro["ci_low"], macro["ci_high"]],
        "evaluator_macro_auroc_on_real_test": macro_auroc(real_per_class),
        "label_agreement": label_agreement(requested, generated.probabilities),
        "feature_cosine_to_reference": float(_cosine(generated.features, test.features[source_rows]).mean()),
        "feature_cosine_random_real_pairs": float(_cosine(test.features[shuffled], test.features).mean()),
    }


def _same_label_ms_ssim(split: SplitEmbedding, max_pairs: int, pairs_per_batch: int, seed: int
                        ) -> tuple[float | None, int]:
    """Mean MS-SSIM over pairs of images with the same label set (None without such a pair), and the pair count."""
    label_sets = ["|".join(map(str, row)) for row in split.labels.astype(int)]
    pairs = same_condition_pairs(label_sets, max_pairs, seed=seed)
    if not pairs:
        return None, 0
    pixels = torch.from_numpy(split.pixels[:, None].astype(np.float32))
    return pairwise_ms_ssim(pixels, pairs, pairs_per_batch=pairs_per_batch), len(pairs)


def diversity_metrics(generated: SplitEmbedding, test: SplitEmbedding, max_pairs: int, batch_size: int,
                      seed: int) -> dict:
    """MS-SSIM between images of the same label set (lower = more diverse), generated beside real."""
    pairs_per_batch = max(1, batch_size // 2)  # two images per pair: at most batch_size images held at once
    generated_ms_ssim, pairs = _same_label_ms_ssim(generated, max_pairs, pairs_per_batch, seed)
    real_ms_ssim, _ = _same_label_ms_ssim(test, max_pairs, pairs_per_batch, seed)
    return {"ms_ssim_same_labels_generated": generated_ms_ssim, "ms_ssim_same_labels_real": real_ms_ssim,
            "pairs": pairs}


def memorization_metrics(splits: EmbeddedSplits, percentile: float) -> tuple[dict, list[dict]]:
    """Nearest training image of each generation, in evaluator features and in pixels; and the closest pairs in
    pixels (for the figure), which the metrics leave out."""
    def flat(pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(len(pixels), -1)

    in_features = memorization_report(splits.generated.features, splits.train.features, splits.test.features,
                                      percentile)
    in_pixels = memorization_report(flat(splits.generated.pixels), flat(splits.train.pixels),
                                    flat(splits.test.pixels), percentile)
    without_pairs = lambda report: {k: v for k, v in report.items() if k != "closest_pairs"}  # noqa: E731
    return ({"features": without_pairs(in_features), "pixels": without_pairs(in_pixels)},
            in_pixels["closest_pairs"])


def _tile(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def write_figures(tmp: Path, branch: str, splits: EmbeddedSplits, closest_pairs: list[dict]) -> None:
    """pca.png (real test vs generated features) and closest_to_train.png (top: the 8 generations closest to a
    training image in pixels; bottom: those training images), into the folder ``tmp``."""
    pca_scatter(splits.test.features, splits.generated.features,
                f"{branch}: real test vs generated (evaluator features, PCA)", tmp / "pca.png")
    shown = closest_pairs[:8]
    tiles = ([_tile(splits.generated.pixels[pair["generated"]]) for pair in shown]
             + [_tile(splits.train.pixels[pair["train"]]) for pair in shown])
    image_grid(tiles, rows=2).save(tmp / "closest_to_train.png")


def _check_sampled_as_the_params_say(samples: Path, generated: dict, params: Params) -> None:
    """The generations were made with params.sample's sampler, steps and guidance and the params' seed: the
    untrained baseline is sampled with those, and the metrics are reported under them."""
    changed = changed_setting(generated, params)
    if changed is not None:
        raise PreparedDataError(f"{Path(samples) / 'manifest.json'}: {changed.describe()}; rerun the sample stage "
                                "(dvc repro)")


def evaluate_branch(params: Params, branch: str, paths: EvaluatePaths) -> dict:
    """All metrics of a branch, written to ``paths.metrics`` and returned; figures in ``paths.figures``."""
    started = time.perf_counter()
    config, seed = params.evaluate, params.seed
    device = resolve_device(params.device)
    classifier = load_classifier(paths.evaluator).to(device)
    check_prepared_for(paths.prepared, params.image_size, params.filter.classes)  # xrv matches classes by position
    images = BranchImages.open(paths.prepared, paths.samples)
    generated = check_generated_manifest(paths.samples, images.generated.manifest, branch, params.image_size)
    _check_sampled_as_the_params_say(paths.samples, generated, params)
    if len(images.generated) > params.sample.count:  # sample makes one per test condition, at most sample.count
        raise PreparedDataError(f"{paths.samples}: {len(images.generated)} generations, more than sample.count "
                                f"({params.sample.count}); rerun the sample stage (dvc repro)")
    if classifier.spec.image_size != params.image_size:  # it would see every image resized, unlike its training
        raise PreparedDataError(f"{paths.evaluator}: an evaluator trained on {classifier.spec.image_size} px images, "
                                f"image_size is {params.image_size}; rerun the evaluator stage (dvc repro evaluator)")
    if tuple(classifier.spec.classes) != images.test.classes:
        raise PreparedDataError(f"{paths.evaluator}: an evaluator of the classes {visible_text(list(classifier.spec.classes), 200)}, "
                                f"the prepared data have {visible_text(list(images.test.classes), 200)}; rerun the "
                                "evaluator stage (dvc repro evaluator)")
    splits = embed_splits(classifier, images, config)
    generated_features, test_features = splits.generated.features, splits.test.features

    floor = real_floor(test_features, splits.val.features, len(generated_features), seed)
    closeness = {**closeness_metrics(generated_features, test_features, floor, config, seed),
                 **inception_fid_metrics(config, images.generated, images.test, images.train,
                                        images.train.image_size, device)}
    if config.untrained_images > 0:
        names = splits.generated.image_index[:min(floor.size, config.untrained_images)]
        baseline = untrained_features(params, paths, classifier, names, device, branch)
        closeness.update(untrained_closeness(baseline, generated_features, floor))
    prdc = prdc_metrics(test_features, generated_features, config.prdc_k)
    raddino_pin = params.fetch.raddino_revision if config.raddino == params.fetch.raddino_repo else None
    raddino = raddino_metrics(config, images.generated, images.test, seed, device, raddino_pin)
    pretrained_judge = xrv_metrics(config, params.filter.class_members(), images.generated, splits.generated.labels,
                                   images.test, splits.test.labels, images.val, seed, device)
    faithfulness = faithfulness_metrics(splits.generated, splits.test, list(classifier.spec.classes), config.bootstrap,
                                        seed)
    diversity = diversity_metrics(splits.generated, splits.test, config.diversity_pairs, config.batch_size, seed)
    memorization, closest_pairs = memorization_metrics(splits, config.memorization_percentile)
    metrics = {
        "branch": branch, "generated": len(generated_features), "real_test": len(test_features),
        "closeness": closeness, "prdc": prdc, "raddino": raddino, "faithfulness": faithfulness, "diversity": diversity,
        "xrv_densenet": pretrained_judge, "memorization": memorization,
        "seconds": round(time.perf_counter() - started, 1), "device": describe_device(device),
    }
    # The figures and the metrics are replaced together, or neither (a full disk keeps the previous pair).
    with atomic_directory(paths.figures) as figures, atomic_path(paths.metrics) as metrics_file:
        write_figures(figures, branch, splits, closest_pairs)
        write_json(metrics_file, metrics)
    return metrics

"""Stage `evaluate` (per branch): how close, how faithful, how diverse, how original the generations are.

Every distance is computed in the shared evaluator's feature space (a CXR classifier trained on the
real train split) and reported beside its real-vs-real floor at the same sample size; intervals are
percentile bootstraps. Standard and reference-compatible Inception FID run when their weights are
configured (evaluation/inception_fid.py); otherwise they are recorded as null with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from cxr_diffusion.config import Params
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.diffusion.grid import image_grid
from cxr_diffusion.evaluation.distances import (
    bootstrap_interval, frechet_distance, kernel_inception_distance, real_vs_real_floor,
)
from cxr_diffusion.evaluation.diversity import pairwise_ms_ssim, same_condition_pairs
from cxr_diffusion.evaluation.evaluator import CXRClassifier, embed_and_predict, load_classifier
from cxr_diffusion.evaluation.inception_fid import reference_compatible_fid, standard_fid
from cxr_diffusion.evaluation.faithfulness import label_agreement, macro_auroc, per_label_auroc
from cxr_diffusion.evaluation.memorization import memorization_report
from cxr_diffusion.evaluation.pca_plot import pca_scatter
from cxr_diffusion.evaluation.xrv_metrics import xrv_metrics
from cxr_diffusion.device import describe_device, module_device, resolve_device
from cxr_diffusion.io import atomic_directory, write_json

def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def _interval(values: tuple[float, float]) -> list[float]:
    return [float(values[0]), float(values[1])]


@torch.no_grad()
def untrained_samples(params: Params, model_dir: Path, conditions: torch.Tensor,
                      device: torch.device = torch.device("cpu")) -> list[Image.Image]:
    """Generations of the same architecture with freshly initialised weights: the 'no training' baseline."""
    from diffusers import UNet2DConditionModel

    from cxr_diffusion.diffusion.condition import ConditionAdapter
    from cxr_diffusion.sampling.sample import generate, load_pipeline

    pipeline = load_pipeline(model_dir, params.sample.sampler, device)
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


def evaluate_branch(params: Params, branch: str, evaluator_dir: Path, prepared_dir: Path, samples_dir: Path,
                    model_dir: Path, store_dir: Path, figures_dir: Path, metrics_path: Path | None = None) -> dict:
    started = time.perf_counter()
    config = params.evaluate
    device = resolve_device(params.device)
    classifier = load_classifier(evaluator_dir).to(device)
    classes = list(classifier.spec.classes)
    test_images, val_images = PreparedImages(prepared_dir, "test"), PreparedImages(prepared_dir, "val")
    generated_images, train_images = PreparedImages(samples_dir, "test"), PreparedImages(prepared_dir, "train")
    batch = config.batch_size  # images held at once (read and embedded, or scored): memory does not grow with a split
    test = embed_and_predict(classifier, test_images, batch)
    val = embed_and_predict(classifier, val_images, batch)
    generated = embed_and_predict(classifier, generated_images, batch)
    reference = Subset(train_images, range(min(config.train_reference, len(train_images))))
    train = embed_and_predict(classifier, reference, batch)  # type: ignore[arg-type]
    n = len(generated["features"])
    g, r = generated["features"], test["features"]

    # Closeness: Frechet distance and KID in evaluator features, with the real-vs-real floor at the same size.
    pool = np.concatenate([r, val["features"]])
    matched = min(n, len(pool) // 2)
    real_a, real_b = real_vs_real_floor(pool, matched, seed=params.seed)
    fd_matched, fd_floor = frechet_distance(g[:matched], real_a), frechet_distance(real_a, real_b)
    subset = min(config.kid_subset, n, len(r), matched)
    kid_mean, kid_std = kernel_inception_distance(g, r, subset_size=subset, seed=params.seed)
    closeness = {
        "domain_fd": frechet_distance(g, r),
        "domain_fd_95ci": _interval(bootstrap_interval(frechet_distance, g, r, n_boot=config.bootstrap, seed=params.seed)),
        "domain_fd_matched": fd_matched,
        "real_vs_real_fd_floor": fd_floor,
        "domain_fd_ratio_to_floor": fd_matched / max(fd_floor, 1e-12),
        "matched_size": matched,
        "kid": kid_mean, "kid_std": kid_std,
        "real_vs_real_kid_floor": kernel_inception_distance(real_a, real_b, subset_size=min(subset, matched),
                                                            seed=params.seed)[0],
    }
    for name, result in (
        ("inception_fid", standard_fid(config, generated_images, test_images,
                                       train_images.image_size, device)),
        ("reference_compatible_fid", reference_compatible_fid(config, generated_images, train_images,
                                                              train_images.image_size, device)),
    ):
        closeness[name] = result.pop("value")
        closeness[f"{name}_details"] = result
    if config.untrained_images > 0:
        store = ConditionStore(store_dir)
        count = min(matched, config.untrained_images)
        conditions = torch.stack([store[name].embeddings for name in generated["image_index"][:count]])
        baseline = _features_of_images(classifier, untrained_samples(params, model_dir, conditions, device), batch)
        closeness["untrained_fd_matched"] = frechet_distance(baseline, real_a[:count])
        closeness["trained_fd_same_size"] = frechet_distance(g[:count], real_a[:count])
        closeness["untrained_size"] = count
    prdc = precision_recall_density_coverage_safe(r, g, config.prdc_k)
    pretrained_judge = xrv_metrics(config, params.filter.class_members(), generated_images, generated["labels"],
                                   test_images, test["labels"], val_images, params.seed, device)

    # Faithfulness: does the generation show what its condition asked for?
    requested = generated["labels"].astype(int)
    per_class = per_label_auroc(requested, generated["probabilities"], classes)
    real_per_class = per_label_auroc(test["labels"].astype(int), test["probabilities"], classes)
    source_row = {name: i for i, name in enumerate(test["image_index"])}
    sources = np.array([source_row[name] for name in generated["image_index"]])
    rng = np.random.default_rng(params.seed)
    faithfulness = {
        "auroc_vs_requested_labels": per_class,
        "macro_auroc_vs_requested_labels": macro_auroc(per_class),
        "evaluator_macro_auroc_on_real_test": macro_auroc(real_per_class),
        "label_agreement": label_agreement(requested, generated["probabilities"]),
        "feature_cosine_to_reference": float(_cosine(g, r[sources]).mean()),
        "feature_cosine_random_real_pairs": float(_cosine(r[rng.permutation(len(r))], r).mean()),
    }

    # Diversity: MS-SSIM between images of the same label set (lower = more diverse), generated vs real.
    label_sets = ["|".join(map(str, row)) for row in requested]
    generated_pairs = same_condition_pairs(label_sets, config.diversity_pairs, seed=params.seed)
    real_sets = ["|".join(map(str, row)) for row in test["labels"].astype(int)]
    real_pairs = same_condition_pairs(real_sets, config.diversity_pairs, seed=params.seed)
    to_tensor = lambda pixels: torch.from_numpy(pixels[:, None].astype(np.float32))  # noqa: E731
    per_batch = max(1, batch // 2)  # two images per pair
    diversity = {
        "ms_ssim_same_labels_generated": pairwise_ms_ssim(to_tensor(generated["pixels"]), generated_pairs,
                                                          pairs_per_batch=per_batch) if generated_pairs else None,
        "ms_ssim_same_labels_real": pairwise_ms_ssim(to_tensor(test["pixels"]), real_pairs, pairs_per_batch=per_batch)
        if real_pairs else None,
        "pairs": len(generated_pairs),
    }

    # Memorization: nearest training image, in evaluator features and in pixels.
    flat = lambda pixels: pixels.reshape(len(pixels), -1)  # noqa: E731
    memorization_features = memorization_report(g, train["features"], r, config.memorization_percentile)
    memorization_pixels = memorization_report(flat(generated["pixels"]), flat(train["pixels"]), flat(test["pixels"]),
                                              config.memorization_percentile)

    with atomic_directory(figures_dir) as tmp:
        pca_scatter(r, g, f"{branch}: real test vs generated (evaluator features, PCA)", tmp / "pca.png")
        pairs = memorization_pixels["closest_pairs"]
        tiles = []
        for pair in pairs[:8]:
            tiles.append(Image.fromarray((generated["pixels"][pair["generated"]] * 255).round().astype(np.uint8)))
        for pair in pairs[:8]:
            tiles.append(Image.fromarray((train["pixels"][pair["train"]] * 255).round().astype(np.uint8)))
        image_grid(tiles, rows=2).save(tmp / "closest_to_train.png")

    metrics = {
        "branch": branch, "generated": n, "real_test": len(r),
        "closeness": closeness, "prdc": prdc, "faithfulness": faithfulness, "diversity": diversity,
        "xrv_densenet": pretrained_judge,
        "memorization": {
            "features": {k: v for k, v in memorization_features.items() if k != "closest_pairs"},
            "pixels": {k: v for k, v in memorization_pixels.items() if k != "closest_pairs"},
        },
        "seconds": round(time.perf_counter() - started, 1), "device": describe_device(device),
    }
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics


def precision_recall_density_coverage_safe(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """PRDC with k capped by the set sizes (tiny profiles have few images)."""
    from cxr_diffusion.evaluation.prdc import precision_recall_density_coverage

    k = max(1, min(k, len(real) - 1, len(fake) - 1))
    return {**precision_recall_density_coverage(real, fake, k=k), "k": k}

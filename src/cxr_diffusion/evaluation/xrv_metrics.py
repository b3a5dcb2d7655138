"""The pretrained torchxrayvision DenseNet's verdict on a branch: domain FD and faithfulness AUROC.

Runs only when ``evaluate.xrv_weights`` points at its weights; otherwise the result is null with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxr_diffusion.config import EvaluateConfig
from cxr_diffusion.evaluation.distances import bootstrap_interval, frechet_distance, real_vs_real_floor
from cxr_diffusion.evaluation.faithfulness import macro_auroc, per_label_auroc
from cxr_diffusion.evaluation.weights import full_fp32
from cxr_diffusion.evaluation.xrv_densenet import HOW_TO_GET, XRVDenseNet121, class_scores, load_xrv_densenet
from cxr_diffusion.io import sha256_file


@torch.no_grad()
def _embed(model: XRVDenseNet121, images: Dataset, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    features, logits = [], []
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
        with full_fp32():
            f, z = model(batch["pixel_values"].to(device))
        features.append(f.cpu().double().numpy())
        logits.append(z.cpu().double().numpy())
    return np.concatenate(features), np.concatenate(logits)


def _auroc(labels: np.ndarray, logits: np.ndarray, class_members: dict[str, tuple[str, ...]]) -> dict:
    scores = class_scores(torch.from_numpy(logits), class_members)
    if not scores:
        return {}
    columns = [list(class_members).index(name) for name in scores]
    matrix = torch.stack(list(scores.values()), 1).numpy()
    return per_label_auroc(labels[:, columns].astype(int), matrix, list(scores))


def xrv_metrics(config: EvaluateConfig, class_members: dict[str, tuple[str, ...]], generated: Dataset,
                generated_labels: np.ndarray, real_test: Dataset, real_test_labels: np.ndarray,
                real_val: Dataset, seed: int, device: torch.device) -> dict:
    """FD (with bootstrap CI and the real-vs-real floor at matched n) in DenseNet features, and per-class
    AUROC of its pathology logits against the requested labels (next to the same AUROC on real test images)."""
    if config.xrv_weights is None:
        return {"fd": None, "reason": "no torchxrayvision DenseNet weights configured (offline default); to enable "
                                      f"it, {HOW_TO_GET}, then set params evaluate.xrv_weights"}
    model = load_xrv_densenet(config.xrv_weights, device)
    size = config.inception_batch_size
    g, g_logits = _embed(model, generated, size, device)
    r, r_logits = _embed(model, real_test, size, device)
    v, _ = _embed(model, real_val, size, device)
    matched = min(len(g), (len(r) + len(v)) // 2)
    real_a, real_b = real_vs_real_floor(np.concatenate([r, v]), matched, seed=seed)
    fd_matched, floor = frechet_distance(g[:matched], real_a), frechet_distance(real_a, real_b)
    requested = _auroc(generated_labels, g_logits, class_members)
    on_real = _auroc(real_test_labels, r_logits, class_members)
    return {
        "fd": frechet_distance(g, r),
        "fd_95ci": list(bootstrap_interval(frechet_distance, g, r, n_boot=config.bootstrap, seed=seed)),
        "fd_matched": fd_matched, "real_vs_real_fd_floor": floor, "fd_ratio_to_floor": fd_matched / max(floor, 1e-12),
        "matched_size": matched,
        "auroc_vs_requested_labels": requested, "macro_auroc_vs_requested_labels": macro_auroc(requested),
        "macro_auroc_on_real_test": macro_auroc(on_real),
        "classes_not_covered": [name for name in class_members if name not in requested],
        "weights": str(config.xrv_weights), "weights_sha256": sha256_file(Path(config.xrv_weights)),
    }

"""Inception FID in the two forms researchers compare against, when Inception weights are present.

- Standard FID: FID-Inception pool features (2048-d), generated images vs held-out real test images,
  computed with torchmetrics' ``FrechetInceptionDistance`` exactly as its default extractor would
  (uint8 inputs, TF1-style resize to 299, (x - 128) / 128).
- Reference-compatible FID: how the reference work computed 26.183 / 21.831 / 24.070. torchvision's
  ImageNet Inception-v3 1000-class logits of images normalised with mean = std = 0.5, generated images vs
  the real *training* images. Only comparable with those numbers, not with standard FID.

Without weights each is recorded as null with the reason and how to enable it, never estimated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from cxr_diffusion.config import EvaluateConfig
from cxr_diffusion.evaluation.inception import InceptionSpec, InceptionV3, load_inception
from cxr_diffusion.evaluation.weights import full_fp32
from cxr_diffusion.io import sha256_file

HOW_TO_ENABLE = ("get the weights once on a machine with internet and convert them to safetensors with "
                 "`cxr-diffusion convert-weights` (docs/evaluation.md, 'Standard and reference-compatible FID'), then set "
                 "params evaluate.{param}")


def _uint8_batches(images: Dataset, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """PreparedImages items ([-1, 1] floats) back to the uint8 pixels they were decoded from."""
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
        pixels = ((batch["pixel_values"] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        yield pixels.to(device)


def frechet_inception_distance(model: InceptionV3, generated: Dataset, real: Dataset, batch_size: int,
                               device: torch.device, description: str) -> float:
    """torchmetrics FID with ``model`` as the feature extractor (fp32 features, no TF32; statistics in float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=model, normalize=False).to(device)
    with torch.no_grad(), full_fp32():
        for images, is_real in ((real, True), (generated, False)):
            total = -(-len(images) // batch_size)  # type: ignore[arg-type]
            for batch in tqdm(_uint8_batches(images, batch_size, device), total=total,
                              desc=f"{description} ({'real' if is_real else 'generated'})", leave=False):
                metric.update(batch, real=is_real)
    return float(metric.compute())


def _unavailable(param: str, why: str) -> dict:
    return {"value": None, "reason": f"{why}; to enable it, {HOW_TO_ENABLE.format(param=param)}"}


def standard_fid(config: EvaluateConfig, generated: Dataset, real_test: Dataset, image_size: int,
                 device: torch.device) -> dict:
    """Standard FID (FID-Inception pool3, 2048-d) of generated vs real test images, with its settings."""
    if config.inception_weights is None:
        return _unavailable("inception_weights", "no FID-Inception weights configured (offline default)")
    path = Path(config.inception_weights)
    model = load_inception(path, InceptionSpec("fid", "pool"), device)
    value = frechet_inception_distance(model, generated, real_test, config.inception_batch_size, device, "standard FID")
    return {
        "value": value, "features": "FID-Inception (TF 2015-12-05) pool3, 2048-d, torchmetrics",
        "real": "test split", "n_real": len(real_test), "n_generated": len(generated),  # type: ignore[arg-type]
        "resolution": f"{image_size}x{image_size}, resized to 299x299 (TF1 bilinear)", "precision": "fp32, no TF32",
        "weights": str(path), "weights_sha256": sha256_file(path),
    }


def reference_compatible_fid(config: EvaluateConfig, generated: Dataset, real_train: Dataset,
                             image_size: int, device: torch.device) -> dict:
    """FID on torchvision Inception-v3 1000-class logits vs the real training images (the reference's recipe)."""
    if config.reference_inception_weights is None:
        return _unavailable("reference_inception_weights",
                            "no torchvision Inception-v3 weights configured (offline default)")
    path = Path(config.reference_inception_weights)
    spec = InceptionSpec("torchvision", "logits", transform_input=config.reference_transform_input)
    model = load_inception(path, spec, device)
    count = len(real_train)  # type: ignore[arg-type]
    if config.reference_fid_train_images is not None:
        count = min(count, config.reference_fid_train_images)
    train = Subset(real_train, range(count))
    value = frechet_inception_distance(model, generated, train, config.inception_batch_size, device,
                                       "reference-compatible FID")
    return {
        "value": value,
        "features": "torchvision Inception-v3 (ImageNet) 1000-class logits, inputs normalised mean=std=0.5"
                    + (", torchvision transform_input" if config.reference_transform_input else ""),
        "real": "train split (as the reference did; not comparable with standard FID)",
        "n_real": count, "n_generated": len(generated),  # type: ignore[arg-type]
        "resolution": f"{image_size}x{image_size}, resized to 299x299 (bilinear, antialiased)", "precision": "fp32, no TF32",
        "weights": str(path), "weights_sha256": sha256_file(path),
    }

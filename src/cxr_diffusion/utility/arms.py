"""Classifier arms of the utility study: the same network, epochs, augmentation and seed for every arm
(real only, synthetic only, real + synthetic, synthetic then real, synthetic at k x N); only the training
images differ, and for synthetic then real their order (pretrained on one, fine-tuned on the other).

The loss and the optimizer step are the evaluator's (weighted multi-label BCE with small shifts and
exposure changes, AdamW with a one-cycle schedule), so an arm differs from the evaluator only in its
images and, at full scale, its network (``utility.classifier.architecture``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cxr_diffusion.config import UtilityClassifierConfig
from cxr_diffusion.errors import UserError
from cxr_diffusion.evaluation.evaluator import ClassifierSpec, CXRClassifier, class_weights, classifier_step
from cxr_diffusion.utility.resnet import ResNet50Classifier


@dataclass(frozen=True)
class ArmImages:
    """Training or test images of one arm: ``pixels`` (n, 1, S, S) uint8 grayscale at the side the classifier
    sees (8-bit, as prepared images are stored), ``labels`` (n, classes) 0/1. For synthetic images the labels
    are the ones they were generated for, never re-predicted."""

    pixels: torch.Tensor
    labels: np.ndarray

    def __post_init__(self) -> None:
        if (self.pixels.ndim != 4 or self.pixels.shape[1] != 1 or self.pixels.dtype != torch.uint8
                or len(self.pixels) != len(self.labels) or len(self.labels) == 0):
            raise ValueError(f"an arm needs (n, 1, S, S) uint8 images and n label rows, n >= 1; got images "
                             f"{tuple(self.pixels.shape)} {self.pixels.dtype} and labels {np.shape(self.labels)}")

    def __add__(self, other: ArmImages) -> ArmImages:
        return ArmImages(torch.cat([self.pixels, other.pixels]), np.concatenate([self.labels, other.labels]))

    def __len__(self) -> int:
        return len(self.labels)

    def pixel_values(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Images ``rows`` as float32 in [-1, 1], the range every classifier of the project takes."""
        return self.pixels[rows].float() / 127.5 - 1


def to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 [0, 255], rounded (exact for images that came from 8-bit PNGs)."""
    return ((pixel_values.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def build_classifier(config: UtilityClassifierConfig, classes: Sequence[str], image_size: int) -> nn.Module:
    spec = ClassifierSpec(tuple(classes), config.width, config.feature_dim, image_size, config.max_image_size)
    return ResNet50Classifier(spec) if config.architecture == "resnet50" else CXRClassifier(spec)


def train_arm(images: ArmImages, classes: Sequence[str], config: UtilityClassifierConfig, seed: int,
              device: torch.device, name: str = "arm", pretrained: nn.Module | None = None) -> nn.Module:
    """One arm's classifier. The number of optimizer steps follows the arm's size (``config.epochs`` passes
    over its images), as the reference protocols train every arm for the same epochs. ``pretrained``: a trained
    classifier to fine-tune (with a fresh optimizer and schedule) instead of a new one."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = (pretrained if pretrained is not None else build_classifier(config, classes, images.pixels.shape[-1])).to(device)
    batch_size = min(config.batch_size, len(images))
    steps = config.epochs * (len(images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    labels = torch.from_numpy(np.asarray(images.labels, dtype=np.float32))
    pos_weight = class_weights(labels)
    model.train()
    with tqdm(total=steps, desc=f"utility {name}", unit="step") as progress:
        for _ in range(config.epochs):
            order = torch.randperm(len(images), generator=generator)
            for offset in range(0, len(order) - batch_size + 1, batch_size):
                rows = order[offset:offset + batch_size]
                batch = {"pixel_values": images.pixel_values(rows), "labels": labels[rows]}
                loss = classifier_step(model, optimizer, schedule, batch, generator, pos_weight, device)
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


class ArmTrainingError(UserError, ValueError):
    """An arm's classifier diverged: its scores are not numbers."""


@torch.no_grad()
def predict(model: nn.Module, images: ArmImages, batch_size: int, name: str = "arm") -> np.ndarray:
    """Per-class probabilities (n, classes), ``batch_size`` images at a time; refused when any is not finite
    (the ``name`` arm's training diverged), before a statistic is computed on it."""
    device = next(model.parameters()).device
    parts = [torch.sigmoid(model(images.pixel_values(slice(start, start + batch_size)).to(device))).cpu().numpy()
             for start in range(0, len(images), batch_size)]
    scores = np.concatenate(parts).astype(np.float64)
    if not np.isfinite(scores).all():
        raise ArmTrainingError(f"utility arm {name!r}: its classifier gives non-finite scores (training diverged); "
                               "lower utility.classifier.lr and rerun")
    return scores

"""Classifier arms of the utility study: the same network, epochs, augmentation and seed for every arm
(real only, synthetic only, real + synthetic, synthetic at 2N/4N); only the training images differ.

The network and its loss are the evaluator's (``CXRClassifier``, weighted multi-label BCE with small
shifts and exposure changes), so an arm differs from the evaluator only in what it is trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cxr_diffusion.config import EvaluatorConfig
from cxr_diffusion.evaluation.evaluator import ClassifierSpec, CXRClassifier, evaluator_loss


@dataclass(frozen=True)
class ArmImages:
    """Training images of one arm: ``pixel_values`` (n, channels, H, W) in [-1, 1], ``labels`` (n, classes) 0/1.
    For synthetic images the labels are the ones they were generated for, never re-predicted."""

    pixel_values: torch.Tensor
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.pixel_values.ndim != 4 or len(self.pixel_values) != len(self.labels) or len(self.labels) == 0:
            raise ValueError(f"an arm needs (n, channels, H, W) images and n label rows, n >= 1; got images "
                             f"{tuple(self.pixel_values.shape)} and labels {np.shape(self.labels)}")

    def __add__(self, other: ArmImages) -> ArmImages:
        return ArmImages(torch.cat([self.pixel_values, other.pixel_values]),
                         np.concatenate([self.labels, other.labels]))


def train_arm(images: ArmImages, classes: Sequence[str], config: EvaluatorConfig, seed: int,
              device: torch.device = torch.device("cpu")) -> CXRClassifier:
    """One arm's classifier. The number of optimizer steps follows the arm's size (``config.epochs`` passes
    over its images), as the reference protocols train every arm for the same epochs."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    spec = ClassifierSpec(tuple(classes), config.width, config.feature_dim, images.pixel_values.shape[-1],
                          config.max_image_size)
    model = CXRClassifier(spec).to(device)
    batch_size = min(config.batch_size, len(images.labels))
    steps = config.epochs * (len(images.labels) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    labels = torch.from_numpy(np.asarray(images.labels, dtype=np.float32))
    positives = labels.mean(0).clamp(0.02, 0.98)
    pos_weight = ((1 - positives) / positives).sqrt()  # the evaluator's softened class weights
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            if step >= steps:
                break
            rows = order[start:start + batch_size]
            batch = {"pixel_values": images.pixel_values[rows], "labels": labels[rows]}
            loss = evaluator_loss(model, batch, generator, pos_weight, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    return model.eval()


@torch.no_grad()
def predict(model: CXRClassifier, pixel_values: torch.Tensor, batch_size: int) -> np.ndarray:
    """Per-class probabilities (n, classes) of images in [-1, 1], ``batch_size`` at a time."""
    device = next(model.parameters()).device
    parts = [torch.sigmoid(model(pixel_values[start:start + batch_size].to(device))).cpu().numpy()
             for start in range(0, len(pixel_values), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(model.spec.classes)))

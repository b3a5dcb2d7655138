"""Stage `evaluator`: a CXR classifier trained once on the real train split, shared by every branch.

Its penultimate features are the space for the domain Frechet distance, KID, PRDC, memorization
and PCA; its outputs measure conditioning faithfulness. Saved as safetensors + JSON config.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxr_diffusion.config import EvaluatorConfig
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.evaluation.faithfulness import macro_auroc, per_label_auroc
from cxr_diffusion.device import decode_workers, describe_device, module_device
from cxr_diffusion.io import atomic_directory, give_plain_modes, read_json, write_json
from cxr_diffusion.safe_text import visible_text
from cxr_diffusion.safetensors_header import checked_header
from cxr_diffusion.whole_number import is_whole_number


@dataclass(frozen=True)
class ClassifierSpec:
    classes: tuple[str, ...]
    width: int
    feature_dim: int
    image_size: int                # side of the prepared images it was trained on
    input_size: int | None = None  # side the network sees (larger inputs are area-averaged down); None: image_size

    @property
    def network_size(self) -> int:
        return self.image_size if self.input_size is None else min(self.image_size, self.input_size)


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
                         nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class CXRClassifier(nn.Module):
    """Grayscale in [-1, 1] -> multi-label logits; ``features`` is the penultimate layer. Images wider than
    ``spec.network_size`` are area-averaged down to it first (``inputs``), so at 512 px the network runs at that side."""

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.body = nn.Sequential(_block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(4 * w, spec.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(spec.feature_dim, len(spec.classes))

    @staticmethod
    def gray(pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.mean(1, keepdim=True)

    def inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the network sees: grayscale, at most ``spec.network_size`` wide."""
        gray = self.gray(pixel_values)
        side = self.spec.network_size
        if gray.shape[-1] > side or gray.shape[-2] > side:
            gray = F.interpolate(gray, size=(side, side), mode="area")
        return gray

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(self.inputs(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def save_classifier(model: CXRClassifier, out_dir: Path, metrics: dict) -> None:
    with atomic_directory(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        give_plain_modes([tmp / "model.safetensors"])  # safetensors makes it 0600
        kept = {k: v for k, v in metrics.items() if k != "seconds"}  # wall-clock time would change the model's bytes
        (tmp / "config.json").write_text(json.dumps({**asdict(model.spec), "metrics": kept}, indent=2) + "\n")


def read_classifier_spec(path: Path) -> ClassifierSpec:
    """The evaluator's ``config.json``, checked: bad JSON, a missing key or a wrong type is one line."""
    fix = "retrain it with `dvc repro -f evaluator`"
    config = read_json(path, fix)
    classes = config.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' is {classes!r:.60}, expected a list of class names; {fix}")
    if len(classes) > _MAX_CLASSES:
        raise DataError(f"{path}: {len(classes)} classes, more than {_MAX_CLASSES}; {fix}")
    for key, most in _SIZE_LIMITS.items():  # the params' own ranges (evaluator.width, ...): a network we can train
        if not is_whole_number(config.get(key), 1, most):
            raise DataError(f"{path}: '{key}' is {config.get(key)!r:.60}, expected a whole number from 1 to {most}; "
                            f"{fix}")
    input_size = config.get("input_size")  # saved before input_size existed: the network saw image_size
    if input_size is not None and not is_whole_number(input_size, 1, _SIZE_LIMITS["image_size"]):
        raise DataError(f"{path}: 'input_size' is {input_size!r:.60}, expected a whole number from 1 to "
                        f"{_SIZE_LIMITS['image_size']} or null; {fix}")
    return ClassifierSpec(tuple(classes), config["width"], config["feature_dim"], config["image_size"], input_size)


def load_classifier(directory: str | Path) -> CXRClassifier:
    """The evaluator saved in ``directory``: its config checked, then its weights' header against that config,
    before the network is built or a tensor read."""
    directory = Path(directory)
    spec = read_classifier_spec(directory / "config.json")
    _check_weights(directory / "model.safetensors", spec)
    model = CXRClassifier(spec)
    weights = load_file(directory / "model.safetensors")
    for name, tensor in weights.items():  # a NaN weight makes NaN features: every distance would fail on them
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DataError(f"{directory / 'model.safetensors'}: tensor {visible_text(name, 80)} holds NaN or "
                            f"infinite values; retrain it with `dvc repro -f evaluator`")
    model.load_state_dict(weights)
    return model.eval()


_MAX_CLASSES = 1024
_SIZE_LIMITS = {"width": 1024, "feature_dim": 16384, "image_size": 4096}


def _check_weights(path: Path, spec: ClassifierSpec) -> None:
    """``model.safetensors`` holds exactly the float tensors of the network ``spec`` describes, whole."""
    fix = "retrain it with `dvc repro -f evaluator`"
    header, problem = checked_header(path)
    if problem:
        raise DataError(f"{path}: not the evaluator's weights ({problem}); {fix}")
    with torch.device("meta"):
        expected = {name: list(tensor.shape) for name, tensor in CXRClassifier(spec).state_dict().items()}
    saved = {name: entry["shape"] for name, entry in header.tensors.items()}
    if saved != expected:
        wrong = sorted(name for name in expected.keys() | saved.keys() if saved.get(name) != expected.get(name))
        raise DataError(f"{path}: its tensors do not fit the network of config.json (first: "
                        f"{visible_text(wrong[0], 80)}: {saved.get(wrong[0])} saved, {expected.get(wrong[0])} "
                        f"expected); {fix}")


PIXELS_KEPT = 64  # side of the grayscale copies kept for pixel-space memorization and MS-SSIM


@torch.no_grad()
def predict_batch(model: CXRClassifier, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and per-class probabilities of a batch already on the model's device."""
    features = model.features(pixel_values)
    return features, torch.sigmoid(model.head(features))


@torch.no_grad()
def embed_and_predict(model: CXRClassifier, images: PreparedImages, batch_size: int) -> dict[str, np.ndarray]:
    """Features, probabilities, labels and pixels ([0, 1], grayscale, at most PIXELS_KEPT wide) of every
    image of a split, read ``batch_size`` images at a time; only these small arrays are kept, never the
    full-resolution images, so memory grows with ``batch_size``, not with the split."""
    features, probabilities, labels, pixels, names = [], [], [], [], []
    device = module_device(model)
    workers = decode_workers(device)
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=device.type == "cuda"):
        x = batch["pixel_values"]
        f, p = predict_batch(model, x.to(device))
        features.append(f.cpu().numpy())
        probabilities.append(p.cpu().numpy())
        labels.append(batch["labels"].numpy())
        gray = (x.mean(1, keepdim=True) + 1) / 2
        if gray.shape[-1] > PIXELS_KEPT:
            gray = F.interpolate(gray, size=(PIXELS_KEPT, PIXELS_KEPT), mode="area")
        pixels.append(gray[:, 0].numpy())
        names += list(batch["image_index"])
    stack = lambda parts: np.concatenate(parts) if parts else np.zeros((0,))  # noqa: E731
    return {"features": stack(features), "probabilities": stack(probabilities), "labels": stack(labels),
            "pixels": stack(pixels), "image_index": np.array(names)}


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shifts (positioning varies in radiographs) and exposure changes."""
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    scale = 1 + 0.1 * (torch.rand(len(x), 1, 1, 1, generator=generator) - 0.5)
    return (x * scale.to(x.device)).clamp(-1, 1)


def evaluator_loss(model: CXRClassifier, batch: dict, generator: torch.Generator, pos_weight: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """Weighted multi-label BCE of one augmented batch on ``device`` (augmentation draws stay on the CPU),
    augmented at the side the network sees."""
    logits = model.head(model.body(_augment(model.inputs(batch["pixel_values"].to(device)), generator)))
    return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(device), pos_weight=pos_weight.to(device))


def classifier_step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
                    batch: dict, generator: torch.Generator, pos_weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One optimizer step on one batch (``evaluator_loss``), as the evaluator and every utility arm take it."""
    loss = evaluator_loss(model, batch, generator, pos_weight, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return loss


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """BCE positive weights from a training set's labels (n, classes): sqrt of negatives/positives, the class
    prevalence clamped to [0.02, 0.98], which softens class imbalance without overshooting."""
    positives = labels.float().mean(0).clamp(0.02, 0.98)
    return ((1 - positives) / positives).sqrt()


def train_evaluator(prepared_dir: str | Path, config: EvaluatorConfig, seed: int, out_dir: str | Path,
                    metrics_path: str | Path | None = None, device: torch.device = torch.device("cpu")) -> dict:
    torch.manual_seed(seed)
    train = PreparedImages(prepared_dir, "train", channels=1)
    test = PreparedImages(prepared_dir, "test", channels=1)
    if len(train) == 0:
        raise DataError(f"{prepared_dir}: no train images to train the evaluator on; check the filter split")
    # A split smaller than one batch trains on batches of the whole split (drop_last would yield none).
    batch_size = min(config.batch_size, len(train))
    spec = ClassifierSpec(train.classes, config.width, config.feature_dim, train.image_size, config.max_image_size)
    model = CXRClassifier(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * (len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    pos_weight = class_weights(torch.from_numpy(train.labels))
    started = time.perf_counter()
    model.train()
    progress = tqdm(total=steps, desc="evaluator", unit="step")
    step = 0
    while step < steps:
        # Streamed one row group at a time, so memory does not grow with the split (nih-512: 38k x 512px).
        order = train.row_group_order(generator)
        for batch in DataLoader(train, batch_size=batch_size, sampler=order, drop_last=True,
                                num_workers=decode_workers(device), pin_memory=device.type == "cuda"):
            if step >= steps:
                break
            loss = classifier_step(model, optimizer, schedule, batch, generator, pos_weight, device)
            step += 1
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    model.eval()
    predicted = embed_and_predict(model, test, config.batch_size)  # no gradients: less memory than a training batch
    aurocs = per_label_auroc(predicted["labels"], predicted["probabilities"], list(spec.classes)) \
        if len(test) else {name: None for name in spec.classes}
    metrics = {"test_auroc": aurocs, "test_macro_auroc": macro_auroc(aurocs), "train_images": len(train),
               "test_images": len(test), "seconds": round(time.perf_counter() - started, 1),
               "backbone": "cxr_diffusion CXRClassifier (trained in-pipeline on the real train split)"}
    save_classifier(model.cpu(), Path(out_dir), metrics)
    if metrics_path is not None:
        write_json(metrics_path, {**metrics, "device": describe_device(device)})
    return metrics

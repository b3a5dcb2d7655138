"""Inception-v3 feature extractors for FID, loaded from safetensors (no pickle, no torchvision).

Two flavours of the same network, because the field uses two:

- ``fid``: the TensorFlow "2015-12-05" Inception graph that every standard FID implementation ports
  (pytorch-fid's ``pt_inception-2015-12-05``, torch-fidelity, torchmetrics). It differs from torchvision's
  ImageNet model in three places: average pools exclude padding (Mixed_5*, Mixed_6*, Mixed_7b), the last
  block's pool branch max-pools (Mixed_7c), and the classifier has 1008 outputs. Inputs are uint8 images,
  resized to 299x299 the way TensorFlow 1.x did it and scaled by (x - 128) / 128, as torch-fidelity does,
  so that features match torchmetrics' ``FrechetInceptionDistance(feature=2048)``.
- ``torchvision``: torchvision's ``inception_v3`` ImageNet weights (1000 classes), used for the
  reference-compatible FID the reference work reported (1000-class logits of images normalised with
  mean = std = 0.5). ``transform_input`` reproduces torchvision's default for pretrained weights.

Layer names follow torchvision's, so both published checkpoints load after a one-time conversion to
safetensors (``inception_conversion``, ``cxr-diffusion convert-weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cxr_diffusion.evaluation.weights import check_weights_header, load_safetensors_into

Flavour = Literal["fid", "torchvision"]
Output = Literal["pool", "logits"]

INPUT_SIZE = 299
# torchvision's transform_input: undo ImageNet normalisation and apply the (x - 0.5) / 0.5 the weights expect.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3 as in the TF graph), ReLU. Named ``conv``/``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_3x3(x: torch.Tensor, kind: Literal["avg", "avg_no_pad", "max"]) -> torch.Tensor:
    """The stride-1 3x3 pool in front of each block's pool branch."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=(kind == "avg"))


class BlockA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches (Mixed_5b..5d)."""

    def __init__(self, in_channels: int, pool_features: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBNReLU(in_channels, 64, 1)
        self.branch5x5_1 = ConvBNReLU(in_channels, 48, 1)
        self.branch5x5_2 = ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = ConvBNReLU(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool_3x3(x, self.pool)),
        ], 1)


class ReductionB(nn.Module):
    """35 -> 17 grid reduction (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBNReLU(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int, pool: str):
        super().__init__()
        c = channels_7x7
        self.pool = pool
        self.branch1x1 = ConvBNReLU(in_channels, 192, 1)
        self.branch7x7_1 = ConvBNReLU(in_channels, c, 1)
        self.branch7x7_2 = ConvBNReLU(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBNReLU(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBNReLU(in_channels, c, 1)
        self.branch7x7dbl_2 = ConvBNReLU(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBNReLU(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBNReLU(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBNReLU(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBNReLU(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_pool_3x3(x, self.pool)),
        ], 1)


class ReductionD(nn.Module):
    """17 -> 8 grid reduction (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(in_channels, 192, 1)
        self.branch3x3_2 = ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (Mixed_7b, 7c)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBNReLU(in_channels, 320, 1)
        self.branch3x3_1 = ConvBNReLU(in_channels, 384, 1)
        self.branch3x3_2a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBNReLU(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBNReLU(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(single), self.branch3x3_2b(single)], 1),
            torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1),
            self.branch_pool(_pool_3x3(x, self.pool)),
        ], 1)


def resize_like_tensorflow1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with TF 1.x ``resize_bilinear(align_corners=False)`` sampling: source = target * in/out.

    Unlike ``F.interpolate`` there is no half-pixel offset; this is the resize the original FID code ran
    inside the TF graph, and the one torch-fidelity reimplements. ``images`` is float (n, c, h, w).
    """
    def weights(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.arange(size, dtype=torch.float64) * (in_size / size)
        low = source.floor().long().clamp(max=in_size - 1)
        high = (low + 1).clamp(max=in_size - 1)
        return low, high, (source - low).to(images.dtype)

    (_, _, height, width) = images.shape
    top, bottom, dy = weights(height)
    left, right, dx = weights(width)
    dy, dx = dy.to(images.device), dx.to(images.device)
    rows = images[:, :, top] + (images[:, :, bottom] - images[:, :, top]) * dy[:, None]
    return rows[..., left] + (rows[..., right] - rows[..., left]) * dx


@dataclass(frozen=True)
class InceptionSpec:
    flavour: Flavour
    output: Output
    transform_input: bool = False  # torchvision flavour only

    @property
    def num_classes(self) -> int:
        return 1008 if self.flavour == "fid" else 1000


class InceptionV3(nn.Module):
    """Inception-v3 that maps uint8 images (n, 1 or 3, h, w) to pool features (2048) or class logits.

    Grayscale inputs are replicated to three channels. The module is a torchmetrics-compatible feature
    extractor: it exposes ``num_features`` and takes the uint8 batches ``FrechetInceptionDistance`` passes.
    """

    def __init__(self, spec: InceptionSpec):
        super().__init__()
        self.spec = spec
        fid = spec.flavour == "fid"
        pool = "avg_no_pad" if fid else "avg"
        self.Conv2d_1a_3x3 = ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBNReLU(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBNReLU(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32, pool)
        self.Mixed_5c = BlockA(256, 64, pool)
        self.Mixed_5d = BlockA(288, 64, pool)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = BlockC(768, 128, pool)
        self.Mixed_6c = BlockC(768, 160, pool)
        self.Mixed_6d = BlockC(768, 160, pool)
        self.Mixed_6e = BlockC(768, 192, pool)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = BlockE(1280, pool)
        self.Mixed_7c = BlockE(2048, "max" if fid else "avg")
        self.fc = nn.Linear(2048, spec.num_classes)
        self.num_features = 2048 if spec.output == "pool" else spec.num_classes

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (n, c, h, w) -> the network's input range at 299x299."""
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionV3 expects uint8 images in [0, 255], got {images.dtype}")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"InceptionV3 expects (n, 1 or 3, h, w) images, got shape {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype).expand(-1, 3, -1, -1)
        if self.spec.flavour == "fid":
            return (resize_like_tensorflow1(x, INPUT_SIZE) - 128.0) / 128.0
        # Reference-compatible: torchvision-style bilinear resize, then Normalize(mean=0.5, std=0.5).
        x = F.interpolate(x / 255.0, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - 0.5) / 0.5
        if self.spec.transform_input:
            mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
            std = torch.tensor(_IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        return x

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input -> 2048-d global-average-pooled features (FID's 'pool3')."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool_features(self.preprocess(images))
        return features if self.spec.output == "pool" else self.fc(features)


def check_classes(rows: int | None, spec: InceptionSpec, source: Path) -> None:
    """A clearer error than a shape mismatch for the common mistake: the other flavour's weights."""
    if rows is not None and rows != spec.num_classes:
        raise ValueError(f"{source}: classifier has {rows} classes but flavour '{spec.flavour}' needs "
                         f"{spec.num_classes}; FID-Inception weights (pt_inception-2015-12-05) have 1008, "
                         "torchvision's inception_v3 has 1000")


def load_inception(weights: str | Path, spec: InceptionSpec, device: torch.device) -> InceptionV3:
    """Build the network for ``spec`` and load a safetensors state dict with torchvision layer names.

    torchvision's auxiliary classifier (``AuxLogits.*``) is ignored; any other missing or unexpected key is
    an error naming the file, so a wrong checkpoint cannot load silently.
    """
    from safetensors import safe_open

    path = Path(weights)
    what = f"Inception-v3 ({spec.flavour} flavour)"
    if path.is_file():
        check_weights_header(path, what)  # safe_open maps what the header declares
        with safe_open(str(path), "pt") as handle:
            if "fc.weight" in handle.keys():
                check_classes(handle.get_slice("fc.weight").get_shape()[0], spec, path)
    model = load_safetensors_into(InceptionV3(spec), path, what,
                                  "see docs/evaluation.md, 'Standard and reference-compatible FID' for how to get and convert them",
                                  ignored_prefixes=("AuxLogits.",))
    return model.to(device)  # type: ignore[return-value]

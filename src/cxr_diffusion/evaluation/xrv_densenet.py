"""torchxrayvision's DenseNet-121 as an optional, independent evaluator (our definition, safetensors weights).

A CXR classifier pretrained on real radiographs (e.g. ``densenet121-res224-all`` or ``-nih``) is a second
judge next to the in-pipeline evaluator: a domain Frechet distance in its 1024-d features and the AUROC of
its pathology outputs against the requested labels. Inputs follow torchxrayvision's conventions: one
channel scaled to [-1024, 1024], resized to 224x224 (bilinear, antialiased, as its ``fix_resolution``).
Layer names match torchxrayvision's, so its ``state_dict()`` saved as safetensors loads here.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxr_diffusion.evaluation.weights import load_safetensors_into

INPUT_SIZE = 224
# torchxrayvision's output order for its 18-output DenseNets (datasets.default_pathologies).
PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
    "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
    "Lung Opacity", "Enlarged Cardiomediastinum",
)
HOW_TO_GET = ("save torchxrayvision's weights once on a machine with torchxrayvision installed: "
              "`python -c \"import torchxrayvision as xrv; from safetensors.torch import save_file; "
              "m = xrv.models.DenseNet(weights='densenet121-res224-all'); "
              "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'xrv-densenet121.safetensors')\"`")


class _DenseLayer(nn.Sequential):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv; its output is concatenated to its input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: int):
        super().__init__(OrderedDict([
            ("norm1", nn.BatchNorm2d(in_channels)), ("relu1", nn.ReLU()),
            ("conv1", nn.Conv2d(in_channels, bottleneck * growth_rate, 1, bias=False)),
            ("norm2", nn.BatchNorm2d(bottleneck * growth_rate)), ("relu2", nn.ReLU()),
            ("conv2", nn.Conv2d(bottleneck * growth_rate, growth_rate, 3, padding=1, bias=False)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], 1)


def _transition(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("norm", nn.BatchNorm2d(in_channels)), ("relu", nn.ReLU()),
        ("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False)), ("pool", nn.AvgPool2d(2, stride=2)),
    ]))


class XRVDenseNet121(nn.Module):
    """DenseNet-121 (growth 32, blocks 6/12/24/16, one input channel) with an 18-pathology linear head."""

    num_features = 1024

    def __init__(self, growth_rate: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16), stem: int = 64,
                 bottleneck: int = 4, num_classes: int = len(PATHOLOGIES)):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict([
            ("conv0", nn.Conv2d(1, stem, 7, stride=2, padding=3, bias=False)), ("norm0", nn.BatchNorm2d(stem)),
            ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
        ])
        channels = stem
        for index, count in enumerate(blocks, start=1):
            block = nn.Sequential(OrderedDict(
                (f"denselayer{i + 1}", _DenseLayer(channels + i * growth_rate, growth_rate, bottleneck))
                for i in range(count)))
            layers[f"denseblock{index}"] = block
            channels += count * growth_rate
            if index < len(blocks):
                layers[f"transition{index}"] = _transition(channels, channels // 2)
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(channels, num_classes)

    @staticmethod
    def preprocess(pixel_values: torch.Tensor) -> torch.Tensor:
        """Our [-1, 1] images (n, 1 or 3, h, w) -> torchxrayvision's input: gray, [-1024, 1024], 224x224."""
        x = pixel_values.mean(1, keepdim=True) * 1024.0
        if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
        return x

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input -> 1024-d features (ReLU after the last BN, global average pool)."""
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features (n, 1024), pathology logits (n, 18))."""
        features = self.pooled_features(self.preprocess(pixel_values))
        return features, self.classifier(features)


def load_xrv_densenet(weights: str | Path, device: torch.device) -> XRVDenseNet121:
    # op_threshs (per-pathology operating points) only rescale outputs monotonically; AUROC does not need them.
    model = load_safetensors_into(XRVDenseNet121(), weights, "torchxrayvision DenseNet-121", HOW_TO_GET,
                                  ignored_prefixes=("op_threshs",))
    return model.to(device)  # type: ignore[return-value]


def class_scores(logits: torch.Tensor, class_members: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """One score per output class that torchxrayvision covers: the max logit over its NIH labels.

    Classes with no covered label (e.g. 'No Finding') are left out rather than guessed.
    """
    scores = {}
    for name, members in class_members.items():
        columns = [PATHOLOGIES.index(label) for label in members if label in PATHOLOGIES]
        if columns:
            scores[name] = logits[:, columns].max(1).values
    return scores

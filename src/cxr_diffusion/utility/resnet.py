"""ResNet-50 (He et al. 2016, bottleneck v1.5: the stride on the 3x3 conv) for grayscale chest X-rays, randomly
initialised: the standard network of train-on-synthetic studies (CheXGenBench), for the full-scale profile.

Defined here rather than taken from torchvision, which would pull a second torch build; its layout is
torchvision's (stem 7x7/2 + max-pool, stages of 3, 4, 6, 3 bottlenecks), with one input channel. At
``width`` 64 it is the standard ResNet-50 (2048 features, 23.5M parameters with 14 classes); smaller
widths keep the depth for CPU tests. Its interface is the in-pipeline classifier's (``inputs``,
``body``, ``head``, ``features``), so every arm trains it with the same loss and steps.
"""

from __future__ import annotations

from torch import nn

from cxr_diffusion.evaluation.evaluator import ClassifierSpec, CXRClassifier

STAGE_BLOCKS = (3, 4, 6, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, inputs: int, width: int, stride: int):
        super().__init__()
        outputs = width * EXPANSION
        self.residual = nn.Sequential(
            nn.Conv2d(inputs, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
        nn.init.zeros_(self.residual[-1].weight)  # each block starts as the identity: stable from scratch
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet50Classifier(nn.Module):
    """Grayscale in [-1, 1] -> multi-label logits, with ``spec.feature_dim`` = 32 x ``spec.width`` features."""

    gray = staticmethod(CXRClassifier.gray)
    inputs = CXRClassifier.inputs      # grayscale, area-averaged down to spec.network_size
    features = CXRClassifier.features
    forward = CXRClassifier.forward

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        if spec.feature_dim != 8 * spec.width * EXPANSION:
            raise ValueError(f"a ResNet-50 of width {spec.width} has {8 * spec.width * EXPANSION} features, "
                             f"not {spec.feature_dim}")
        self.spec = spec
        layers: list[nn.Module] = [nn.Conv2d(1, spec.width, 7, stride=2, padding=3, bias=False),
                                   nn.BatchNorm2d(spec.width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1)]
        channels = spec.width
        for stage, blocks in enumerate(STAGE_BLOCKS):
            width = spec.width * 2 ** stage
            for block in range(blocks):
                layers.append(Bottleneck(channels, width, stride=2 if block == 0 and stage > 0 else 1))
                channels = width * EXPANSION
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, len(spec.classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

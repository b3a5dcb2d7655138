"""Deterministic, well-scaled random weights (Inception-v3, DenseNet-121), identical on every platform (numpy PCG64).

Shared by ``tests/test_inception.py``, ``tests/test_xrv_densenet.py`` and ``tests/fixtures/make_pretrained_oracle.py``, which records what torchvision,
torch-fidelity and torchxrayvision compute with these same weights; real weights cannot be shipped or downloaded here.
"""

from __future__ import annotations

import numpy as np
import torch


def seeded_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """One float64 tensor per state-dict entry of ``model`` (He-scaled convs, BN statistics near identity),
    drawn in sorted key order."""
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(model.state_dict().items()):
        shape = tuple(tensor.shape)
        if key.endswith("num_batches_tracked"):
            continue
        if len(shape) == 4:  # convolutions: He-scaled
            values = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        elif key.endswith("running_var"):
            values = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("weight") and len(shape) == 1:  # batch-norm scale
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        elif key.endswith("weight"):  # linear head
            values = rng.standard_normal(shape) * 0.02
        else:  # biases, running means
            values = 0.1 * rng.standard_normal(shape)
        state[key] = torch.from_numpy(np.asarray(values, dtype=np.float64))
    return state


def oracle_images(seed: int = 1) -> torch.Tensor:
    """Two non-square uint8 RGB images with structure (smooth gradients plus noise), (2, 3, 40, 48)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:48]
    base = np.stack([np.sin(x / 5.0 + c) * np.cos(y / 7.0 - c) for c in range(3)])
    images = [np.clip(127.5 + 90 * base * s + rng.normal(0, 20, base.shape), 0, 255) for s in (1.0, -0.6)]
    return torch.from_numpy(np.stack(images).round().astype(np.uint8))

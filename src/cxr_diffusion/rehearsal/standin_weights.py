"""Random-weight stand-ins of the three evaluation networks, made through the same steps as the real files.

- FID-Inception (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) and torchvision's Inception-v3
  (``inception_v3_google-0cc3c7bd.pth``) are published as plain PyTorch state dicts. The stand-in writes
  such a ``.pth`` (torchvision layer names; the torchvision one with its auxiliary classifier and batch-norm
  counters, which the project drops) and converts it with ``convert_inception_weights``, the code behind
  `cxr-diffusion convert-weights` and `fetch`, so a rehearsal runs the conversion as well.
- torchxrayvision's DenseNet-121 is published only pickled; the project places it as the safetensors file of
  its ``state_dict()`` (``catalog.hand_command``). The stand-in writes that file: the DenseNet's tensors,
  its batch-norm counters and the 18 ``op_threshs``.

Weights are drawn from a seeded generator: He-scaled convolutions, batch norms at identity, a small linear
head, so features stay finite and of unit scale through the depth of either network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cxr_diffusion.assets.catalog import FID_INCEPTION, TORCHVISION_INCEPTION
from cxr_diffusion.evaluation.inception import ConvBNReLU, InceptionSpec, InceptionV3, load_inception
from cxr_diffusion.evaluation.inception_conversion import convert_inception_weights
from cxr_diffusion.evaluation.xrv_densenet import PATHOLOGIES, XRVDenseNet121, load_xrv_densenet
from cxr_diffusion.assets.standin_marker import METADATA_KEY

PUBLISHED = {"fid": FID_INCEPTION, "torchvision": TORCHVISION_INCEPTION}


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A seeded state dict for ``model``'s keys and shapes (drawn in sorted key order)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in sorted(model.state_dict().items()):
        shape = tuple(tensor.shape)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif len(shape) == 4:  # convolutions, He-scaled for the ReLU after each
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("running_var") or (key.endswith("weight") and len(shape) == 1):
            state[key] = torch.ones(shape)
        elif key.endswith("weight"):  # a linear head
            state[key] = torch.randn(shape, generator=generator) * 0.01
        else:  # biases and running means
            state[key] = torch.zeros(shape)
    return state


def _torchvision_aux_logits(seed: int) -> dict[str, torch.Tensor]:
    """torchvision's ``InceptionAux`` head of ``inception_v3`` (in its published file; never used here)."""
    head = torch.nn.Module()
    head.conv0 = ConvBNReLU(768, 128, 1)
    head.conv1 = ConvBNReLU(128, 768, 5)
    head.fc = torch.nn.Linear(768, 1000)
    return {f"AuxLogits.{key}": value for key, value in random_state(head, seed + 1).items()}


def published_inception_state(flavour: str, seed: int) -> dict[str, torch.Tensor]:
    """The state dict of a published Inception checkpoint of ``flavour``, with random values."""
    state = random_state(InceptionV3(InceptionSpec(flavour, "pool")), seed)  # type: ignore[arg-type]
    if flavour == "torchvision":
        return {**state, **_torchvision_aux_logits(seed)}
    return {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}


def _check_images() -> torch.Tensor:
    """One seeded noise image (1, 3, 64, 64) with values 0..255: a constant one would give all-zero features."""
    return torch.randint(0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(0)).float()


def _add_metadata(path: Path, label: dict) -> None:
    """Re-save a safetensors file with the stand-in label added to its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**metadata, METADATA_KEY: json.dumps(label)})


def write_inception(target: Path, flavour: str, seed: int, workdir: Path, label: dict) -> dict:
    """Write the published ``.pth`` of ``flavour`` in ``workdir``, convert it to ``target`` as `convert-weights`
    does, label it, and load it with ``load_inception``."""
    source = PUBLISHED[flavour]
    published = workdir / source.filename
    torch.save(published_inception_state(flavour, seed), published)
    converted = convert_inception_weights(published, target, flavour)  # type: ignore[arg-type]
    published.unlink()
    _add_metadata(target, label)
    spec = InceptionSpec(flavour, "pool")  # type: ignore[arg-type]
    model = load_inception(target, spec, torch.device("cpu"))
    with torch.no_grad():
        features = model(_check_images().to(torch.uint8))
    if features.shape != (1, 2048) or not torch.isfinite(features).all() or features.std() == 0:
        raise ValueError(f"{target}: the stand-in Inception gives features of shape {tuple(features.shape)}")
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "architecture": {"network": "Inception-v3", "flavour": flavour, "classes": spec.num_classes},
            "published_as": source.filename, "converted_tensors": converted["tensors"],
            "check": {"pool_features": list(features.shape[1:])}}


def write_xrv_densenet(target: Path, seed: int, label: dict) -> dict:
    """The safetensors file of a torchxrayvision DenseNet-121 ``state_dict()`` (as ``catalog.hand_command``
    writes it), random weights; loaded back with ``load_xrv_densenet``."""
    from safetensors.torch import save_file

    model = XRVDenseNet121()
    state = random_state(model, seed)
    state["op_threshs"] = torch.rand(len(PATHOLOGIES), generator=torch.Generator().manual_seed(seed + 2)) * 0.5
    save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata={METADATA_KEY: json.dumps(label)})
    loaded = load_xrv_densenet(target, torch.device("cpu"))
    with torch.no_grad():
        features, logits = loaded(_check_images()[:, :1] / 127.5 - 1.0)
    if features.shape != (1, 1024) or logits.shape != (1, len(PATHOLOGIES)) or not torch.isfinite(logits).all() \
            or features.std() == 0:
        raise ValueError(f"{target}: the stand-in DenseNet gives {tuple(features.shape)} features and "
                         f"{tuple(logits.shape)} logits")
    return {"parameters": sum(p.numel() for p in loaded.parameters()),
            "architecture": {"network": "DenseNet-121", "growth_rate": 32, "blocks": [6, 12, 24, 16],
                             "in_channels": 1, "classes": len(PATHOLOGIES)},
            "check": {"features": list(features.shape[1:]), "logits": list(logits.shape[1:])}}

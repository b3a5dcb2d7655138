"""Third-party evaluation networks: load their weights strictly from safetensors, run them in full fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from cxr_diffusion.errors import UserError
from cxr_diffusion.safetensors_header import checked_header

# The largest third-party network read here: Inception-v3 is about 100 MB, DenseNet-121 about 30 MB.
MAX_WEIGHTS_BYTES = 1 << 30


class WeightsFileError(UserError, ValueError):
    """Third-party weights that are not the network they are named for (the message names the file)."""


def check_weights_header(path: Path, what: str) -> None:
    """``path`` is a whole safetensors file of at most ``MAX_WEIGHTS_BYTES`` of tensors, from its header alone:
    ``load_file`` allocates whatever a header declares (a sparse file of a few KB can declare 32 GiB)."""
    header, problem = checked_header(path)
    if problem:
        raise WeightsFileError(f"{path}: not a readable safetensors file ({problem}); download it again (it should "
                               f"hold {what})")
    declared = path.stat().st_size - header.data_start
    if declared > MAX_WEIGHTS_BYTES:
        raise WeightsFileError(f"{path}: declares {declared / 2**30:,.1f} GiB of tensors, more than the "
                               f"{MAX_WEIGHTS_BYTES >> 30} GiB of any network read here; is it {what}?")


def checked_state(state: dict[str, torch.Tensor], model: nn.Module, source: Path, what: str,
                  ignored_prefixes: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``state`` minus ignored keys, after checking it has exactly ``model``'s keys and shapes.

    Batch-norm counters and keys starting with ``ignored_prefixes`` (heads we never use) are dropped; any
    other difference is an error naming ``source``, so a wrong checkpoint never loads silently.
    """
    prefixes = tuple(ignored_prefixes)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith(prefixes)}
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsFileError(f"{source}: not a {what} state dict ({len(missing)} missing keys, e.g. {missing[:3]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(shape)}" for k, shape in expected.items()
             if state[k].shape != shape]
    if wrong:
        raise WeightsFileError(f"{source}: {len(wrong)} tensors have the wrong shape for {what}, e.g. {wrong[:2]}")
    not_float = [f"{k} ({state[k].dtype})" for k in expected if not state[k].is_floating_point()]
    if not_float:  # int8, bool or complex values would be cast into the network silently
        raise WeightsFileError(f"{source}: {len(not_float)} tensors are not floating point for {what}, e.g. {not_float[:2]}")
    not_finite = next((k for k in expected if not torch.isfinite(state[k]).all()), None)
    if not_finite is not None:  # NaN features crash the FID's eigenvalue routine (MKL) or read as a NaN distance
        count = int((~torch.isfinite(state[not_finite])).sum())
        raise WeightsFileError(f"{source}: tensor '{not_finite}' has {count} NaN or infinite values; a published "
                               f"checkpoint has none: download it again")
    # A pretrained network has no all-zero convolution: such a file was emptied, not trained.
    zero = [k for k in expected if state[k].dim() == 4 and not state[k].any()]
    if zero:
        raise WeightsFileError(f"{source}: {len(zero)} convolution weights are all zeros for {what}, e.g. {zero[:2]}; "
                         f"not a trained checkpoint")
    return state


def load_safetensors_into(model: nn.Module, path: str | Path, what: str, how_to_get: str,
                          ignored_prefixes: Iterable[str] = ()) -> nn.Module:
    """Load ``path`` (safetensors) into ``model`` after ``checked_state``; eval mode, no gradients."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}; {how_to_get}, or set the param to null to "
                                "skip this metric")
    check_weights_header(path, what)
    model.load_state_dict(checked_state(load_file(str(path)), model, path, what, ignored_prefixes), strict=False)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Disallow TF32 in cuDNN convolutions and CUDA matmuls for the block (PyTorch allows it for convolutions
    by default). Pretrained-feature metrics then do not depend on the GPU generation: on an H200, TF32 moved a
    standard FID by 4.5e-4 relative (benchmarks/results/pretrained_evaluator_h200_tf32_allowed.txt). No effect on CPUs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

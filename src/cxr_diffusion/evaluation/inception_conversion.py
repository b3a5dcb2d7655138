"""Converting a published Inception-v3 checkpoint once into the safetensors file the evaluation loads.

A PyTorch ``.pth`` is read with ``torch.load(weights_only=True)``, which accepts tensors and plain containers
and refuses anything that would run code; the weights are checked against the network of the chosen flavour
before the float32 safetensors result is written. A stand-in's label goes with its weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxr_diffusion.assets.standin_marker import METADATA_KEY as STANDIN_KEY
from cxr_diffusion.evaluation.inception import Flavour, InceptionSpec, InceptionV3, check_classes
from cxr_diffusion.evaluation.weights import checked_state


def _read_checkpoint(source: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a PyTorch .pth/.pt read with ``weights_only=True``.

    The weights-only loader accepts tensors and plain containers only and refuses anything that would run
    code, so a published checkpoint can be converted once without trusting it; the project itself only
    ever reads the safetensors result.
    """
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        from cxr_diffusion.evaluation.weights import check_weights_header

        check_weights_header(source, "Inception-v3 weights")
        return load_file(str(source))
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # the weights-only unpickler raises several types; all mean "not plain weights"
        raise ValueError(f"{source}: not a plain PyTorch state dict ({type(error).__name__}: {error}); "
                         "only tensor checkpoints can be converted") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(loaded).__name__}")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _standin_label(source: Path) -> str | None:
    """The stand-in label in a safetensors source's metadata, as written there; None for any other file."""
    if source.suffix != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(source), "pt") as handle:
            return (handle.metadata() or {}).get(STANDIN_KEY)
    except (SafetensorError, OSError):
        return None


def convert_inception_weights(source: str | Path, target: str | Path, flavour: Flavour) -> dict:
    """Check a published Inception-v3 checkpoint against ``flavour`` and write it as float32 safetensors.

    Returns the source and target sha256 and the tensor count. The target is written atomically and only
    after the weights loaded into the network, so a wrong file never leaves a usable-looking output.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from cxr_diffusion.io import atomic_path, sha256_file

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    spec = InceptionSpec(flavour, "pool")
    try:
        state = _read_checkpoint(source)
    except SafetensorError as error:  # a truncated or foreign .safetensors file
        raise ValueError(f"{source}: not a readable safetensors file ({error}); download it again") from None
    check_classes(state["fc.weight"].shape[0] if "fc.weight" in state else None, spec, source)
    state = checked_state(state, InceptionV3(spec), source, f"Inception-v3 ({flavour} flavour)",
                          ignored_prefixes=("AuxLogits.",))
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    source_sha256 = sha256_file(source)
    metadata = {"source_sha256": source_sha256, "flavour": flavour}
    label = _standin_label(source)
    if label is not None:  # a stand-in converted stays a stand-in: the label goes with the weights
        metadata[STANDIN_KEY] = label
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return {"source_sha256": source_sha256, "target_sha256": sha256_file(target), "tensors": len(state)}

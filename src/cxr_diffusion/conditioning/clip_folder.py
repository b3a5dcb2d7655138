"""Whether a CLIP folder's config and weights agree, checked before a tower is built.

transformers builds whatever sizes ``config.json`` declares (an ``intermediate_size`` of 10**9 asks for 64 GB),
fills every tensor the weights lack at random (a config saying two layers over weights of one gives a half-random
encoder, silently) and casts integer tensors to float. So the sizes the tower reads are bounded well above
CLIP ViT-L/14's (in the comments), the tower is built on the meta device to list its tensors, and the header of
``model.safetensors`` (or of each shard its index names) must hold each of them, with its shape, in a float dtype.
A full CLIPModel checkpoint holds both towers: the other tower's tensors are allowed.
"""

from __future__ import annotations

from pathlib import Path

from cxr_diffusion.io import JsonFileError, lies_inside, read_json
from cxr_diffusion.safe_text import shown_value, visible_text
from cxr_diffusion.safetensors_header import checked_header
from cxr_diffusion.whole_number import is_whole_number

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
TOWER_PREFIXES = ("", "text_model.", "vision_model.")
# key: (lowest, highest); CLIP ViT-L/14's values in the comments
SIZE_LIMITS = {
    "hidden_size": (1, 8192),                # 768 (text), 1024 (vision)
    "intermediate_size": (1, 32768),         # 3072, 4096
    "num_hidden_layers": (1, 96),            # 12, 24
    "num_attention_heads": (1, 128),         # 12, 16
    "projection_dim": (1, 8192),             # 768
    "max_position_embeddings": (1, 4096),    # 77 (text)
    "vocab_size": (1, 1_000_000),            # 49408 (text)
    "image_size": (1, 4096),                 # 224 (vision)
    "patch_size": (1, 1024),                 # 14 (vision)
    "num_channels": (1, 16),                 # 3 (vision)
}
MAX_PARAMETERS = 4 * 10 ** 9  # CLIP ViT-L/14 has 428 M; the largest open CLIPs about 2.5 G


class ClipFolderError(ValueError):
    """Why a folder's CLIP tower cannot be loaded as it says, naming the file and the key or tensor."""


def check_clip_tower(folder: Path, model_class) -> None:
    """Raise ``ClipFolderError`` unless ``folder``'s config describes a tower of bounded size whose every tensor
    its weights hold, with its shape, in a float dtype."""
    import torch
    from huggingface_hub.errors import StrictDataclassError  # transformers' own config checks raise it

    try:
        config = model_class.config_class.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, StrictDataclassError) as error:
        raise ClipFolderError(f"config.json: not a CLIP config ({type(error).__name__}: "
                              f"{visible_text(' '.join(str(error).split()), 160)})") from None
    for key, (low, high) in SIZE_LIMITS.items():
        value = getattr(config, key, None)
        if value is not None and not is_whole_number(value, low, high):
            raise ClipFolderError(f"config.json: {key} is {shown_value(value)}, expected a whole number from {low} "
                                  f"to {high}")
    try:
        with torch.device("meta"):
            tower = model_class(config)
    except (ValueError, TypeError, StrictDataclassError) as error:  # sizes the layers cannot be built with
        raise ClipFolderError(f"config.json: not a CLIP tower transformers can build ({type(error).__name__}: "
                              f"{visible_text(' '.join(str(error).split()), 160)})") from None
    expected = {name: list(tensor.shape) for name, tensor in tower.state_dict().items()}
    parameters = sum(tensor.numel() for tensor in tower.state_dict().values())
    if parameters > MAX_PARAMETERS:
        raise ClipFolderError(f"config.json: describes a tower of {parameters:,} values, more than "
                              f"{MAX_PARAMETERS:,}")
    stored = _stored_tensors(folder)
    # A full CLIPModel checkpoint names a tower's tensors under its place in CLIPModel ("text_model.embeddings...");
    # transformers maps a tower that names them bare ("embeddings...") onto them as it loads: the prefix that
    # names most of them is the one it uses.
    prefix = max(TOWER_PREFIXES, key=lambda candidate: sum(candidate + name in stored for name in expected))
    stored = {name[len(prefix):]: entry for name, entry in stored.items() if name.startswith(prefix)}
    missing = [name for name in expected if name not in stored]
    if missing:  # transformers would fill them at random
        raise ClipFolderError(f"the weights lack {len(missing)} of the {len(expected)} tensors the config describes, "
                              f"e.g. {', '.join(missing[:3])}")
    for name, shape in expected.items():
        if stored[name]["shape"] != shape:
            raise ClipFolderError(f"tensor {name} has shape {stored[name]['shape']}, the config's tower has {shape}")
        if stored[name]["dtype"] not in FLOAT_DTYPES:
            raise ClipFolderError(f"tensor {name} is {stored[name]['dtype']}, not a float dtype")


def _stored_tensors(folder: Path) -> dict:
    """Tensor name -> header entry, from model.safetensors or from the shards its index names. A sharded folder's
    index must say where each tensor is: every tensor of a shard is mapped to that shard, and every mapped tensor
    is in the shard it is mapped to (a tensor in two shards, or mapped to one that lacks it, leaves which values
    load to the loader's order)."""
    weight_map = None
    if (folder / WEIGHTS).is_file():
        shards = [WEIGHTS]
    elif (folder / INDEX).is_file():
        try:
            index = read_json(folder / INDEX, "download the model again")
        except JsonFileError as error:
            raise ClipFolderError(f"{INDEX}: {error}") from None
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ClipFolderError(f"{INDEX}: no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
    else:
        raise ClipFolderError(f"no {WEIGHTS} (nor {INDEX}): this project reads safetensors weights only")
    stored: dict = {}
    for shard in shards:
        path = folder / shard
        if not lies_inside(path, folder) or not path.is_file():
            raise ClipFolderError(f"{shown_value(shard)}: not a file inside the folder")
        header, problem = checked_header(path)
        if problem:
            raise ClipFolderError(f"{shown_value(shard)}: not a readable safetensors file ({problem})")
        if weight_map is not None:
            _check_shard_mapped(shard, header.tensors, weight_map)
        stored.update(header.tensors)
    if weight_map is not None:
        unstored = [name for name in weight_map if name not in stored]
        if unstored:
            raise ClipFolderError(f"{INDEX}: maps {len(unstored)} tensors to shards that lack them, e.g. "
                                  f"{shown_value(unstored[0])} in {shown_value(weight_map[unstored[0]])}")
    return stored


def _check_shard_mapped(shard: str, tensors: dict, weight_map: dict) -> None:
    for name in tensors:
        mapped = weight_map.get(name)
        if mapped != shard:
            where = f"maps it to {shown_value(mapped)}" if mapped is not None else "does not list it"
            raise ClipFolderError(f"{shown_value(shard)}: holds tensor {shown_value(name)} but {INDEX} {where}")

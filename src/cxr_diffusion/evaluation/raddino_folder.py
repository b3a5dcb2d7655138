"""Whether a folder is a RadDINO checkpoint the evaluate stage can use: checked from its files, before a tensor is made.

``microsoft/rad-dino`` is three files: ``config.json`` (a DINOv2 ViT-B/14: hidden size 768, 12 layers of 12 heads,
14-px patches, 518-px images, MLP ratio 4), ``preprocessor_config.json`` (BitImageProcessor: bicubic resize of the
shortest edge to 518, centre crop 518, rescale by 1/255, normalise by its chest X-ray mean and std) and
``model.safetensors`` (fp32). transformers turns a bad value in either JSON into a traceback at feature time, builds
whatever size a config declares, initialises every tensor missing from the weights at random and casts integer
tensors to float. So each file here must be a regular file inside the folder (a FIFO would block the read, a link
could read any file on the machine), each setting a valid value within bounds well above the real model's, and the
weights' header must hold exactly the tensors the configured network has, with their shapes, in a float dtype.

The evaluate stage's loader and `fetch --record-present` both call ``check_raddino_folder``: a folder recorded as
present is one that evaluate can load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_diffusion.io import JsonFileError, lies_inside, read_json, require_regular_file
from cxr_diffusion.safe_text import shown_value
from cxr_diffusion.safetensors_header import SafetensorsHeaderError, read_safetensors_header
from cxr_diffusion.whole_number import is_whole_number

CONFIG, PROCESSOR, WEIGHTS = "config.json", "preprocessor_config.json", "model.safetensors"
RESIZE = 299  # CheXGenBench's loader: transforms.Resize((299, 299)): the square every image reaches the processor as

# Bounds, comfortably above microsoft/rad-dino's values (in the comments); each keeps a hostile file from making the
# stage build a network or an input of any size it declares.
MAX_JSON_BYTES = 1 << 20   # its configs are under 1 kB
MAX_SIDE = 4096            # image_size, resize and crop sides: 518
MAX_HIDDEN = 4096          # hidden_size: 768 (DINOv2's largest, ViT-g, has 1536)
MAX_LAYERS = 64            # num_hidden_layers: 12 (ViT-g: 40)
MAX_HEADS = 64             # num_attention_heads: 12
MAX_MLP_RATIO = 16         # mlp_ratio: 4
MAX_PATCHES = 74 * 74      # patches per image, of the model's inputs and of its position embeddings: 37 x 37
MAX_PARAMETERS = 10 ** 9   # 86.6 M (346 MB of fp32); ViT-g has 1.1 G
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
PIL_FILTERS = range(6)     # NEAREST, LANCZOS, BILINEAR, BICUBIC (rad-dino's 3), BOX, HAMMING
PROCESSOR_TYPES = ("BitImageProcessor", "BitImageProcessorPil", "BitImageProcessorFast")
SHOWN_TENSORS = 3          # tensors named in a message about the weights
# How the network runs and what it returns, whatever config.json says: the outputs evaluate reads (pooler_output),
# through the attention CheXGenBench's transformers uses by default (a "flash_attention_2" there would fail to load).
RUNTIME = {"attn_implementation": "sdpa", "return_dict": True, "output_hidden_states": False,
           "output_attentions": False, "torchscript": False}


class RadDinoFolderError(ValueError):
    """Why a folder is not a usable RadDINO checkpoint, naming the file (relative to the folder) and the key or
    tensor. Callers add which folder and what to do: the evaluate stage and `fetch` say it differently."""


@dataclass(frozen=True)
class RadDinoFolder:
    """A checked checkpoint: its folder, its network's transformers config, and the image processor's settings."""

    folder: Path
    config: Any          # transformers' Dinov2Config, made from config.json
    processor: dict      # BitImageProcessor keyword arguments, from preprocessor_config.json


def check_raddino_folder(folder: str | os.PathLike) -> RadDinoFolder:
    """``folder``'s checked settings; raise ``RadDinoFolderError`` unless it is a RadDINO checkpoint evaluate can
    load (see the module docstring). Reads the two JSON files and the weights' header only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RadDinoFolderError("not a folder")
    for name in (CONFIG, PROCESSOR, WEIGHTS):
        _require_file(folder, name)
    config = _checked_config(_read(folder, CONFIG))
    processor = _checked_processor(_read(folder, PROCESSOR), config.patch_size)
    _check_weights(folder / WEIGHTS, config)
    return RadDinoFolder(folder, config, processor)


def _require_file(folder: Path, name: str) -> None:
    path = folder / name
    if not os.path.lexists(path):
        pickled = sorted(entry.name for entry in folder.glob("*.bin")) if name == WEIGHTS else []
        also = f" (only {', '.join(pickled[:3])}: pickled weights, which this project never loads)" if pickled else ""
        raise RadDinoFolderError(f"{name} is missing{also}")
    if not lies_inside(path, folder):  # a link out of the folder (a cache snapshot's blobs/ count as inside)
        raise RadDinoFolderError(f"{name} links outside the folder (to {path.resolve()}); copy the file itself in")
    try:
        require_regular_file(path, RadDinoFolderError, "it must be the file itself")
    except FileNotFoundError:  # a dangling link
        raise RadDinoFolderError(f"{name} is a link to a missing file") from None
    except RadDinoFolderError:
        raise RadDinoFolderError(f"{name} is not a regular file (a folder, FIFO or device)") from None


def _read(folder: Path, name: str) -> dict:
    try:
        return read_json(folder / name, "it must be the checkpoint's own file", max_bytes=MAX_JSON_BYTES)
    except JsonFileError as error:  # its message starts with the full path: shorten it to the name
        raise RadDinoFolderError(str(error).replace(str(folder / name), name, 1)) from None


def _refuse(name: str, key: str, value: object, expected: str) -> RadDinoFolderError:
    return RadDinoFolderError(f"{name}: {key} is {shown_value(value)}, not {expected}")


def _whole(raw: dict, name: str, key: str, low: int, high: int) -> int:
    value = raw.get(key)
    if not is_whole_number(value, low, high):
        raise _refuse(name, key, value, f"a whole number in {low}..{high}")
    return value


def _number(raw: dict, name: str, key: str, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite JSON number in [low, high] ((low, high] with ``low_open``); a bool is not a number here."""
    value = raw.get(key)
    # An int is compared as it is: float() of one past 1e308 (JSON allows it) would raise OverflowError.
    number = isinstance(value, float) and math.isfinite(value) or isinstance(value, int) and not isinstance(value, bool)
    if not (number and (low < value if low_open else low <= value) and value <= high):
        raise _refuse(name, key, value, f"a number in {'(' if low_open else '['}{low:g}, {high:g}]")
    return float(value)


def _flag(raw: dict, name: str, key: str) -> bool:
    value = raw.get(key)
    if not isinstance(value, bool):
        raise _refuse(name, key, value, "true or false")
    return value


def _checked_config(raw: dict) -> Any:
    """config.json as transformers' ``Dinov2Config``, after every setting that shapes the network or its output is
    checked (a key it leaves out takes Dinov2Config's default, as transformers does, and is checked the same)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import Dinov2Config

    if raw.get("model_type") != "dinov2":
        raise _refuse(CONFIG, "model_type", raw.get("model_type"), "'dinov2' (microsoft/rad-dino is a DINOv2)")
    settings = {key: raw.get(key, getattr(Dinov2Config, key, None)) for key in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size", "image_size",
        "num_channels", "hidden_act", "layer_norm_eps", "layerscale_value", "qkv_bias", "use_swiglu_ffn",
        "use_mask_token", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
        "initializer_range")}
    hidden = _whole(settings, CONFIG, "hidden_size", 1, MAX_HIDDEN)
    _whole(settings, CONFIG, "num_hidden_layers", 1, MAX_LAYERS)
    heads = _whole(settings, CONFIG, "num_attention_heads", 1, MAX_HEADS)
    if hidden % heads:
        raise RadDinoFolderError(f"{CONFIG}: num_attention_heads {heads} does not divide hidden_size {hidden}")
    _whole(settings, CONFIG, "mlp_ratio", 1, MAX_MLP_RATIO)
    image_size = _whole(settings, CONFIG, "image_size", 1, MAX_SIDE)
    patch = _whole(settings, CONFIG, "patch_size", 1, image_size)
    if (image_size // patch) ** 2 > MAX_PATCHES:
        raise RadDinoFolderError(f"{CONFIG}: image_size {image_size} in {patch}-px patches makes "
                                 f"{(image_size // patch) ** 2:,} position embeddings, more than {MAX_PATCHES:,}")
    if not is_whole_number(settings["num_channels"], 3, 3):
        raise _refuse(CONFIG, "num_channels", settings["num_channels"], "3 (the processor gives RGB images)")
    if settings["hidden_act"] not in ACTIVATIONS:
        raise _refuse(CONFIG, "hidden_act", settings["hidden_act"], f"one of {', '.join(ACTIVATIONS)}")
    _number(settings, CONFIG, "layer_norm_eps", 0, 1, low_open=True)
    _number(settings, CONFIG, "layerscale_value", -1e6, 1e6)
    _number(settings, CONFIG, "initializer_range", 0, 1e6)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
        _number(settings, CONFIG, key, 0, 1)
    for key in ("qkv_bias", "use_swiglu_ffn", "use_mask_token"):
        _flag(settings, CONFIG, key)
    if raw.get("quantization_config") is not None:  # CheXGenBench's features come from the fp32 network
        raise RadDinoFolderError(f"{CONFIG}: quantization_config asks for a quantized network, which would change "
                                 f"the features CheXGenBench's distances compare; use microsoft/rad-dino's own "
                                 f"config.json (it has none)")
    # The other keys (architectures, out_features, ...) as transformers reads them, but not those of RUNTIME nor
    # a classifier head's labels: the backbone has no head, and `num_labels: 10**12` built a dict of that many.
    ignored = {"_attn_implementation", "num_labels", "id2label", "label2id"}
    try:
        return Dinov2Config(**{key: value for key, value in raw.items() if key not in ignored} | RUNTIME)
    except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise RadDinoFolderError(f"{CONFIG}: not a valid DINOv2 config ({' '.join(str(error).split())[:200]})") from None


def _sides(raw: dict, key: str, *forms: tuple[str, ...]) -> dict:
    """``raw[key]``: an object with exactly the keys of one of ``forms``, each a side in pixels (1..MAX_SIDE)."""
    value = raw.get(key)
    if not (isinstance(value, dict) and sorted(value) in [sorted(form) for form in forms]):
        shown = " or ".join("{" + ", ".join(f'"{name}": <pixels>' for name in form) + "}" for form in forms)
        raise _refuse(PROCESSOR, key, value, shown)
    for name, side in value.items():
        if not is_whole_number(side, 1, MAX_SIDE):
            raise _refuse(PROCESSOR, f"{key}.{name}", side, f"a whole number in 1..{MAX_SIDE}")
    return dict(value)


def _triple(raw: dict, key: str, low: float, high: float) -> list[float]:
    value = raw.get(key)
    if not (isinstance(value, list) and len(value) == 3):
        raise _refuse(PROCESSOR, key, value, "a list of 3 numbers (one per RGB channel)")
    return [_number({key: entry}, PROCESSOR, key, low, high, low_open=True) for entry in value]


def _checked_processor(raw: dict, patch: int) -> dict:
    """BitImageProcessor's keyword arguments from preprocessor_config.json, each setting it applies present and in
    range, and the image it gives the model (from CheXGenBench's 299x299 input) between 1 and MAX_PATCHES patches.
    Other keys are not read: the processor is made from these settings alone, never from classes the file names."""
    kind = raw.get("image_processor_type", PROCESSOR_TYPES[0])
    if kind not in PROCESSOR_TYPES:
        raise _refuse(PROCESSOR, "image_processor_type", kind, "BitImageProcessor (microsoft/rad-dino's)")
    settings: dict[str, Any] = {key: _flag(raw, PROCESSOR, key) for key in (
        "do_resize", "do_center_crop", "do_rescale", "do_normalize")}
    if "do_convert_rgb" in raw:
        settings["do_convert_rgb"] = _flag(raw, PROCESSOR, "do_convert_rgb")
    settings["size"] = _sides(raw, "size", ("shortest_edge",), ("height", "width"))
    settings["crop_size"] = _sides(raw, "crop_size", ("height", "width"))
    resample = raw.get("resample")
    if not (is_whole_number(resample) and resample in PIL_FILTERS):
        raise _refuse(PROCESSOR, "resample", resample, "a PIL filter number in 0..5 (rad-dino's: 3, bicubic)")
    settings["resample"] = resample
    # A factor of 0 (or a huge std) makes every image the same constant: distances of nothing.
    settings["rescale_factor"] = _number(raw, PROCESSOR, "rescale_factor", 0, 1, low_open=True)
    settings["image_mean"] = _triple(raw, "image_mean", -256, 256)
    settings["image_std"] = _triple(raw, "image_std", 0, 256)
    height = width = RESIZE
    if settings["do_resize"]:
        height, width = (settings["size"].get("shortest_edge") or settings["size"]["height"],
                         settings["size"].get("shortest_edge") or settings["size"]["width"])
    if settings["do_center_crop"]:
        height, width = settings["crop_size"]["height"], settings["crop_size"]["width"]
    patches = (height // patch) * (width // patch)
    if not 1 <= patches <= MAX_PATCHES:
        raise RadDinoFolderError(f"{PROCESSOR}: gives the model {height}x{width}-px images, {patches:,} patches of "
                                 f"{patch} px ({CONFIG}), not 1..{MAX_PATCHES:,}")
    return settings


def checkpoint_tensors(config: Any) -> dict:
    """Name -> (shape, number of values) of every tensor of the network ``config`` describes, named as its weights
    file names them; built on the meta device, so nothing is allocated."""
    import torch
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    state = model.state_dict()
    try:  # transformers 5 renames some tensors as it loads them (and back as it saves): the file has the saved names
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # a transformers without renaming: the file has the module's own names
        pass
    return {name: (list(tensor.shape), tensor.numel()) for name, tensor in state.items()}


def _check_weights(path: Path, config: Any) -> None:
    """The header of model.safetensors holds exactly the network's tensors, with their shapes, in a float dtype."""
    try:
        header = read_safetensors_header(path)
    except SafetensorsHeaderError as error:
        raise RadDinoFolderError(f"{WEIGHTS}: not a safetensors file ({error})") from None
    problem = header.problem(path.stat().st_size)
    if problem:
        raise RadDinoFolderError(f"{WEIGHTS}: {problem}: truncated or damaged")
    expected = checkpoint_tensors(config)
    parameters = sum(count for _, count in expected.values())
    if parameters > MAX_PARAMETERS:
        raise RadDinoFolderError(f"{CONFIG}: describes a network of {parameters:,} values, more than the "
                                 f"{MAX_PARAMETERS:,} a RadDINO is given here")
    stored = header.tensors
    missing = [name for name in expected if name not in stored]
    unused = sorted(name for name in stored if name not in expected)
    if missing or unused:  # transformers would fill a missing tensor at random, and drop an unused one
        parts = ([f"lacks {len(missing)} of the {len(expected)} tensors of the network {CONFIG} describes, e.g. "
                  f"{', '.join(missing[:SHOWN_TENSORS])}"] if missing else []) + \
                ([f"holds {len(unused)} tensor(s) that network has no place for, e.g. "
                  f"{shown_value(', '.join(unused[:SHOWN_TENSORS]), 160)}"] if unused else [])
        raise RadDinoFolderError(f"{WEIGHTS}: {'; '.join(parts)}")
    for name, (shape, _) in expected.items():
        entry = stored[name]
        if entry["shape"] != shape:
            raise RadDinoFolderError(f"{WEIGHTS}: tensor {name} has shape {entry['shape']}, the network's is {shape}")
        if entry["dtype"] not in FLOAT_DTYPES:
            raise RadDinoFolderError(f"{WEIGHTS}: tensor {name} is {entry['dtype']}, not a float dtype "
                                     f"({', '.join(FLOAT_DTYPES)})")

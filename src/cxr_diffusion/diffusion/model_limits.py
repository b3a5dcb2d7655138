"""A saved model's configs and weight headers checked against sane ranges before anything is allocated.

The hashes in ``model_files.sha256.json`` say the files are the ones saved; they do not say the saved values
are sane, and a hand-made folder can carry its own hashes. Read before diffusers builds a module:

- ``unet/config.json``: ``sample_size`` 1-1024, channels 1-64, at most 8 blocks of 1-4096 channels (plain or
  cross-attention blocks, one per level), 1-16 layers per block, 1-16 transformer layers, 1-64 heads, head dims
  1-512, 1-128 norm groups, ``cross_attention_dim`` 1-8192; a class embedding only as ``train.unet.timestep_condition``
  builds it (a projection of the adapter's output width); every other key at diffusers' default (no other kernel,
  time embedding or norm_eps): a huge, zero or negative value would try to allocate tens of GB, divide by zero or
  fail deep inside torch. The parts fit: as many channels out as in, the VAE's latent channels (or the model's
  image channels), the adapter's output width;
- ``condition_adapter/config.json``: tokens 1-1024, dims 1-8192;
- ``scheduler/scheduler_config.json``: 1-100000 training timesteps (10^9 would hang sampling), betas inside
  (0, 1) with ``beta_start`` below ``beta_end``, ``trained_betas`` one per timestep, a known ``beta_schedule``,
  ``timestep_spacing``, ``prediction_type``, ``solver_type`` and ``algorithm_type``, ``solver_order`` 1-3;
- every weights file's safetensors header: floating-point tensors only (an F32 tensor relabelled I32 loads as
  garbage that is still "finite"), and the UNet's output layer not all zeros, as values (-0.0 and denormals
  included): a model that predicts nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import JsonFileError, read_json
from cxr_diffusion.safe_text import shown_value
from cxr_diffusion.safetensors_header import SafetensorsHeaderError, read_safetensors_header
from cxr_diffusion.whole_number import is_whole_number

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
UNET_RANGES = {"in_channels": (1, 64), "out_channels": (1, 64), "cross_attention_dim": (1, 8192),
               "layers_per_block": (1, 16), "norm_num_groups": (1, 128)}
# Keys that may be one number or one per block, and their range; None (absent) is diffusers' default.
UNET_PER_BLOCK = {"transformer_layers_per_block": (1, 16), "num_attention_heads": (1, 64),
                  "attention_head_dim": (1, 512)}
SCHEDULER_CHOICES = {"beta_schedule": {"linear", "scaled_linear", "squaredcos_cap_v2"},
                     "timestep_spacing": {"leading", "trailing", "linspace"},
                     "prediction_type": {"epsilon", "v_prediction", "sample"},
                     "solver_type": {"midpoint", "heun"},
                     "algorithm_type": {"dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"}}
# The UNet keys this project sets (build_unet), checked by range above; every other key diffusers' UNet takes must
# keep diffusers' default: a saved config that sets one (a class embedding of 10^9 rows, a 10^9-wide time
# embedding, a 10^5 kernel, norm_eps 1e30) is not a model this project trains, and several allocate before
# any weight is read.
UNET_SET_KEYS = frozenset({"sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
                           "block_out_channels", "layers_per_block", "attention_head_dim", "norm_num_groups",
                           "cross_attention_dim", "transformer_layers_per_block", "num_attention_heads",
                           "class_embed_type", "projection_class_embeddings_input_dim"})
DOWN_BLOCKS, UP_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
SCHEDULER_RANGES = {"solver_order": (1, 3), "steps_offset": (0, 0)}  # 0 as saved here: any offset pushes the
# first timestep of as many steps as training timesteps past the schedule (an IndexError in DDIM and DDPM)
# The scheduler keys the params set (noise.training_scheduler); the rest follow from them (sampling_scheduler).
SCHEDULER_SET_KEYS = ("num_train_timesteps", "beta_schedule", "prediction_type", "rescale_betas_zero_snr",
                      "timestep_spacing", "beta_start", "beta_end", "trained_betas")
ADAPTER_RANGES = {"tokens": (1, 1024), "dim": (1, 8192), "out_tokens": (1, 1024), "out_dim": (1, 8192)}
MAX_TIMESTEPS = 100_000
_FIX = "retrain it (`dvc repro`, stage train@<branch>) or re-fetch the folder"


class ModelConfigError(UserError, ValueError):
    """A saved model's config or weights header is outside what this project saves; the message names it."""


def check_model_limits(model_dir: Path, index: dict) -> None:
    """Raise ``ModelConfigError`` naming the file and key of the first value out of range (module docstring);
    ``index`` is the folder's ``model_index.json``, already read and checked by the caller."""
    model_dir = Path(model_dir)
    unet = _config(model_dir / "unet" / "config.json")
    for key, bounds in UNET_RANGES.items():
        _in_range(model_dir / "unet" / "config.json", key, unet.get(key), bounds)  # the mid block always attends
    _sample_size(model_dir / "unet" / "config.json", unet.get("sample_size"))
    for key, (low, high) in UNET_PER_BLOCK.items():
        value = unet.get(key)
        values = value if isinstance(value, list) else [value]
        if value is not None and not (1 <= len(values) <= 8 and all(is_whole_number(v, low, high) for v in values)):
            raise ModelConfigError(f"{model_dir / 'unet' / 'config.json'}: {key} {shown_value(value)} is not {low}-{high} "
                                   f"(or one such number per block); {_FIX}")
    blocks = unet.get("block_out_channels")
    if not (isinstance(blocks, list) and 1 <= len(blocks) <= 8 and all(is_whole_number(v, 1, 4096) for v in blocks)):
        raise ModelConfigError(f"{model_dir / 'unet' / 'config.json'}: block_out_channels {shown_value(blocks)} is not "
                               f"1-8 sizes of 1-4096 channels; {_FIX}")
    _check_block_types(model_dir / "unet" / "config.json", unet, len(blocks))
    _check_diffusers_defaults(model_dir / "unet" / "config.json", unet)
    adapter_path = model_dir / "condition_adapter" / "config.json"
    adapter = _config(adapter_path)
    for key, bounds in ADAPTER_RANGES.items():
        _in_range(adapter_path, key, adapter.get(key), bounds, optional=key.startswith("out_"))
    vae_path = model_dir / "vae" / "config.json"
    vae = _config(vae_path) if _names_component(index, "vae") else None  # a stray vae/ folder is not loaded
    _check_parts_fit(model_dir, unet, adapter, vae, index.get("channels"))
    _check_scheduler(model_dir / "scheduler" / "scheduler_config.json")
    if vae is not None:
        _check_vae(vae_path, vae)
    for weights in sorted(model_dir.glob("*/*.safetensors")):
        _check_weights_header(weights)
    _check_clip_towers(model_dir, index)


def _names_component(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _check_clip_towers(model_dir: Path, index: dict) -> None:
    """A saved text or image encoder's config against its weights, as clip.model's folder is checked: transformers
    would fill a layer the weights lack at random, or allocate what a few bytes of config ask for."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    from cxr_diffusion.conditioning.clip_folder import ClipFolderError, check_clip_tower

    for component, model_class in (("text_encoder", CLIPTextModel), ("image_encoder", CLIPVisionModelWithProjection)):
        if _names_component(index, component):
            try:
                check_clip_tower(model_dir / component, model_class)
            except ClipFolderError as error:
                raise ModelConfigError(f"{model_dir / component}: {error}; {_FIX}") from None


VAE_RANGES = {"in_channels": (1, 64), "out_channels": (1, 64), "latent_channels": (1, 64), "layers_per_block": (1, 16),
              "norm_num_groups": (1, 128), "sample_size": (1, 4096)}
VAE_SET_KEYS = frozenset(VAE_RANGES) | {"block_out_channels", "down_block_types", "up_block_types", "scaling_factor",
                                        "force_upcast"}


def check_vae_folder(folder: Path) -> dict:
    """The config of the AutoencoderKL in ``folder`` (``train.vae``), checked as a saved model's ``vae/`` is, before
    diffusers builds anything from it (a 0 norm groups divides by zero there, a string of channels is a traceback)."""
    path = Path(folder) / "config.json"
    vae = _config(path)
    _check_vae(path, vae)
    return vae


def _check_vae(path: Path, vae: dict) -> None:
    """An SD-style AutoencoderKL: channels, levels, layers and groups in range, encoder and decoder blocks of
    its own kind, a finite positive scaling factor, every other key at diffusers' default."""
    for key, bounds in VAE_RANGES.items():
        _in_range(path, key, vae.get(key), bounds, optional=key == "sample_size")
    blocks = vae.get("block_out_channels")
    if not (isinstance(blocks, list) and 1 <= len(blocks) <= 8 and all(is_whole_number(v, 1, 4096) for v in blocks)):
        raise ModelConfigError(f"{path}: block_out_channels {shown_value(blocks)} is not 1-8 sizes of 1-4096 channels; {_FIX}")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if vae.get(key) != [block] * len(blocks):
            raise ModelConfigError(f"{path}: {key} {shown_value(vae.get(key))} is not {len(blocks)} x {block}; {_FIX}")
    factor = vae.get("scaling_factor", 0.18215)
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
            and 0 < factor < 100):
        raise ModelConfigError(f"{path}: scaling_factor {shown_value(factor)} is not a finite number in (0, 100); {_FIX}")
    from diffusers import AutoencoderKL

    _check_diffusers_defaults(path, vae, AutoencoderKL, VAE_SET_KEYS)


def _check_block_types(path: Path, unet: dict, levels: int) -> None:
    """One down and one up block per level, each a plain or a cross-attention block (what build_unet writes)."""
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        value = unet.get(key)
        if not (isinstance(value, list) and len(value) == levels and all(v in allowed for v in value)):
            raise ModelConfigError(f"{path}: {key} {shown_value(value)} is not {levels} of {sorted(allowed)} (one per "
                                   f"block_out_channels level); {_FIX}")


def _check_diffusers_defaults(path: Path, config: dict, model_class=None, set_keys: frozenset = UNET_SET_KEYS) -> None:
    """Every key of ``model_class`` (the UNet's by default) this project does not set holds diffusers' default."""
    import inspect

    if model_class is None:
        from diffusers import UNet2DConditionModel as model_class

    defaults = {name: parameter.default for name, parameter in
                inspect.signature(model_class.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    for key, value in config.items():
        if key in set_keys or key not in defaults:  # ``_class_name`` and other bookkeeping are not arguments
            continue
        default = defaults[key]
        if _as_json(value) != _as_json(default):
            raise ModelConfigError(f"{path}: {key} is {shown_value(value)}, not diffusers' default {shown_value(default)}; this "
                                   f"project never sets it; {_FIX}")


def _as_json(value: object) -> object:
    """Tuples as lists, as a saved config.json holds them."""
    return [_as_json(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_parts_fit(model_dir: Path, unet: dict, adapter: dict, vae: dict | None, channels: object) -> None:
    """The UNet denoises what it is given: as many channels out as in, those of the VAE's latents (latent
    space) or of the images (pixel space), and a cross-attention width equal to the adapter's output."""
    path = model_dir / "unet" / "config.json"
    if unet["in_channels"] != unet["out_channels"]:
        raise ModelConfigError(f"{path}: in_channels {unet['in_channels']} and out_channels {unet['out_channels']} "
                               f"differ; a denoiser predicts what it is given; {_FIX}")
    if vae is not None:
        latent = vae.get("latent_channels", 4)
        if unet["in_channels"] != latent:
            raise ModelConfigError(f"{path}: in_channels {unet['in_channels']} is not the VAE's latent_channels "
                                   f"{shown_value(latent)} ({model_dir / 'vae' / 'config.json'}); {_FIX}")
    else:
        if unet["in_channels"] != channels:
            raise ModelConfigError(f"{path}: in_channels {unet['in_channels']} is not the model's image channels "
                                   f"{shown_value(channels)} (model_index.json); {_FIX}")
    width = adapter.get("out_dim") or adapter.get("dim")
    attention = unet.get("cross_attention_dim")
    if attention is not None and attention != width:
        raise ModelConfigError(f"{path}: cross_attention_dim {attention} is not the condition adapter's output width "
                               f"{shown_value(width)} (condition_adapter/config.json); {_FIX}")
    _check_timestep_condition(path, unet, width)


def _check_timestep_condition(path: Path, unet: dict, width: object) -> None:
    """No class embedding, or the one ``timestep_condition`` builds: a projection of the adapter's pooled output."""
    kind, projected = unet.get("class_embed_type"), unet.get("projection_class_embeddings_input_dim")
    if kind is None and projected is None:
        return
    if kind != "projection":
        raise ModelConfigError(f"{path}: class_embed_type is {shown_value(kind)}; this project builds none or "
                               f"'projection' (train.unet.timestep_condition); {_FIX}")
    if not (is_whole_number(projected, 1, 1 << 20) and projected == width):  # 8.0 == 8, but nn.Linear(8.0) raises
        raise ModelConfigError(f"{path}: projection_class_embeddings_input_dim {shown_value(projected)} is not the "
                               f"condition adapter's output width {shown_value(width)} "
                               f"(condition_adapter/config.json); {_FIX}")


def _config(path: Path) -> dict:
    try:
        return read_json(path, _FIX)
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: missing; {_FIX}") from None
    except JsonFileError as error:
        raise ModelConfigError(str(error)) from None


def _in_range(path: Path, key: str, value: object, bounds: tuple[int, int], optional: bool = False) -> None:
    if value is None and optional:
        return
    if not is_whole_number(value, *bounds):
        raise ModelConfigError(f"{path}: {key} {shown_value(value)} is not a whole number {bounds[0]}-{bounds[1]}; {_FIX}")


def _sample_size(path: Path, value: object) -> None:
    if not is_whole_number(value, 1, 1024):  # square images only: the pipeline samples size x size
        raise ModelConfigError(f"{path}: sample_size {shown_value(value)} is not a whole number 1-1024; {_FIX}")


def _check_scheduler(path: Path) -> None:
    config = _config(path)
    steps = config.get("num_train_timesteps")
    _in_range(path, "num_train_timesteps", steps, (1, MAX_TIMESTEPS))
    for key in ("beta_start", "beta_end"):
        value = config.get(key)
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ModelConfigError(f"{path}: {key} {shown_value(value)} is not inside (0, 1); {_FIX}")
    if isinstance(config.get("beta_start"), (int, float)) and isinstance(config.get("beta_end"), (int, float)) \
            and config["beta_start"] >= config["beta_end"]:
        raise ModelConfigError(f"{path}: beta_start {shown_value(config['beta_start'])} is not below beta_end "
                               f"{shown_value(config['beta_end'])}; {_FIX}")
    for key, choices in SCHEDULER_CHOICES.items():
        if key in config and config[key] not in choices:
            raise ModelConfigError(f"{path}: {key} {shown_value(config[key])} is not one of {sorted(choices)}; {_FIX}")
    for key, bounds in SCHEDULER_RANGES.items():  # absent: the scheduler's default; null is no whole number
        if key in config:
            _in_range(path, key, config[key], bounds)
    if "rescale_betas_zero_snr" in config and type(config["rescale_betas_zero_snr"]) is not bool:
        raise ModelConfigError(f"{path}: rescale_betas_zero_snr {shown_value(config['rescale_betas_zero_snr'])} is "
                               f"not true or false (any other value counts as true); {_FIX}")
    betas = config.get("trained_betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == steps and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 < b < 1 for b in betas)):
        raise ModelConfigError(f"{path}: trained_betas must be {steps} values inside (0, 1), one per timestep; {_FIX}")
    _check_scheduler_defaults(path, config)


def _check_scheduler_defaults(path: Path, config: dict) -> None:
    """Every key but the few the params set holds what ``sampling_scheduler`` writes for them (flow sigmas, a
    NaN ``lambda_min_clipped`` or exponential sigmas would change every image or fail mid-sampling)."""
    from diffusers import DDPMScheduler

    from cxr_diffusion.diffusion.noise import SAMPLERS, sampling_scheduler

    names = {cls.__name__: name for name, cls in SAMPLERS.items()}
    if config.get("_class_name") not in names:
        raise ModelConfigError(f"{path}: _class_name {shown_value(config.get('_class_name'))} is not one of "
                               f"{sorted(names)}; {_FIX}")
    train = DDPMScheduler(clip_sample=False, **{key: config[key] for key in SCHEDULER_SET_KEYS if key in config})
    expected = dict(sampling_scheduler(train, names[config["_class_name"]]).config)
    for key, value in config.items():
        if key.startswith("_") or key in SCHEDULER_SET_KEYS or key in SCHEDULER_CHOICES or key in SCHEDULER_RANGES:
            continue
        if key not in expected or _as_json(value) != _as_json(expected[key]):
            shown = shown_value(expected[key]) if key in expected else "absent"
            raise ModelConfigError(f"{path}: {key} is {shown_value(value)}, not {shown} as this project saves it; {_FIX}")


def _check_weights_header(path: Path) -> None:
    """Every tensor floating point; the UNet's output layer not all zeros (read from the file, not loaded)."""
    try:
        header = read_safetensors_header(path)
    except SafetensorsHeaderError as error:
        raise ModelConfigError(f"{path}: not a safetensors file ({error}); {_FIX}") from None
    for name, entry in header.tensors.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise ModelConfigError(f"{path}: tensor {shown_value(name)} is {shown_value(dtype)}, not floating point; {_FIX}")
    problem = header.problem(path.stat().st_size)
    if problem:
        raise ModelConfigError(f"{path}: {problem}; {_FIX}")
    output = header.tensors.get("conv_out.weight") if path.parent.name == "unet" else None
    if isinstance(output, dict) and _all_zero(path, header.data_start, output):
        raise ModelConfigError(f"{path}: the UNet's output layer (conv_out.weight) is all zeros, so it "
                               f"predicts nothing; {_FIX}")


def _all_zero(path: Path, data_start: int, entry: dict) -> bool:
    """Whether a float tensor's values are all zero, read from its bytes (up to 16 MB): +0 and -0 alike, and
    magnitudes below 1e-20 (denormals) count as zero; a trained layer's weights are about 1e-2."""
    import numpy as np

    start, end = entry["data_offsets"]
    with open(path, "rb") as handle:
        handle.seek(data_start + start)
        raw = handle.read(min(end - start, 1 << 24))
    if entry["dtype"] == "BF16":  # bf16 is the top half of a float32
        raw = raw[: len(raw) // 2 * 2]
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[entry["dtype"]]
        size = np.dtype(dtype).itemsize
        values = np.frombuffer(raw[: len(raw) // size * size], dtype=dtype)
    return values.size == 0 or not bool(np.any(np.abs(values.astype(np.float64)) >= 1e-20))

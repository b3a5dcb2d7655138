"""`cxr-diffusion generate` as a library use case: images from a saved model and the one input its branch takes.

Everything a user hands in is checked before any sampling, each refusal a ``UserError`` naming the option or
file: the device (one this machine has), the model folder (hashes, configs and weights, ``load_pipeline``),
the input (a prompt, a reference image read as prepare reads training images, or a float embedding from .npy
without pickles or a one-tensor .safetensors), the image count, the sampler steps and the output folder (new or
empty, writable). The images and a settings.json are swapped into the folder whole.
"""

from __future__ import annotations

import math

from pathlib import Path

from cxr_diffusion.errors import UserError
from cxr_diffusion.safe_text import visible_text

# Classifier-free guidance is used at 1-10 (3-7 usually); far beyond, it extrapolates past anything the
# model learned and samples wash out to black and white (a scale of 1e30 gives NaN).
MAX_GUIDANCE_SCALE = 30.0
# One run's images: --num-images, and an --embedding file of n rows times --num-images, all sampled in one batch.
MAX_IMAGES = 256
# Seeds lie in [0, 2**32), as the params' seed does (numpy's range); torch.Generator refuses 2**64.
SEED_LIMIT = 2**32




class GenerateError(UserError, ValueError):
    """A generate input is refused; the message names the option or file and what to do."""


def generate_images(model: Path, inputs: dict[str, object], num_images: int, guidance_scale: float, steps: int,
                    sampler: str, seed: int, out: Path, device: str) -> list[str]:
    """Generate ``num_images`` per condition from the saved model folder ``model`` and write them to ``out`` with
    a settings.json; ``inputs`` maps each generate option (--prompt, --reference, --embedding) to its value or None,
    and exactly the one the model's branch takes must be given. Returns the image file names. Every refusal is a
    ``UserError`` naming the option or file, raised before anything is written."""
    from cxr_diffusion.device import describe_device

    target = _sampling_device(device)
    pipeline = _load_model(model, sampler, target)
    condition = _build_condition(pipeline, model, inputs)
    _check_image_count(len(condition), num_images, inputs.get("--embedding"))
    _check_out(out, model)
    images = _sample(pipeline, condition, model, num_images, guidance_scale, steps, sampler, seed)
    reference, embedding = inputs.get("--reference"), inputs.get("--embedding")
    settings = {"model": str(model), "branch": pipeline.config.branch, "prompt": inputs.get("--prompt"),
                **_prompt_tokens(pipeline, inputs.get("--prompt")),
                "reference": str(reference) if reference else None, "embedding": str(embedding) if embedding else None,
                "num_images": num_images, "guidance_scale": guidance_scale, "steps": steps, "sampler": sampler,
                "seed": seed, "device": describe_device(target)}
    return _write_outputs(out, images, settings)


MAX_EMBEDDING_VALUES = 64 * 1024 * 8192  # 64 images of the largest condition row a store holds


def _check_npy_embedding_header(path: Path) -> None:
    """The declared array, from the header alone, before np.load allocates it: a float array of at most
    ``MAX_EMBEDDING_VALUES`` whose bytes the file holds."""
    from cxr_diffusion.npy_header import read_npy_header

    try:
        header = read_npy_header(path)
    except (ValueError, EOFError, OSError) as error:
        raise GenerateError(f"--embedding {path}: not a plain numeric .npy array ({error or type(error).__name__}); "
                            f"save it with numpy.save") from None
    if header.dtype.kind != "f":  # bool, integers, complex, strings and objects are no embedding
        raise GenerateError(f"--embedding {path}: not a plain numeric .npy array of floats (dtype {header.dtype}); "
                            f"save a float array with numpy.save")
    if math.prod(header.shape) > MAX_EMBEDDING_VALUES:
        raise GenerateError(f"--embedding {path}: declares shape {header.shape}, more than {MAX_EMBEDDING_VALUES:,} "
                            f"values; an embedding is (tokens, dim) or (n, tokens, dim)")
    if path.stat().st_size < header.offset + header.data_bytes:
        raise GenerateError(f"--embedding {path}: not a plain numeric .npy array (it declares shape {header.shape} "
                            f"but holds fewer bytes: truncated); save it with numpy.save")


_TORCH_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64"}  # safetensors' dtype codes as torch names them


def _check_safetensors_embedding_header(path: Path) -> None:
    """As for .npy: one floating-point tensor of at most ``MAX_EMBEDDING_VALUES`` whose bytes the file holds,
    from the header alone, before ``load_file`` allocates what it declares."""
    from cxr_diffusion.safetensors_header import checked_header

    header, problem = checked_header(path)
    if problem:
        raise GenerateError(f"--embedding {path}: not a readable safetensors file ({problem}); is it truncated?")
    tensors = header.tensors
    if len(tensors) != 1:
        raise GenerateError(f"--embedding {path}: holds {len(tensors)} tensors ({visible_text(', '.join(tensors), 200)}); "
                            "expected exactly one")
    (name, entry), = tensors.items()
    if entry["dtype"] not in ("F16", "BF16", "F32", "F64"):
        raise GenerateError(f"--embedding {path}: tensor '{visible_text(name, 80)}' is {_TORCH_NAMES.get(entry['dtype'], entry['dtype'].lower())}; an embedding "
                            "is floating point (save it as float32)")
    if math.prod(entry["shape"]) > MAX_EMBEDDING_VALUES:
        raise GenerateError(f"--embedding {path}: declares shape {tuple(entry['shape'])}, more than "
                            f"{MAX_EMBEDDING_VALUES:,} values; an embedding is (tokens, dim) or (n, tokens, dim)")


def _read_embedding(path: Path):
    """A (tokens, dim) or (n, tokens, dim) float array from .npy (no pickles) or .safetensors (one tensor)."""
    import numpy as np
    import torch

    if not path.is_file():
        raise GenerateError(f"--embedding {path} does not exist")
    if path.suffix == ".npy":
        _check_npy_embedding_header(path)
        try:  # a truncated or foreign file raises ValueError, EOFError (empty) or OSError, by where it breaks
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as error:
            raise GenerateError(f"--embedding {path}: not a plain numeric .npy array ({error or type(error).__name__}); "
                  f"save it with numpy.save")
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":  # bool and integers are no embedding
            what = f"dtype {array.dtype}" if isinstance(array, np.ndarray) else "an .npz archive"
            raise GenerateError(f"--embedding {path}: not a plain numeric .npy array of floats ({what}); save a float array "
                  f"with numpy.save")
        return torch.from_numpy(array.astype(np.float32))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_safetensors_embedding_header(path)
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise GenerateError(f"--embedding {path}: not a readable safetensors file ({error}); is it truncated?")
        if len(tensors) != 1:
            raise GenerateError(f"--embedding {path}: holds {len(tensors)} tensors ({', '.join(tensors)}); expected exactly one")
        (name, tensor), = tensors.items()
        if not tensor.is_floating_point():
            raise GenerateError(f"--embedding {path}: tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}; an embedding "
                  f"is floating point (save it as float32)")
        return tensor.float()
    raise GenerateError(f"--embedding {path}: use a .npy or .safetensors file")


def _sampling_device(requested: str):
    """``auto``, or a device this machine has: cpu, cuda and cuda:N when CUDA is present, mps when present."""
    import torch

    from cxr_diffusion.device import resolve_device

    available = ["auto", "cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    if requested not in available:
        raise GenerateError(f"--device {requested!r} is not a device of this machine; use one of: {', '.join(available)}")
    return resolve_device(requested)


def _load_model(model: Path, sampler: str, device):
    """The checked pipeline of a saved model folder, its scheduler set to ``sampler``, on ``device``."""
    from cxr_diffusion.diffusion.noise import SAMPLERS
    from cxr_diffusion.sampling.sample import load_pipeline

    if not (model / "model_index.json").is_file():
        raise GenerateError(f"{model} is not a saved model (no model_index.json); train one with `dvc repro` (models/<branch>)")
    if sampler not in SAMPLERS:
        raise GenerateError(f"--sampler {sampler!r} is not one of {sorted(SAMPLERS)}")
    return load_pipeline(model, sampler, device)


def _branch_input(model: Path, branch: str, inputs: dict[str, object]) -> str:
    """The one option of ``inputs`` that the model's branch takes; giving any other, or none, is refused."""
    from cxr_diffusion.branches import branch_spec

    given = [name for name, value in inputs.items() if value is not None]
    needed = branch_spec(branch).generate_option
    if given != [needed]:
        raise GenerateError(f"{model} holds a model of branch '{branch}': give {needed} (got {', '.join(given) or 'nothing'})")
    return needed


def _reference_image(pipeline, reference: Path):
    """``reference`` read by the decoder prepare ran on the training images (16-bit kept, the same budget), at
    the size the model was trained on: the UNet's, times the VAE's downsampling in latent space."""
    from PIL import Image

    from cxr_diffusion.config import PrepareConfig
    from cxr_diffusion.profiles import profile_section
    from cxr_diffusion.data.decode import DecodeBudget, DecodeError, preprocess, read_image_file

    prepare = profile_section(PrepareConfig)  # the default profile's prepare section
    budget = DecodeBudget.from_config(prepare)
    from cxr_diffusion.sampling.sample import output_side

    size = output_side(pipeline)
    try:
        pixels = preprocess(read_image_file(reference, budget), size, prepare.square, budget)
    except DecodeError as error:
        raise GenerateError(f"--reference {reference}: {error}")
    return Image.fromarray(pixels)  # uint8 (size, size): mode "L"


def _build_condition(pipeline, model: Path, inputs: dict[str, object]):
    """The raw condition (n, tokens, dim) from the one input the model's branch takes."""
    option = _branch_input(model, pipeline.config.branch, inputs)
    value = inputs[option]
    if option == "--prompt":
        if not value.strip():
            raise GenerateError("--prompt is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal's encoding could not decode (a Latin-1 terminal's é)
            raise GenerateError("--prompt: not valid UTF-8 text (the terminal sent bytes of another encoding); "
                                "type it in a UTF-8 terminal or pass the words in plain ASCII") from None
        kwargs = {"prompt": value}
    elif option == "--reference":
        kwargs = {"image": _reference_image(pipeline, value)}
    else:
        kwargs = {"embedding": _read_embedding(value)}
    try:
        return pipeline.make_condition(**kwargs)
    except ValueError as error:
        raise GenerateError(f"{option} {value}: {error}")


def _prompt_tokens(pipeline, prompt: str | None) -> dict:
    """How many tokens the prompt has and how many the text encoder read (it cuts a longer prompt, as the
    embed_clip_text stage does, which counts its truncated prompts): what conditioned the images."""
    if prompt is None:
        return {}
    tokens = len(pipeline.tokenizer(prompt, truncation=False)["input_ids"])
    read = min(tokens, int(pipeline.tokenizer.model_max_length))  # the length encode_prompts pads and cuts to
    return {"prompt_tokens": tokens, "prompt_tokens_read": read}


def _check_image_count(conditions: int, num_images: int, embedding: Path | None) -> None:
    """At most MAX_IMAGES in one run: an --embedding of n rows gives n x --num-images images."""
    if conditions * num_images > MAX_IMAGES:
        raise GenerateError(f"--embedding {embedding}: {conditions} embeddings x --num-images {num_images} = "
              f"{conditions * num_images} images, more than the {MAX_IMAGES} of one run; split the file or "
              f"lower --num-images")


def _check_out(out: Path, model: Path) -> None:
    """Refuse, before any sampling, an --out that cannot take the images: a file, a folder that already
    holds files (never overwritten), a path through a file, the current folder or one holding it (it would be
    swapped away under the shell), a folder in or around the model (a DVC output: its next `dvc repro` deletes
    them, or the model), or a place we cannot write."""
    import os
    import secrets

    from cxr_diffusion.io import placed_path

    where, model_at = placed_path(out), Path(os.path.realpath(model))  # where atomic_directory will put it
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise GenerateError(f"--out {out} is the current folder or holds it; give a new folder for the images")
    if where == model_at or model_at in where.parents or where in model_at.parents:
        raise GenerateError(f"--out {out} is in or around the model folder {model}; give a folder outside it")
    try:
        if out.is_symlink() and not out.exists():
            raise GenerateError(f"--out {out} is a broken link; give a new folder for the images")
        if out.exists() and not out.is_dir():
            raise GenerateError(f"--out {out} is a file, not a folder; give a new folder for the images")
        if out.is_dir() and any(out.iterdir()):
            raise GenerateError(f"--out {out} already holds files; give a new folder or empty this one (nothing is overwritten)")
        nearest = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
        if not nearest.is_dir():
            raise GenerateError(f"--out {out}: {nearest} is a file, not a folder; give a folder for the images")
        # A probe file, not os.access: that misses read-only mounts, filesystems refusing new files and ACLs.
        probe = nearest / f".cxr-diffusion-probe.{secrets.token_hex(4)}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as error:
        raise GenerateError(f"--out {out}: cannot write there ({error.strerror or error}); give a folder you can write to")


def _sample(pipeline, condition, model: Path, num_images: int, guidance_scale: float, steps: int, sampler: str,
            seed: int):
    """The images (n, channels, H, W) in [0, 1], refused when any is non-finite or saturated."""
    import torch

    from cxr_diffusion.config import most_sampling_steps
    from cxr_diffusion.sampling.sample import check_generated

    timesteps = pipeline.scheduler.config.num_train_timesteps
    most = most_sampling_steps(timesteps, pipeline.scheduler.config.timestep_spacing, sampler)
    if steps > most:
        why = (f"more than the {timesteps} timesteps {model} was trained with" if most == timesteps else
               f"{sampler} over the {pipeline.scheduler.config.timestep_spacing} spacing of {model} ({timesteps} "
               f"timesteps) takes at most {most}")
        raise GenerateError(f"--steps {steps}: {why}; give at most {most}")
    result = pipeline(condition=condition, num_images_per_condition=num_images, guidance_scale=guidance_scale,
                      num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    check_generated(result.images, str(model), f"--guidance-scale {guidance_scale:g}")
    return result.images


def _write_outputs(out: Path, images, settings: dict) -> list[str]:
    """The PNGs and settings.json (``settings`` plus the file names), swapped into ``out`` whole: a killed
    run leaves nothing half-written."""
    from cxr_diffusion.diffusion.pipeline import to_pil
    from cxr_diffusion.io import atomic_directory, write_json

    files = [f"{settings['branch']}_{settings['seed']}_{i:03d}.png" for i in range(len(images))]
    with atomic_directory(out) as tmp:
        for name, image in zip(files, to_pil(images)):
            image.save(tmp / name, format="PNG")
        write_json(tmp / "settings.json", {**settings, "files": files})
    return files

"""The user's commands: `cxr-diffusion profile | generate | inspect | convert-weights | fetch | doctor | standins`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cxr_diffusion.config import ParamsError, load_params, params_from_dict

app = typer.Typer(add_completion=False, no_args_is_help=True, help="cxr-diffusion: synthetic chest X-ray research.")


@app.command()
def profile(
    name: str = typer.Argument(..., help="A shipped profile (default, tiny, nih-512, rehearsal) or an overlay file of "
                                         "your own (a .yaml path)."),
    root: Path = typer.Option(Path("."), help="Repository root: params.yaml is written there."),
) -> None:
    """Write params.yaml: the default profile with profile NAME laid over it (checked before it replaces anything)."""
    from cxr_diffusion.io import atomic_path
    from cxr_diffusion.profiles import profile_source, validated_profile_text

    try:
        source = profile_source(name)
        text = validated_profile_text(name, check=lambda data: params_from_dict(_with_placeholder_nih_root(data)))
    except ParamsError as error:  # an unknown name or a missing file says so itself; a bad key names the file
        _fail(str(error) if str(error).startswith(("no profile", "profile ")) else f"{error} (in {source})")
    with atomic_path(root / "params.yaml") as temporary:
        temporary.write_text(text, encoding="utf-8")
    typer.echo(f"params.yaml is now profile '{name}'. Run `dvc repro` to rebuild what it changes.")


# A profile for the NIH download leaves dataset.nih_root for the user to fill in after installing it; it is
# validated with this in its place, so every other key is still checked.
_PLACEHOLDER_NIH_ROOT = "/path/to/nih-chestxray14"


def _with_placeholder_nih_root(data: dict) -> dict:
    """``data`` (a copy) with the placeholder for a null or empty dataset.nih_root when dataset.source is nih;
    a missing key or any other value is left for the params to refuse."""
    dataset = data.get("dataset")
    if not (isinstance(dataset, dict) and dataset.get("source") == "nih" and "nih_root" in dataset
            and dataset["nih_root"] in (None, "")):
        return data
    return {**data, "dataset": {**dataset, "nih_root": _PLACEHOLDER_NIH_ROOT}}


# Classifier-free guidance is used at 1-10 (3-7 usually); far beyond, it extrapolates past anything the
# model learned and samples wash out to black and white (a scale of 1e30 gives NaN).
MAX_GUIDANCE_SCALE = 30.0
# One run's images: --num-images, and an --embedding file of n rows times --num-images, all sampled in one batch.
MAX_IMAGES = 256
# Seeds lie in [0, 2**32), as the params' seed does (numpy's range); torch.Generator refuses 2**64.
SEED_LIMIT = 2**32


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        _fail(f"--seed {seed}: must be at least 0 and below 2**32 ({SEED_LIMIT}), as the params' seed")


def _read_embedding(path: Path):
    """A (tokens, dim) or (n, tokens, dim) float array from .npy (no pickles) or .safetensors (one tensor)."""
    import numpy as np
    import torch

    if not path.is_file():
        _fail(f"--embedding {path} does not exist")
    if path.suffix == ".npy":
        try:  # a truncated or foreign file raises ValueError, EOFError (empty) or OSError, by where it breaks
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as error:
            _fail(f"--embedding {path}: not a plain numeric .npy array ({error or type(error).__name__}); "
                  f"save it with numpy.save")
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":  # bool and integers are no embedding
            what = f"dtype {array.dtype}" if isinstance(array, np.ndarray) else "an .npz archive"
            _fail(f"--embedding {path}: not a plain numeric .npy array of floats ({what}); save a float array "
                  f"with numpy.save")
        return torch.from_numpy(array.astype(np.float32))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            _fail(f"--embedding {path}: not a readable safetensors file ({error}); is it truncated?")
        if len(tensors) != 1:
            _fail(f"--embedding {path}: holds {len(tensors)} tensors ({', '.join(tensors)}); expected exactly one")
        (name, tensor), = tensors.items()
        if not tensor.is_floating_point():
            _fail(f"--embedding {path}: tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}; an embedding "
                  f"is floating point (save it as float32)")
        return tensor.float()
    _fail(f"--embedding {path}: use a .npy or .safetensors file")


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
        _fail(f"--device {requested!r} is not a device of this machine; use one of: {', '.join(available)}")
    return resolve_device(requested)


def _load_model(model: Path, sampler: str, device):
    """The checked pipeline of a saved model folder, its scheduler set to ``sampler``, on ``device``."""
    from cxr_diffusion.diffusion.noise import SAMPLERS
    from cxr_diffusion.errors import UserError
    from cxr_diffusion.sampling.sample import load_pipeline

    if not (model / "model_index.json").is_file():
        _fail(f"{model} is not a saved model (no model_index.json); train one with `dvc repro` (models/<branch>)")
    if sampler not in SAMPLERS:
        _fail(f"--sampler {sampler!r} is not one of {sorted(SAMPLERS)}")
    try:
        return load_pipeline(model, sampler, device)
    except UserError as error:
        _fail(str(error))


def _branch_input(model: Path, branch: str, inputs: dict[str, object]) -> str:
    """The one option of ``inputs`` that the model's branch takes; giving any other, or none, is refused."""
    from cxr_diffusion.branches import branch_spec

    given = [name for name, value in inputs.items() if value is not None]
    needed = branch_spec(branch).generate_option
    if given != [needed]:
        _fail(f"{model} holds a model of branch '{branch}': give {needed} (got {', '.join(given) or 'nothing'})")
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
    vae = getattr(pipeline, "vae", None)
    size = pipeline.unet.config.sample_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae else 1)
    try:
        pixels = preprocess(read_image_file(reference, budget), size, prepare.square, budget)
    except DecodeError as error:
        _fail(f"--reference {reference}: {error}")
    return Image.fromarray(pixels)  # uint8 (size, size): mode "L"


def _build_condition(pipeline, model: Path, inputs: dict[str, object]):
    """The raw condition (n, tokens, dim) from the one input the model's branch takes."""
    option = _branch_input(model, pipeline.config.branch, inputs)
    value = inputs[option]
    if option == "--prompt":
        if not value.strip():
            _fail("--prompt is empty")
        kwargs = {"prompt": value}
    elif option == "--reference":
        kwargs = {"image": _reference_image(pipeline, value)}
    else:
        kwargs = {"embedding": _read_embedding(value)}
    try:
        return pipeline.make_condition(**kwargs)
    except ValueError as error:
        _fail(f"{option} {value}: {error}")


def _check_image_count(conditions: int, num_images: int, embedding: Path | None) -> None:
    """At most MAX_IMAGES in one run: an --embedding of n rows gives n x --num-images images."""
    if conditions * num_images > MAX_IMAGES:
        _fail(f"--embedding {embedding}: {conditions} embeddings x --num-images {num_images} = "
              f"{conditions * num_images} images, more than the {MAX_IMAGES} of one run; split the file or "
              f"lower --num-images")


def _check_out(out: Path) -> None:
    """Refuse, before any sampling, an --out that cannot take the images: a file, a folder that already
    holds files (never overwritten), a path through a file, or a place we cannot write."""
    import os
    import secrets

    try:
        if out.is_symlink() and not out.exists():
            _fail(f"--out {out} is a broken link; give a new folder for the images")
        if out.exists() and not out.is_dir():
            _fail(f"--out {out} is a file, not a folder; give a new folder for the images")
        if out.is_dir() and any(out.iterdir()):
            _fail(f"--out {out} already holds files; give a new folder or empty this one (nothing is overwritten)")
        nearest = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
        if not nearest.is_dir():
            _fail(f"--out {out}: {nearest} is a file, not a folder; give a folder for the images")
        # A probe file, not os.access: that misses read-only mounts, filesystems refusing new files and ACLs.
        probe = nearest / f".cxr-diffusion-probe.{secrets.token_hex(4)}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as error:
        _fail(f"--out {out}: cannot write there ({error.strerror or error}); give a folder you can write to")


def _sample(pipeline, condition, model: Path, num_images: int, guidance_scale: float, steps: int, seed: int):
    """The images (n, channels, H, W) in [0, 1], refused when any is non-finite or saturated."""
    import torch

    from cxr_diffusion.errors import UserError
    from cxr_diffusion.sampling.sample import check_generated

    timesteps = pipeline.scheduler.config.num_train_timesteps
    if steps > timesteps:
        _fail(f"--steps {steps}: more than the {timesteps} timesteps {model} was trained with; give at most {timesteps}")
    result = pipeline(condition=condition, num_images_per_condition=num_images, guidance_scale=guidance_scale,
                      num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    try:
        check_generated(result.images, str(model), f"--guidance-scale {guidance_scale:g}")
    except UserError as error:
        _fail(str(error))
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


@app.command()
def generate(
    model: Path = typer.Argument(..., help="A saved model directory (models/<branch>)."),
    prompt: str = typer.Option(None, help="clip_text models: the prompt, e.g. 'chest x-ray showing effusion'."),
    reference: Path = typer.Option(None, help="clip_vision models: a reference chest X-ray image."),
    embedding: Path = typer.Option(None, help="elixr models: a (tokens, dim) embedding, or (n, tokens, dim) for n "
                                              "conditions, .npy or .safetensors."),
    num_images: int = typer.Option(4, min=1, max=MAX_IMAGES, help="Images per condition; at most "
                                                                  f"{MAX_IMAGES} in all."),
    guidance_scale: float = typer.Option(3.0, min=1.0, max=MAX_GUIDANCE_SCALE,
                                         help="Classifier-free guidance scale (1 = off; 3-7 is usual)."),
    steps: int = typer.Option(25, min=1, max=1000, help="Sampler steps."),
    sampler: str = typer.Option("dpm++", help="dpm++, ddim or ddpm."),
    seed: int = typer.Option(0, help="Random seed, 0 to 2**32 - 1."),
    out: Path = typer.Option(Path("generated"), help="Output directory for PNGs and settings.json (new or empty)."),
    device: str = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps."),
) -> None:
    """Generate chest X-rays from a saved model; writes PNGs and a JSON sidecar of the settings."""
    from cxr_diffusion.device import describe_device

    _check_seed(seed)
    target = _sampling_device(device)
    pipeline = _load_model(model, sampler, target)
    condition = _build_condition(pipeline, model, {"--prompt": prompt, "--reference": reference,
                                                   "--embedding": embedding})
    _check_image_count(len(condition), num_images, embedding)
    _check_out(out)
    images = _sample(pipeline, condition, model, num_images, guidance_scale, steps, seed)
    settings = {"model": str(model), "branch": pipeline.config.branch, "prompt": prompt,
                "reference": str(reference) if reference else None, "embedding": str(embedding) if embedding else None,
                "num_images": num_images, "guidance_scale": guidance_scale, "steps": steps, "sampler": sampler,
                "seed": seed, "device": describe_device(target)}
    files = _write_outputs(out, images, settings)
    typer.echo(f"wrote {len(files)} images and settings.json to {out}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A prepared-data or samples directory, or a saved model.")) -> None:
    """Summarise a prepared dataset (counts per split, rejects, shards) or a saved model."""
    if (path / "model_index.json").is_file():
        fix = "retrain it (`dvc repro`, stage train@<branch>) or re-fetch the folder"
        index = _json_fields(path / "model_index.json", {}, fix)
        unet = _json_fields(path / "unet" / "config.json",
                            {"sample_size": int, "in_channels": int, "block_out_channels": list}, fix)
        adapter = _json_fields(path / "condition_adapter" / "config.json", {"tokens": int, "dim": int}, fix)
        components = [name for name, value in index.items() if isinstance(value, list) and value and value[0]]
        _echo_visible(f"{path}: {index.get('branch')} model, UNet {unet['sample_size']}px x {unet['in_channels']} ch, "
                   f"blocks {unet['block_out_channels']}; condition ({adapter['tokens']}, {adapter['dim']}); "
                   f"components: {', '.join(components)}")
        return
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        _fail(f"{path} has no manifest.json or model_index.json; give data/prepared, data/samples/<branch> or models/<branch>")
    manifest = _json_fields(manifest_path, {"written": int, "image_size": int, "classes": list, "per_split": dict,
                                            "rejected": int, "rejected_by_reason": dict, "shards": list},
                            "rerun the stage that wrote it (`dvc repro`)")
    _echo_visible(f"{path}: {manifest['written']} images ({manifest['image_size']}px, classes {manifest['classes']})")
    for split, count in manifest["per_split"].items():
        _echo_visible(f"  {split!s:5s} {count}")
    _echo_visible(f"  rejected {manifest['rejected']}: {manifest['rejected_by_reason']}")
    typer.echo(f"  {len(manifest['shards'])} shards")


def _echo_visible(line: str) -> None:
    """A line quoting a file's strings: control and invisible characters escaped (no terminal sequences)."""
    from cxr_diffusion.safe_text import visible_text

    typer.echo(visible_text(line, limit=4000))


_JSON_KINDS = {int: "integer", list: "array", dict: "object"}


def _json_fields(path: Path, kinds: dict[str, type], fix: str) -> dict:
    """The JSON object in ``path``, each key of ``kinds`` present with a value of its type (a bool is no
    integer); else one line naming the file and the key."""
    from cxr_diffusion.io import JsonFileError, read_json

    try:
        payload = read_json(path, fix, kind=object)
    except FileNotFoundError:
        _fail(f"{path}: missing; {fix}")
    except JsonFileError as error:  # bad bytes, syntax, nesting or a huge integer
        _fail(str(error))
    if not isinstance(payload, dict):
        _fail(f"{path}: expected a JSON object, got {type(payload).__name__}; {fix}")
    for key, kind in kinds.items():
        value = payload.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            got = json.dumps(value)[:40] if key in payload else "nothing"
            _fail(f"{path}: '{key}' should be a JSON {_JSON_KINDS[kind]}, got {got}; {fix}")
    return payload


@app.command("convert-weights")
def convert_weights(
    source: Path = typer.Argument(..., help="Published Inception-v3 weights: .pth/.pt or .safetensors."),
    target: Path = typer.Argument(..., help="Where to write the checked safetensors file."),
    flavour: str = typer.Option(..., help="fid (pt_inception-2015-12-05, 1008 classes: standard FID) or "
                                          "torchvision (inception_v3 ImageNet, 1000 classes: reference-compatible FID)."),
) -> None:
    """Convert Inception-v3 weights once to safetensors for evaluate.inception_weights / reference_inception_weights."""
    from cxr_diffusion.evaluation.inception import convert_inception_weights
    from cxr_diffusion.io import atomic_path, give_plain_modes

    if flavour not in ("fid", "torchvision"):
        _fail(f"--flavour {flavour!r}: use 'fid' or 'torchvision'")
    if target.is_dir():
        _fail(f"{target} is a folder; give the path of the .safetensors file to write")
    with atomic_path(target) as staged:  # checked before it replaces anything at target
        try:
            result = convert_inception_weights(source, staged, flavour)  # type: ignore[arg-type]
        except (FileNotFoundError, ValueError) as error:
            _fail(str(error))
        _check_finite_weights(staged, source)
        give_plain_modes([staged])
    param = "inception_weights" if flavour == "fid" else "reference_inception_weights"
    typer.echo(f"wrote {target} ({result['tensors']} tensors, sha256 {result['target_sha256'][:12]}; "
               f"source sha256 {result['source_sha256'][:12]}). Set evaluate.{param}: {target}")


def _check_finite_weights(converted: Path, source: Path) -> None:
    """Refuse weights with NaN or infinite values (a damaged or diverged checkpoint), naming the first tensor."""
    import torch
    from safetensors.torch import load_file

    for name, tensor in load_file(converted).items():
        if not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            _fail(f"{source}: tensor '{name}' has {count} NaN or infinite values; a published checkpoint has "
                  f"none: download it again")


def _active_params(params_file: Path | None, root: Path):
    try:
        return load_params(params_file or root / "params.yaml")
    except ParamsError as error:
        _fail(str(error))


@app.command()
def fetch(
    params_file: Path = typer.Option(None, "--params", help="Params file (default: ROOT/params.yaml, the active profile)."),
    root: Path = typer.Option(Path("."), help="Repository root: relative paths in the params resolve here."),
    record_present: bool = typer.Option(False, "--record-present", help="Download nothing: record the assets in "
                                        "place as they are (copies placed by hand, changes you keep)."),
) -> None:
    """Download every external asset the params need to the paths they name, and record their hashes (exit 2
    if any could not be placed; each is listed with how to place it by hand)."""
    from cxr_diffusion.assets.download import AssetError
    from cxr_diffusion.assets.fetch import fetch_assets

    params = _active_params(params_file, root)
    try:
        report = fetch_assets(params, root, record_present=record_present, echo=typer.echo)
    except AssetError as error:
        _fail(str(error))
    if report.missing:
        raise typer.Exit(2)


@app.command()
def doctor(
    params_file: Path = typer.Option(None, "--params", help="Params file (default: ROOT/params.yaml, the active profile)."),
    root: Path = typer.Option(Path("."), help="Repository root: relative paths in the params resolve here."),
) -> None:
    """List every external asset the params need as present, missing or changed since fetch, with the fix
    (exit 0 when all are present and verified, else 2)."""
    from cxr_diffusion.assets.doctor import run_doctor
    from cxr_diffusion.assets.download import AssetError

    params = _active_params(params_file, root)
    try:
        code = run_doctor(params, root, echo=typer.echo)
    except AssetError as error:
        _fail(str(error))
    raise typer.Exit(code)


@app.command("memory-plan")
def memory_plan(
    params_file: Path = typer.Option(None, "--params", help="Params file (default: ROOT/params.yaml, the active profile)."),
    root: Path = typer.Option(Path("."), help="Repository root: relative paths in the params resolve here."),
    memory_gib: float = typer.Option(None, "--memory-gib", min=1.0, max=4096.0,
                                     help="The card's memory in GiB, e.g. 80, 48 or 24 (default: the params' CUDA "
                                          "device, when this machine has one)."),
    precision: str = typer.Option(None, help="bf16, fp16 or no (default: what train.mixed_precision gives on the "
                                             "card; bf16 with --memory-gib)."),
) -> None:
    """Show how `train` fits each branch on a GPU: micro-batch and accumulation (same images per optimizer
    step), gradient checkpointing, where the EMA and the VAE live, and the predicted peak by part."""
    from cxr_diffusion.device import DeviceError, describe_device, resolve_device
    from cxr_diffusion.diffusion.memory_plan import MemoryPlanError, device_memory_budget
    from cxr_diffusion.diffusion.memory_report import branch_plans, card_budget, describe
    from cxr_diffusion.diffusion.precision import choose_mixed_precision
    from cxr_diffusion.errors import UserError

    params = _active_params(params_file, root)
    if precision not in (None, "bf16", "fp16", "no"):
        _fail(f"--precision {precision!r}: choose bf16, fp16 or no")
    if memory_gib is not None:
        budget, card = card_budget(memory_gib), f"a card of {memory_gib:g} GiB"
        precision = precision or ("bf16" if params.train.mixed_precision == "auto" else params.train.mixed_precision)
    else:
        try:
            device = resolve_device(params.device)
        except DeviceError as error:
            _fail(str(error))
        if device.type != "cuda":
            _fail(f"params: device is {params.device!r} and no CUDA GPU is in use here; pass --memory-gib "
                  f"(e.g. 80, 48 or 24) to plan for a card")
        budget, card = device_memory_budget(device), describe_device(device)
        precision = precision or choose_mixed_precision(params.train.mixed_precision, device)
    try:
        plans, vae_note = branch_plans(params, root, budget, precision)
    except (MemoryPlanError, UserError) as error:
        _fail(str(error))
    typer.echo(describe(plans, vae_note, card, precision))


@app.command()
def standins(
    params_file: Path = typer.Option(None, "--params", help="Params file (default: ROOT/params.yaml, the active profile)."),
    root: Path = typer.Option(Path("."), help="Repository root: relative paths in the params resolve here."),
    images: int = typer.Option(32, min=3, help="Images in the stand-in NIH folder (dataset.source: nih)."),
    seed: int = typer.Option(0, help="Seed of every stand-in's random weights and of the NIH folder's images "
                                     "(0 to 2**32 - 1)."),
) -> None:
    """Make random-weight stand-ins of every external asset the params name (same architectures and formats,
    labelled STANDIN.json, replaced by `fetch`), and the stand-in NIH folder, offline; for rehearsals only.
    Keeps complete stand-ins with the same settings; never overwrites a real asset (exit 2)."""
    from cxr_diffusion.rehearsal.standins import StandinError, format_table, make_standins

    _check_seed(seed)
    params = _active_params(params_file, root)
    command = (f"cxr-diffusion standins{f' --params {params_file}' if params_file else ''} --images {images} "
               f"--seed {seed}")
    try:
        results = make_standins(params, root, images=images, seed=seed, command=command, echo=typer.echo)
    except StandinError as error:
        _fail(str(error))
    if not results:
        typer.echo("Nothing to make: the active params name no external asset and dataset.source is not nih.")
        return
    typer.echo("")
    typer.echo(format_table(results))


def main() -> None:
    """The console entry point: a user error anywhere below is one line and exit 2, never a traceback."""
    from cxr_diffusion.errors import UserError, user_error_line

    try:
        app(standalone_mode=True)
    except (UserError, OSError) as error:
        line = user_error_line(error)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

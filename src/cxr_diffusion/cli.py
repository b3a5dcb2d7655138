"""The user's commands: `cxr-diffusion profile | generate | inspect | convert-weights | fetch | doctor | standins`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from cxr_diffusion.config import ParamsError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help="cxr-diffusion: synthetic chest X-ray research.")


@app.command()
def profile(
    name: str = typer.Argument(..., help="Profile in profiles/: default, tiny, nih-512 or rehearsal."),
    root: Path = typer.Option(Path("."), help="Repository root."),
) -> None:
    """Make profiles/<name>.yaml the active params.yaml (checked before it replaces anything)."""
    source = root / "profiles" / f"{name}.yaml"
    if not source.is_file():
        available = sorted(p.stem for p in (root / "profiles").glob("*.yaml"))
        typer.echo(f"error: no profile '{name}' in {root / 'profiles'}; available: {', '.join(available)}", err=True)
        raise typer.Exit(2)
    try:
        load_params(source)
    except ParamsError as error:
        if "nih_root" not in str(error):
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
    target = root / "params.yaml"
    temporary = target.with_suffix(".yaml.tmp")
    shutil.copyfile(source, temporary)
    temporary.replace(target)
    typer.echo(f"params.yaml is now profile '{name}'. Run `dvc repro` to rebuild what it changes.")


# Classifier-free guidance is used at 1-10 (3-7 usually); far beyond, it extrapolates past anything the
# model learned and samples wash out to black and white (a scale of 1e30 gives NaN).
MAX_GUIDANCE_SCALE = 30.0


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read_embedding(path: Path):
    """A (tokens, dim) or (n, tokens, dim) array from .npy (no pickles) or .safetensors (one tensor)."""
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
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            what = f"dtype {array.dtype}" if isinstance(array, np.ndarray) else "an .npz archive"
            _fail(f"--embedding {path}: not a plain numeric .npy array ({what}); save a float array with numpy.save")
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
        return next(iter(tensors.values())).float()
    _fail(f"--embedding {path}: use a .npy or .safetensors file")


@app.command()
def generate(
    model: Path = typer.Argument(..., help="A saved model directory (models/<branch>)."),
    prompt: str = typer.Option(None, help="clip_text models: the prompt, e.g. 'chest x-ray showing effusion'."),
    reference: Path = typer.Option(None, help="clip_vision models: a reference chest X-ray image."),
    embedding: Path = typer.Option(None, help="elixr models: a (tokens, dim) embedding, .npy or .safetensors."),
    num_images: int = typer.Option(4, min=1, max=256, help="Images to generate."),
    guidance_scale: float = typer.Option(3.0, min=1.0, max=MAX_GUIDANCE_SCALE,
                                         help="Classifier-free guidance scale (1 = off; 3-7 is usual)."),
    steps: int = typer.Option(25, min=1, max=1000, help="Sampler steps."),
    sampler: str = typer.Option("dpm++", help="dpm++, ddim or ddpm."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(Path("generated"), help="Output directory for PNGs and settings.json."),
    device: str = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N."),
) -> None:
    """Generate chest X-rays from a saved model; writes PNGs and a JSON sidecar of the settings."""
    import torch
    from PIL import Image

    if not (model / "model_index.json").is_file():
        _fail(f"{model} is not a saved model (no model_index.json); train one with `dvc repro` (models/<branch>)")
    from cxr_diffusion.diffusion.noise import SAMPLERS
    from cxr_diffusion.diffusion.pipeline import to_pil
    from cxr_diffusion.errors import UserError
    from cxr_diffusion.io import atomic_path, write_json
    from cxr_diffusion.sampling.sample import check_generated, load_pipeline

    from cxr_diffusion.device import DeviceError, describe_device, resolve_device

    if sampler not in SAMPLERS:
        _fail(f"--sampler {sampler!r} is not one of {sorted(SAMPLERS)}")
    try:
        target = resolve_device(device)
    except (DeviceError, RuntimeError) as error:  # RuntimeError: torch cannot parse the device string
        _fail(f"--device {device!r}: {error}")
    try:
        pipeline = load_pipeline(model, sampler, target)
    except UserError as error:
        _fail(str(error))
    branch = pipeline.config.branch
    inputs = {"--prompt": prompt, "--reference": reference, "--embedding": embedding}
    given = [name for name, value in inputs.items() if value is not None]
    needed = {"clip_text": "--prompt", "clip_vision": "--reference", "elixr": "--embedding"}[branch]
    if given != [needed]:
        _fail(f"{model} holds a model of branch '{branch}': give {needed} (got {', '.join(given) or 'nothing'})")
    kwargs = {}
    if branch == "clip_text":
        if not prompt.strip():
            _fail("--prompt is empty")
        kwargs["prompt"] = prompt
    elif branch == "clip_vision":
        from cxr_diffusion.config import PrepareConfig
        from cxr_diffusion.data.decode import DecodeBudget, DecodeError, preprocess, read_image_file

        # The decoder prepare ran on the training images (16-bit kept, the same budget), at the size the
        # model was trained on: the UNet's, times the VAE's downsampling in latent space.
        prepare = PrepareConfig()
        budget = DecodeBudget.from_config(prepare)
        vae = getattr(pipeline, "vae", None)
        size = pipeline.unet.config.sample_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae else 1)
        try:
            pixels = preprocess(read_image_file(reference, budget), size, prepare.square, budget)
        except DecodeError as error:
            _fail(f"--reference {reference}: {error}")
        kwargs["image"] = Image.fromarray(pixels)  # uint8 (size, size): mode "L"
    else:
        kwargs["embedding"] = _read_embedding(embedding)
    try:
        condition = pipeline.make_condition(**kwargs)
    except ValueError as error:
        _fail(f"{needed} {inputs[needed]}: {error}")
    result = pipeline(condition=condition, num_images_per_condition=num_images, guidance_scale=guidance_scale,
                      num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    try:
        check_generated(result.images, str(model), f"--guidance-scale {guidance_scale:g}")
    except UserError as error:
        _fail(str(error))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(to_pil(result.images)):
        path = out / f"{branch}_{seed}_{i:03d}.png"
        with atomic_path(path) as tmp:  # a killed run leaves no half-written PNG
            image.save(tmp, format="PNG")
        files.append(path.name)
    settings = {"model": str(model), "branch": branch, "prompt": prompt, "reference": str(reference) if reference else None,
                "embedding": str(embedding) if embedding else None, "num_images": num_images,
                "guidance_scale": guidance_scale, "steps": steps, "sampler": sampler, "seed": seed,
                "device": describe_device(target), "files": files}
    write_json(out / "settings.json", settings)
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
        typer.echo(f"{path}: {index.get('branch')} model, UNet {unet['sample_size']}px x {unet['in_channels']} ch, "
                   f"blocks {unet['block_out_channels']}; condition ({adapter['tokens']}, {adapter['dim']}); "
                   f"components: {', '.join(components)}")
        return
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        _fail(f"{path} has no manifest.json or model_index.json; give data/prepared, data/samples/<branch> or models/<branch>")
    manifest = _json_fields(manifest_path, {"written": int, "image_size": int, "classes": list, "per_split": dict,
                                            "rejected": int, "rejected_by_reason": dict, "shards": list},
                            "rerun the stage that wrote it (`dvc repro`)")
    typer.echo(f"{path}: {manifest['written']} images ({manifest['image_size']}px, classes {manifest['classes']})")
    for split, count in manifest["per_split"].items():
        typer.echo(f"  {split:5s} {count}")
    typer.echo(f"  rejected {manifest['rejected']}: {manifest['rejected_by_reason']}")
    typer.echo(f"  {len(manifest['shards'])} shards")


_JSON_KINDS = {int: "integer", list: "array", dict: "object"}


def _json_fields(path: Path, kinds: dict[str, type], fix: str) -> dict:
    """The JSON object in ``path``, each key of ``kinds`` present with a value of its type (a bool is no
    integer); else one line naming the file and the key."""
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"{path}: missing; {fix}")
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        _fail(f"{path}: not valid JSON ({error}); {fix}")
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

    if flavour not in ("fid", "torchvision"):
        _fail(f"--flavour {flavour!r}: use 'fid' or 'torchvision'")
    try:
        result = convert_inception_weights(source, target, flavour)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    param = "inception_weights" if flavour == "fid" else "reference_inception_weights"
    typer.echo(f"wrote {target} ({result['tensors']} tensors, sha256 {result['target_sha256'][:12]}; "
               f"source sha256 {result['source_sha256'][:12]}). Set evaluate.{param}: {target}")


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


@app.command()
def standins(
    params_file: Path = typer.Option(None, "--params", help="Params file (default: ROOT/params.yaml, the active profile)."),
    root: Path = typer.Option(Path("."), help="Repository root: relative paths in the params resolve here."),
    images: int = typer.Option(32, min=3, help="Images in the stand-in NIH folder (dataset.source: nih)."),
    seed: int = typer.Option(0, help="Seed of every stand-in's random weights and of the NIH folder's images."),
) -> None:
    """Make random-weight stand-ins of every external asset the params name (same architectures and formats,
    labelled STANDIN.json, replaced by `fetch`), and the stand-in NIH folder, offline; for rehearsals only.
    Keeps complete stand-ins with the same settings; never overwrites a real asset (exit 2)."""
    from cxr_diffusion.rehearsal.standins import StandinError, format_table, make_standins

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
    from cxr_diffusion.errors import UserError, describe_os_error

    try:
        app(standalone_mode=True)
    except UserError as error:
        _print_error(" ".join(str(error).split()))
    except OSError as error:
        message = describe_os_error(error)
        if message is None:
            raise
        _print_error(message)


def _print_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(2)


if __name__ == "__main__":
    main()

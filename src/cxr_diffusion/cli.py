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
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        except ValueError as error:
            _fail(f"--embedding {path}: not a plain numeric .npy array ({error})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
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
    guidance_scale: float = typer.Option(3.0, min=1.0, help="Classifier-free guidance scale (1 = off)."),
    steps: int = typer.Option(25, min=1, max=1000, help="Sampler steps."),
    sampler: str = typer.Option("dpm++", help="dpm++, ddim or ddpm."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(Path("generated"), help="Output directory for PNGs and settings.json."),
    device: str = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N."),
) -> None:
    """Generate chest X-rays from a saved model; writes PNGs and a JSON sidecar of the settings."""
    import json

    import torch
    from PIL import Image, UnidentifiedImageError

    if not (model / "model_index.json").is_file():
        _fail(f"{model} is not a saved model (no model_index.json); train one with `dvc repro` (models/<branch>)")
    from cxr_diffusion.diffusion.noise import SAMPLERS
    from cxr_diffusion.sampling.sample import load_pipeline

    from cxr_diffusion.device import DeviceError, describe_device, resolve_device

    if sampler not in SAMPLERS:
        _fail(f"--sampler {sampler!r} is not one of {sorted(SAMPLERS)}")
    try:
        target = resolve_device(device)
    except (DeviceError, RuntimeError) as error:  # RuntimeError: torch cannot parse the device string
        _fail(f"--device {device!r}: {error}")
    pipeline = load_pipeline(model, sampler, target)
    branch = pipeline.config.branch
    given = [name for name, value in (("--prompt", prompt), ("--reference", reference), ("--embedding", embedding))
             if value is not None]
    needed = {"clip_text": "--prompt", "clip_vision": "--reference", "elixr": "--embedding"}[branch]
    if given != [needed]:
        _fail(f"{model} holds a model of branch '{branch}': give {needed} (got {', '.join(given) or 'nothing'})")
    kwargs = {}
    if branch == "clip_text":
        if not prompt.strip():
            _fail("--prompt is empty")
        kwargs["prompt"] = prompt
    elif branch == "clip_vision":
        try:
            kwargs["image"] = Image.open(reference).convert("L")
        except (FileNotFoundError, UnidentifiedImageError) as error:
            _fail(f"--reference {reference}: {error}")
    else:
        kwargs["embedding"] = _read_embedding(embedding)
    try:
        result = pipeline(**kwargs, num_images_per_condition=num_images, guidance_scale=guidance_scale,
                          num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    except ValueError as error:
        _fail(str(error))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(result.images):
        path = out / f"{branch}_{seed}_{i:03d}.png"
        image.save(path)
        files.append(path.name)
    settings = {"model": str(model), "branch": branch, "prompt": prompt, "reference": str(reference) if reference else None,
                "embedding": str(embedding) if embedding else None, "num_images": num_images,
                "guidance_scale": guidance_scale, "steps": steps, "sampler": sampler, "seed": seed,
                "device": describe_device(target), "files": files}
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    typer.echo(f"wrote {len(files)} images and settings.json to {out}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A prepared-data or samples directory, or a saved model.")) -> None:
    """Summarise a prepared dataset (counts per split, rejects, shards) or a saved model."""
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        unet = json.loads((path / "unet" / "config.json").read_text())
        adapter = json.loads((path / "condition_adapter" / "config.json").read_text())
        components = [name for name, value in index.items() if isinstance(value, list) and value[0]]
        typer.echo(f"{path}: {index.get('branch')} model, UNet {unet['sample_size']}px x {unet['in_channels']} ch, "
                   f"blocks {unet['block_out_channels']}; condition ({adapter['tokens']}, {adapter['dim']}); "
                   f"components: {', '.join(components)}")
        return
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        _fail(f"{path} has no manifest.json or model_index.json; give data/prepared, data/samples/<branch> or models/<branch>")
    manifest = json.loads(manifest_path.read_text())
    typer.echo(f"{path}: {manifest['written']} images ({manifest['image_size']}px, classes {manifest['classes']})")
    for split, count in manifest["per_split"].items():
        typer.echo(f"  {split:5s} {count}")
    typer.echo(f"  rejected {manifest['rejected']}: {manifest['rejected_by_reason']}")
    typer.echo(f"  {len(manifest['shards'])} shards")


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


if __name__ == "__main__":
    app()

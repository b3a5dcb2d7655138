"""The user's commands: `cxr-diffusion profile | generate | inspect | convert-weights | fetch | doctor | standins`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cxr_diffusion.config import ParamsError, params_from_dict
from cxr_diffusion.errors import LINE_LIMIT
from cxr_diffusion.params_file import load_params
from cxr_diffusion.safe_text import visible_text
from cxr_diffusion.sampling.generate import MAX_GUIDANCE_SCALE, MAX_IMAGES, SEED_LIMIT

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
    target = root / "params.yaml"
    if target.exists() and not target.is_file():
        _fail(f"{target} is not a regular file (a folder, FIFO or device); move it away, then rerun")
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    typer.echo(f"params.yaml is now profile '{visible_text(name)}'. Run `dvc repro` to rebuild what it changes.")


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


def _fail(message: str) -> None:
    """The one ``error:`` line, hidden characters escaped (a message can quote a downloaded file's name)."""
    typer.echo(f"error: {visible_text(message, LINE_LIMIT)}", err=True)
    raise typer.Exit(2)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        _fail(f"--seed {seed}: must be at least 0 and below 2**32 ({SEED_LIMIT}), as the params' seed")


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
    from cxr_diffusion.errors import UserError
    from cxr_diffusion.sampling.generate import generate_images

    _check_seed(seed)
    try:
        files = generate_images(model, {"--prompt": prompt, "--reference": reference, "--embedding": embedding},
                                num_images, guidance_scale, steps, sampler, seed, out, device)
    except UserError as error:
        _fail(str(error))
    _echo_visible(f"wrote {len(files)} images and settings.json to {out}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A prepared-data or samples directory, or a saved model.")) -> None:
    """Summarise a prepared dataset (counts per split, rejects, shards) or a saved model."""
    from cxr_diffusion.data.shards import read_manifest
    from cxr_diffusion.errors import UserError
    from cxr_diffusion.sampling.sample import check_saved_model

    if (path / "model_index.json").is_file():
        fix = "retrain it (`dvc repro`, stage train@<branch>) or re-fetch the folder"
        try:  # as generate and sample check it: what inspect shows is what they would load
            check_saved_model(path)
        except UserError as error:
            _fail(str(error))
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
    try:  # as every stage checks it
        read_manifest(path)
    except UserError as error:
        _fail(str(error))
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
    from cxr_diffusion.evaluation.inception_conversion import convert_inception_weights
    from cxr_diffusion.io import atomic_path, give_plain_modes

    if flavour not in ("fid", "torchvision"):
        _fail(f"--flavour {flavour!r}: use 'fid' or 'torchvision'")
    if target.is_dir():
        _fail(f"{target} is a folder; give the path of the .safetensors file to write")
    if target.resolve() == source.resolve():
        _fail(f"{target} is the source itself: converting in place would replace the published weights; "
              f"give another path for the converted file")
    with atomic_path(target) as staged:  # checked before it replaces anything at target
        try:
            result = convert_inception_weights(source, staged, flavour)  # type: ignore[arg-type]
        except (FileNotFoundError, ValueError) as error:
            _fail(str(error))
        _check_finite_weights(staged, source)
        give_plain_modes([staged])
    param = "inception_weights" if flavour == "fid" else "reference_inception_weights"
    _echo_visible(f"wrote {target} ({result['tensors']} tensors, sha256 {result['target_sha256'][:12]}; "
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

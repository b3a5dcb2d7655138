"""The user's commands: `cxr-diffusion profile`, `cxr-diffusion inspect`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from cxr_diffusion.config import ParamsError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help="cxr-diffusion: synthetic chest X-ray research.")


@app.command()
def profile(
    name: str = typer.Argument(..., help="Profile in profiles/: default, tiny or nih-512."),
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


@app.command()
def inspect(path: Path = typer.Argument(..., help="A prepared-data directory (data/prepared).")) -> None:
    """Summarise a prepared dataset: counts per split, rejects, shards."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        typer.echo(f"error: {path} has no manifest.json; is it the output of the prepare stage?", err=True)
        raise typer.Exit(2)
    manifest = json.loads(manifest_path.read_text())
    typer.echo(f"{path}: {manifest['written']} images ({manifest['image_size']}px, classes {manifest['classes']})")
    for split, count in manifest["per_split"].items():
        typer.echo(f"  {split:5s} {count}")
    typer.echo(f"  rejected {manifest['rejected']}: {manifest['rejected_by_reason']}")
    typer.echo(f"  {len(manifest['shards'])} shards")


if __name__ == "__main__":
    app()

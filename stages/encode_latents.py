"""DVC stage `encode_latents`: VAE latents of every prepared image (a note only in pixel space)."""

from pathlib import Path

import typer

from cxr_diffusion.diffusion.latents import encode_latents
from cxr_diffusion.device import resolve_device
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    out: Path = typer.Option(..., help="Latent store."),
    metrics: Path = typer.Option(..., help="Count, shape, device and time."),
) -> None:
    run_stage("encode_latents", params,
              lambda p: print(encode_latents(p, prepared, out, metrics, device=resolve_device(p.device))),
              reads={"--prepared": prepared}, folders={"--out": out}, files={"--metrics": metrics},
              param_reads=lambda p: existing_paths({"train.vae": p.train.vae}))


if __name__ == "__main__":
    typer.run(main)

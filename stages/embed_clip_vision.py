"""DVC stage `embed_clip_vision`: one projected CLIP image embedding per prepared image."""

from pathlib import Path

import typer

from cxr_diffusion.conditioning.embed import embed_clip_vision
from cxr_diffusion.device import resolve_device
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    demo_clip: Path = typer.Option(..., help="The in-pipeline CLIP (used when clip.model is 'demo')."),
    out: Path = typer.Option(..., help="Condition store."),
    metrics: Path = typer.Option(..., help="Counts and speed."),
) -> None:
    run_stage("embed_clip_vision", params, lambda p: print(embed_clip_vision(prepared, p.clip, demo_clip, out, metrics,
                                                                            device=resolve_device(p.device))),
              reads={"--prepared": prepared, "--demo-clip": demo_clip}, folders={"--out": out},
              files={"--metrics": metrics}, param_reads=lambda p: existing_paths({"clip.model": p.clip.model}))


if __name__ == "__main__":
    typer.run(main)

"""DVC stage `embed_clip_text`: CLIP token embeddings of each image's findings prompt."""

from pathlib import Path

import typer

from cxr_diffusion.conditioning.embed import embed_clip_text
from cxr_diffusion.device import resolve_device
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    filtered: Path = typer.Option(..., help="Output of the filter stage."),
    demo_clip: Path = typer.Option(..., help="The in-pipeline CLIP (used when clip.model is 'demo')."),
    out: Path = typer.Option(..., help="Condition store."),
    metrics: Path = typer.Option(..., help="Counts."),
) -> None:
    run_stage("embed_clip_text", params, lambda p: print(embed_clip_text(filtered, p.clip, demo_clip, out, metrics,
                                                                        device=resolve_device(p.device))),
              reads={"--filtered": filtered, "--demo-clip": demo_clip}, folders={"--out": out},
              files={"--metrics": metrics}, param_reads=lambda p: existing_paths({"clip.model": p.clip.model}))


if __name__ == "__main__":
    typer.run(main)

"""DVC stage `elixr_standin`: a stand-in ELIXR snapshot (datasets.json + shards) from the in-pipeline CLIP, not ELIXR.

Writes only a note when elixr.path names real ELIXR-B files."""

from pathlib import Path

import typer

from cxr_diffusion.conditioning.elixr_standin import write_elixr_standin
from cxr_diffusion.device import resolve_device
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    demo_clip: Path = typer.Option(..., help="The in-pipeline CLIP."),
    out: Path = typer.Option(..., help="Stand-in ELIXR snapshot."),
) -> None:
    run_stage("elixr_standin", params,
              lambda p: print(write_elixr_standin(prepared, p.elixr, p.clip, demo_clip, out,
                                                   device=resolve_device(p.device))),
              reads={"--prepared": prepared, "--demo-clip": demo_clip}, folders={"--out": out},
              param_reads=lambda p: existing_paths({"clip.model": p.clip.model}))


if __name__ == "__main__":
    typer.run(main)

"""DVC stage `elixr_standin`: ELIXR-format HDF5 shards from the in-pipeline CLIP (a stand-in, not ELIXR).

Writes only a note when elixr.path names real ELIXR-B files."""

from pathlib import Path

import typer

from cxr_diffusion.conditioning.embed import write_elixr_standin
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Output of the prepare stage."),
    demo_clip: Path = typer.Option(Path("models/clip"), help="The in-pipeline CLIP."),
    out: Path = typer.Option(Path("data/elixr_standin"), help="Stand-in HDF5 shards."),
) -> None:
    run_stage("elixr_standin", params,
              lambda p: print(write_elixr_standin(prepared, p.elixr, p.clip, demo_clip, out)))


if __name__ == "__main__":
    typer.run(main)

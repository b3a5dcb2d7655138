"""DVC stage `sample@<branch>`: generate from the test conditions; write shards and figures."""

from pathlib import Path

import typer

from cxr_diffusion.branches import BRANCH_HELP
from cxr_diffusion.sampling.sample import sample_branch
from cxr_diffusion.stage import run_stage


def main(
    branch: str = typer.Option(..., help=BRANCH_HELP + "."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    model: Path = typer.Option(..., help="The branch's trained pipeline (output of its train stage)."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    store: Path = typer.Option(..., help="The branch's condition store (output of its embed stage)."),
    out: Path = typer.Option(..., help="Generated images (shards)."),
    figures: Path = typer.Option(..., help="Sample figures."),
    metrics: Path = typer.Option(..., help="Images, sampler settings and speed."),
) -> None:
    run_stage("sample", params,
              lambda p: print(sample_branch(p, branch, model, prepared, store, out, figures, metrics)),
              reads={"--model": model, "--prepared": prepared, "--store": store},
              folders={"--out": out, "--figures": figures}, files={"--metrics": metrics})


if __name__ == "__main__":
    typer.run(main)

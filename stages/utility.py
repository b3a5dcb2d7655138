"""DVC stage `utility@<branch>`: train on the branch's synthetic images, test on real ones."""

from pathlib import Path

import typer

from cxr_diffusion.branches import BRANCH_HELP
from cxr_diffusion.stage import run_stage
from cxr_diffusion.utility.study import branch_utility


def main(
    branch: str = typer.Option(..., help=BRANCH_HELP + "."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    model: Path = typer.Option(..., help="The branch's trained pipeline, which generates the synthetic set."),
    prepared: Path = typer.Option(..., help="The prepare stage's shards: the real train subset and test split."),
    filtered: Path = typer.Option(..., help="The filter stage's table: each test image's sex and age (subgroups)."),
    store: Path = typer.Option(..., help="The branch's condition store: the conditions of the train subset."),
    real: Path = typer.Option(..., help="The real-only arm (output of utility_real)."),
    out: Path = typer.Option(..., help="The synthetic training set (shards) and every arm's test probabilities."),
    figures: Path = typer.Option(..., help="The AUROC bar chart."),
    metrics: Path = typer.Option(..., help="Every arm's AUROC with intervals and its difference to the real arm."),
) -> None:
    run_stage("utility", params,
              lambda p: print(branch_utility(p, branch, model, prepared, filtered, store, real, out, figures, metrics)),
              reads={"--model": model, "--prepared": prepared, "--filtered": filtered, "--store": store, "--real": real},
              folders={"--out": out, "--figures": figures}, files={"--metrics": metrics})


if __name__ == "__main__":
    typer.run(main)

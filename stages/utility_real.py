"""DVC stage `utility_real`: the real-only arm of the utility study (N real train images), trained once."""

from pathlib import Path

import typer

from cxr_diffusion.stage import run_stage
from cxr_diffusion.utility.real_arm import train_real_arm


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    out: Path = typer.Option(..., help="The real-only arm: its train subset and its real test probabilities."),
) -> None:
    run_stage("utility_real", params, lambda p: print(train_real_arm(p, prepared, out)), reads={"--prepared": prepared},
              folders={"--out": out})


if __name__ == "__main__":
    typer.run(main)

"""DVC stage `prepare`: decode and resize the filtered images into Parquet shards."""

from pathlib import Path

import typer

from cxr_diffusion.data.prepare import prepare_shards
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    dataset: Path = typer.Option(..., help="Output of the dataset stage."),
    filtered: Path = typer.Option(..., help="Output of the filter stage."),
    out: Path = typer.Option(..., help="Output directory."),
    metrics: Path = typer.Option(..., help="Counts (DVC metrics)."),
) -> None:
    run_stage("prepare", params, lambda p: prepare_shards(p, dataset, filtered, out, metrics),
              reads={"--dataset": dataset, "--filtered": filtered}, folders={"--out": out}, files={"--metrics": metrics})


if __name__ == "__main__":
    typer.run(main)

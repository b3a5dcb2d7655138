"""DVC stage `filter`: select images, make multi-hot labels and patient-level splits."""

from pathlib import Path

import typer

from cxr_diffusion.data.filter import run_filter
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    dataset: Path = typer.Option(..., help="Output of the dataset stage."),
    out: Path = typer.Option(..., help="Output directory."),
    metrics: Path = typer.Option(..., help="Counts per rule, class and split."),
) -> None:
    def body(p):
        result = run_filter(dataset, p.filter, p.seed, out, metrics)
        print(f"filter: {result.metrics['rows_in']} rows in, {result.metrics['kept']} kept, "
              f"{len(result.rejects)} rejected (see {out / 'rejects.csv'})")

    run_stage("filter", params, body, reads={"--dataset": dataset}, folders={"--out": out}, files={"--metrics": metrics},
              param_reads=lambda p: existing_paths({"filter.include_list": p.filter.include_list}))


if __name__ == "__main__":
    typer.run(main)

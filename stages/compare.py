"""DVC stage `compare`: metrics/summary.json (every branch, every metric) and reports/report.md."""

from pathlib import Path

import typer

from cxr_diffusion.evaluation.report import compare
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    summary: Path = typer.Option(..., help="One entry per branch."),
    report: Path = typer.Option(..., help="Table and figures."),
) -> None:
    run_stage("compare", params, lambda p: print(compare(p, summary, report)))


if __name__ == "__main__":
    typer.run(main)

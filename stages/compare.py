"""DVC stage `compare`: metrics/summary.json (every branch, every metric) and reports/report.md."""

from pathlib import Path

import typer

from cxr_diffusion.evaluation.report import ReportInputs, compare
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    evaluations: Path = typer.Option(..., help="The evaluate stages' metrics folder (<branch>.json)."),
    evaluator: Path = typer.Option(..., help="The evaluator's metrics (test AUROC)."),
    sampling: Path = typer.Option(..., help="The sample stages' metrics folder (<branch>.json)."),
    training: Path = typer.Option(..., help="The train stages' DVCLive folder (<branch>/metrics.json)."),
    utility: Path = typer.Option(..., help="The utility stages' metrics folder (<branch>.json)."),
    reader_study: Path = typer.Option(..., help="The score_reader_study stage's metrics."),
    elixr_embedding: Path = typer.Option(..., help="The embed_elixr stage's metrics (real ELIXR or a stand-in)."),
    summary: Path = typer.Option(..., help="One entry per branch."),
    report: Path = typer.Option(..., help="Table and figures."),
    training_curves: Path = typer.Option(..., help="The figure of every branch's losses and conditioning gap."),
) -> None:
    inputs = ReportInputs(evaluations, evaluator, sampling, training, utility, reader_study, elixr_embedding)
    run_stage("compare", params, lambda p: print(compare(p, inputs, summary, report, training_curves)),
              reads={"--evaluations": evaluations, "--evaluator": evaluator, "--sampling": sampling,
                     "--training": training, "--utility": utility, "--reader-study": reader_study,
                     "--elixr-embedding": elixr_embedding},
              files={"--summary": summary, "--report": report, "--training-curves": training_curves})


if __name__ == "__main__":
    typer.run(main)

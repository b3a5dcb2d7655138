"""DVC stage `evaluator`: train the shared CXR classifier on the real train split."""

from pathlib import Path

import typer

from cxr_diffusion.evaluation.evaluator import train_evaluator
from cxr_diffusion.device import resolve_device
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    out: Path = typer.Option(..., help="Classifier (safetensors + config.json)."),
    metrics: Path = typer.Option(..., help="Its own test AUROC per class."),
) -> None:
    run_stage("evaluator", params, lambda p: print(train_evaluator(prepared, p.evaluator, p.seed, out, metrics,
                                                                         device=resolve_device(p.device))),
              reads={"--prepared": prepared}, folders={"--out": out}, files={"--metrics": metrics})


if __name__ == "__main__":
    typer.run(main)

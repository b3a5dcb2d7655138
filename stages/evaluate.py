"""DVC stage `evaluate@<branch>`: closeness, faithfulness, diversity and memorization of the generations."""

from pathlib import Path

import typer

from cxr_diffusion.branches import BRANCH_HELP
from cxr_diffusion.evaluation.evaluate import EvaluatePaths, evaluate_branch
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    branch: str = typer.Option(..., help=BRANCH_HELP + "."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    evaluator: Path = typer.Option(..., help="The shared evaluator (output of the evaluator stage)."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    samples: Path = typer.Option(..., help="The branch's generations (output of its sample stage)."),
    model: Path = typer.Option(..., help="The branch's trained pipeline (architecture of the untrained baseline)."),
    store: Path = typer.Option(..., help="The branch's condition store (conditions of the untrained baseline)."),
    figures: Path = typer.Option(..., help="Figures: PCA of the features, generations closest to a training image."),
    metrics: Path = typer.Option(..., help="Every metric of the branch (JSON)."),
) -> None:
    paths = EvaluatePaths(evaluator=evaluator, prepared=prepared, samples=samples, model=model, store=store,
                          figures=figures, metrics=metrics)

    def body(p):
        result = evaluate_branch(p, branch, paths)
        print({k: result[k] for k in ("branch", "generated", "seconds")})

    run_stage("evaluate", params, body, reads={"--evaluator": evaluator, "--prepared": prepared, "--samples": samples,
                                               "--model": model, "--store": store},
              folders={"--figures": figures}, files={"--metrics": metrics},
              param_reads=lambda p: existing_paths({f"evaluate.{key}": getattr(p.evaluate, key) for key in (
                  "inception_weights", "reference_inception_weights", "xrv_weights", "raddino")}))


if __name__ == "__main__":
    typer.run(main)

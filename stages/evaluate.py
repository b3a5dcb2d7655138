"""DVC stage `evaluate@<branch>`: closeness, faithfulness, diversity and memorization of the generations."""

from pathlib import Path

import typer

from cxr_diffusion.evaluation.evaluate import evaluate_branch
from cxr_diffusion.stage import run_stage


def main(
    branch: str = typer.Option(..., help="clip_text, clip_vision or elixr."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    def body(p):
        result = evaluate_branch(p, branch, Path("models/evaluator"), Path("data/prepared"), Path("data/samples") / branch,
                                 Path("models") / branch, Path("data/embeddings") / branch,
                                 Path("reports/evaluate") / branch, Path("metrics/evaluate") / f"{branch}.json")
        print({k: result[k] for k in ("branch", "generated", "seconds")})

    run_stage("evaluate", params, body)


if __name__ == "__main__":
    typer.run(main)

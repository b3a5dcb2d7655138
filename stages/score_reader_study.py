"""DVC stage `score_reader_study`: the readers' exported answers scored against the key (metrics/reader_study.json)."""

from pathlib import Path

import typer

from cxr_diffusion.io import write_json
from cxr_diffusion.reader_study.scoring import score_responses
from cxr_diffusion.stage import run_stage


def score(responses: Path, key: Path, kit: Path, metrics: Path) -> str:
    result = score_responses(responses, key, kit)
    write_json(metrics, result)
    if result["readers"] == 0:
        return f"score_reader_study: no accepted responses in {responses} ({len(result['rejects'])} rejected)"
    call = result["pooled"]["call"]
    accuracy = "n/a (no answers)" if call["accuracy"] is None else \
        f"{call['accuracy']:.3f} [{call['ci95'][0]:.3f}, {call['ci95'][1]:.3f}] over {call['n']} answers"
    return (f"score_reader_study: {result['readers']} reader(s), {len(result['rejects'])} file(s) rejected; pooled "
            f"real-vs-synthetic accuracy {accuracy} -> {metrics}")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    responses: Path = typer.Option(..., help="Folder of the readers' exported JSON files."),
    key: Path = typer.Option(..., help="The reader_study stage's answer key."),
    kit: Path = typer.Option(..., help="The reader_study stage's kit (named in the how-to when no answers are in)."),
    metrics: Path = typer.Option(..., help="Per reader and pooled metrics (JSON)."),
) -> None:
    run_stage("score_reader_study", params, lambda _: print(score(responses, key, kit, metrics)),
              reads={"--responses": responses, "--key": key, "--kit": kit}, files={"--metrics": metrics})


if __name__ == "__main__":
    typer.run(main)

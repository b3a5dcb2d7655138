"""DVC stage `sample@<branch>`: generate from the test conditions; write shards and figures."""

from pathlib import Path

import typer

from cxr_diffusion.sampling.sample import sample_branch
from cxr_diffusion.stage import run_stage


def main(
    branch: str = typer.Option(..., help="clip_text, clip_vision or elixr."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    run_stage("sample", params, lambda p: print(sample_branch(
        p, branch, Path("models") / branch, Path("data/prepared"), Path("data/embeddings") / branch,
        Path("data/samples") / branch, Path("reports/samples") / branch, Path("metrics/sample") / f"{branch}.json")))


if __name__ == "__main__":
    typer.run(main)

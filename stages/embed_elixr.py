"""DVC stage `embed_elixr`: read ELIXR files (published snapshot, older shards), join them to the filtered images."""

from pathlib import Path

import typer

from cxr_diffusion.conditioning.elixr import build_elixr_store
from cxr_diffusion.config import changed
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    filtered: Path = typer.Option(..., help="Output of the filter stage."),
    standin: Path = typer.Option(..., help="Stand-in snapshot, read when elixr.path is null."),
    out: Path = typer.Option(..., help="Condition store."),
    rejects: Path = typer.Option(..., help="Images without a usable embedding."),
    metrics: Path = typer.Option(..., help="Counts."),
) -> None:
    def body(p):
        # With no elixr.path, the stand-in's files go through the very same reader, labelled as a stand-in.
        config, label = (p.elixr, "elixr") if p.elixr.path else (changed(p.elixr, path=str(standin)), "elixr_standin")
        print(build_elixr_store(filtered, config, out, rejects, metrics, label))

    run_stage("embed_elixr", params, body, reads={"--filtered": filtered, "--standin": standin},
              folders={"--out": out}, files={"--rejects": rejects, "--metrics": metrics},
              param_reads=lambda p: {"elixr.path": Path(p.elixr.path) if p.elixr.path else None})


if __name__ == "__main__":
    typer.run(main)

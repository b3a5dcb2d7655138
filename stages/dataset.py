"""DVC stage `dataset`: render the phantom or index a real NIH ChestX-ray14 download."""

from pathlib import Path

import typer

from cxr_diffusion.data.sources import build_dataset
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    out: Path = typer.Option(..., help="Output directory."),
    metrics: Path = typer.Option(..., help="Counts (DVC metrics)."),
) -> None:
    run_stage("dataset", params, lambda p: print(build_dataset(p, out, metrics)), folders={"--out": out},
              files={"--metrics": metrics}, param_reads=lambda p: {
                  "dataset.nih_root": Path(p.dataset.nih_root) if p.dataset.source == "nih" and p.dataset.nih_root
                  else None})


if __name__ == "__main__":
    typer.run(main)

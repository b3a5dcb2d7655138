"""DVC stage `reader_study`: the blinded kit readers open in a browser, and its answer key kept outside it."""

from pathlib import Path

import typer

from cxr_diffusion.reader_study.build import build_study_kit
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage (its test split gives the real images)."),
    samples: Path = typer.Option(..., help="The sample stages' folder (<branch>/ per branch)."),
    kit: Path = typer.Option(..., help="The kit folder handed to readers (index.html, images, manifest)."),
    key: Path = typer.Option(..., help="The answer key (JSON), outside the kit."),
    archive: Path = typer.Option(..., help="The kit as a zip to hand out (images stored uncompressed)."),
) -> None:
    run_stage("reader_study", params, lambda p: print(build_study_kit(p, prepared, samples, kit, key, archive)),
              reads={"--prepared": prepared, "--samples": samples}, folders={"--kit": kit},
              files={"--key": key, "--archive": archive})


if __name__ == "__main__":
    typer.run(main)

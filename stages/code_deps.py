"""DVC stage `code_deps`: the project modules each stage entry point runs, with their hashes (code_deps/<entry>.json)."""

from pathlib import Path

import typer

from cxr_diffusion.code_closure import PACKAGE, write_code_deps
from cxr_diffusion.errors import UserError
from cxr_diffusion.stage import run_stage


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    package: Path = typer.Option(..., help=f"The {PACKAGE} package folder (src/{PACKAGE})."),
    entries: Path = typer.Option(..., help="The folder of stage entry points (stages/)."),
    out: Path = typer.Option(..., help="One <entry>.json per entry point."),
) -> None:
    def body(_):
        if package.name != PACKAGE or not (package / "__init__.py").is_file():
            raise UserError(f"{package}: not the {PACKAGE} package folder (no __init__.py); pass --package "
                            f"src/{PACKAGE}")
        written = write_code_deps(package.parent, entries, out)
        print(f"code_deps: the module closures of {len(written)} entry points in {out}")

    run_stage("code_deps", params, body, reads={"--package": package, "--entries": entries}, folders={"--out": out})


if __name__ == "__main__":
    typer.run(main)

"""DVC stage `train@<branch>`: train one conditional diffusion model (resumes from its checkpoints)."""

from pathlib import Path

import typer

from cxr_diffusion.branches import BRANCH_HELP
from cxr_diffusion.conditioning.clip import clip_source
from cxr_diffusion.diffusion.run_plan import TrainingError
from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    branch: str = typer.Option(..., help=BRANCH_HELP + "."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    store: Path = typer.Option(..., help="The branch's condition store (output of its embed stage)."),
    demo_clip: Path = typer.Option(..., help="The in-pipeline CLIP (when clip.model is 'demo')."),
    latents: Path = typer.Option(..., help="Output of the encode_latents stage (read when train.space is 'latent')."),
    out: Path = typer.Option(..., help="The trained pipeline (EMA weights)."),
    checkpoints: Path = typer.Option(..., help="Training state to resume from (scratch, not a DVC output)."),
    live: Path = typer.Option(..., help="DVCLive folder: metrics, loss curves, sample grids."),
) -> None:
    def body(p):
        if branch not in p.branches:
            raise TrainingError(f"branch '{branch}' is not in params 'branches' {list(p.branches)}")
        paths = TrainPaths(prepared=prepared, store=store, clip=clip_source(p.clip, demo_clip), model_out=out,
                           checkpoints=checkpoints, live=live, latents=latents if p.train.space == "latent" else None)
        print(train_branch(p, branch, paths))

    run_stage("train", params, body, reads={"--prepared": prepared, "--store": store, "--demo-clip": demo_clip,
                                             "--latents": latents},
              folders={"--out": out, "--checkpoints": checkpoints, "--live": live},
              param_reads=lambda p: existing_paths({"clip.model": p.clip.model, "train.vae": p.train.vae}))


if __name__ == "__main__":
    typer.run(main)

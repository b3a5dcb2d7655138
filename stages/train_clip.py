"""DVC stage `train_clip`: train the in-pipeline CLIP (only when clip.model is 'demo')."""

from pathlib import Path

import typer

from cxr_diffusion.conditioning.demo_clip import train_demo_clip
from cxr_diffusion.device import resolve_device
from cxr_diffusion.stage import run_stage
from cxr_diffusion.stage_paths import existing_paths


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    prepared: Path = typer.Option(..., help="Output of the prepare stage."),
    out: Path = typer.Option(..., help="Saved CLIP (save_pretrained)."),
    metrics: Path = typer.Option(..., help="Validation retrieval and zero-shot metrics."),
) -> None:
    def body(p):
        result = train_demo_clip(prepared, p.clip, list(p.filter.classes), p.filter.class_members(), p.seed, out, metrics,
                                 device=resolve_device(p.device))
        print({k: v for k, v in result.items() if k != "zero_shot_auroc"})

    run_stage("train_clip", params, body, reads={"--prepared": prepared}, folders={"--out": out}, files={"--metrics": metrics},
              param_reads=lambda p: existing_paths({"clip.model": p.clip.model}))


if __name__ == "__main__":
    typer.run(main)

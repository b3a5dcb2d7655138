"""The package works as `pip install .` installs it, not only from this checkout: no source-tree path is read at
run time. The package is built into a folder of its own (non-editable) and `generate --reference`, which reads
the default profile's decode settings, runs from a working directory outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_diffusion.diffusion.condition import ConditionAdapter
from cxr_diffusion.diffusion.noise import training_scheduler
from cxr_diffusion.diffusion.denoiser import Denoiser
from cxr_diffusion.diffusion.export import save_pipeline
from cxr_diffusion.diffusion.trainer import TrainPaths
from cxr_diffusion.diffusion.unet import build_unet

from conftest import REPO, gradient_image
from test_trainer import tiny_params

SOURCES = ("pyproject.toml", "README.md", "src")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package installed from a copy of the source tree (no .git, no build leftovers) into its own folder."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, cwd=root)
    return target


def run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A Python process whose `cxr_diffusion` is the installed copy (PYTHONPATH comes before the editable one)."""
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_package_is_not_the_checkout_and_ships_its_data(installed, tmp_path):
    result = run_installed(installed, tmp_path, "-c", "import cxr_diffusion, cxr_diffusion.profiles as p; "
                                                      "print(cxr_diffusion.__file__); print(p.profile_names())")
    assert result.returncode == 0, result.stderr
    module, names = result.stdout.splitlines()
    assert Path(module).is_relative_to(installed) and not Path(module).is_relative_to(REPO)
    assert names == "['default', 'nih-512', 'rehearsal', 'tiny']"
    page = installed / "cxr_diffusion" / "reader_study" / "page"
    assert sorted(p.suffix for p in page.iterdir()) == [".css", ".html", ".js"]


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory, tiny_clip_dir) -> Path:
    """A clip_vision model (untrained weights) saved by the train stage's own saver, with the demo CLIP's vision tower."""
    params = tiny_params()
    dim = 8  # tiny_clip_dir's projection_dim: a clip_vision condition is its (1, 8) image embedding
    torch.manual_seed(0)
    model = Denoiser(build_unet(params.train.unet, params.image_size, params.channels, dim),
                     ConditionAdapter(tokens=1, dim=dim, out_tokens=params.train.condition_tokens, out_dim=dim))
    root = tmp_path_factory.mktemp("vision-model")
    paths = TrainPaths(prepared=root, store=root, clip=tiny_clip_dir, model_out=root / "model",
                       checkpoints=root / "checkpoints", live=root / "live")
    return save_pipeline(params, "clip_vision", model, training_scheduler(params.train), paths.model_out, paths.clip)


def test_generate_with_a_reference_image_runs_from_outside_the_checkout(installed, vision_model, tmp_path):
    reference = tmp_path / "reference.png"
    Image.fromarray(gradient_image((96, 80))).save(reference)  # above prepare.min_side (64)
    out = tmp_path / "generated"
    result = run_installed(installed, tmp_path, "-c", "from cxr_diffusion.cli import main; main()", "generate",
                           str(vision_model), "--reference", str(reference), "--num-images", "2", "--steps", "2",
                           "--out", str(out), "--device", "cpu", "--guidance-scale", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    images = sorted(out.glob("*.png"))
    assert len(images) == 2 and (out / "settings.json").is_file()
    assert np.asarray(Image.open(images[0])).shape[:2] == (16, 16)

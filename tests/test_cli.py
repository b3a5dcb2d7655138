"""The user's commands: generate from a saved model, inspect, switch profile."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cxr_diffusion.cli import app
from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

from conftest import make_training_data
from test_trainer import tiny_params

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_training_data(root / "data")
    paths = TrainPaths(data["prepared"], data["store"], None, root / "model", root / "checkpoints", root / "live")
    train_branch(tiny_params(train={"max_steps": 2}), "elixr", paths)
    return root / "model"


def test_generate_writes_pngs_and_a_settings_sidecar(model_dir, tmp_path):
    np.save(tmp_path / "embedding.npy", np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32))
    result = runner.invoke(app, ["generate", str(model_dir), "--embedding", str(tmp_path / "embedding.npy"),
                                 "--num-images", "2", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["seed"] == 3 and settings["branch"] == "elixr" and len(settings["files"]) == 2
    assert all((tmp_path / "out" / name).is_file() for name in settings["files"])


def test_generate_with_the_wrong_kind_of_input_names_the_right_one(model_dir):
    result = runner.invoke(app, ["generate", str(model_dir), "--prompt", "chest x-ray showing effusion"])
    assert result.exit_code == 2
    assert "holds a model of branch 'elixr': give --embedding" in result.output


def test_generate_with_a_wrong_embedding_shape_is_a_clear_error(model_dir, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((32, 768), dtype=np.float32))
    result = runner.invoke(app, ["generate", str(model_dir), "--embedding", str(tmp_path / "wrong.npy")])
    assert result.exit_code == 2 and "embedding must be (4, 8)" in result.output


def test_generate_refuses_a_directory_that_is_not_a_model(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 2 and "not a saved model" in result.output


def test_generate_rejects_a_pickled_npy(model_dir, tmp_path):
    np.save(tmp_path / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    result = runner.invoke(app, ["generate", str(model_dir), "--embedding", str(tmp_path / "object.npy")])
    assert result.exit_code == 2 and "not a plain numeric .npy" in result.output


def test_inspect_describes_a_model(model_dir):
    result = runner.invoke(app, ["inspect", str(model_dir)])
    assert result.exit_code == 0 and "elixr model" in result.output and "condition (4, 8)" in result.output


def test_profile_switch_rejects_an_unknown_profile(tmp_path):
    result = runner.invoke(app, ["profile", "huge", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "no profile 'huge'" in result.output and "available: default, nih-512" in result.output
    assert not (tmp_path / "params.yaml").exists()


@pytest.mark.parametrize("name", ["default", "tiny", "nih-512", "rehearsal"])
def test_profile_writes_the_merged_params_with_comments(tmp_path, name):
    import yaml

    from cxr_diffusion.profiles import FOLDER, profile_data

    result = runner.invoke(app, ["profile", name, "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(text) == profile_data(name)
    if name == "default":
        assert text == (FOLDER / "default.yaml").read_text()
    else:
        assert text.startswith((FOLDER / f"{name}.yaml").read_text().splitlines()[0])
        assert f"written by `cxr-diffusion profile {name}`" in text
        assert "# one seed for sampling, splits, caps and training" in text  # the default's comments stay

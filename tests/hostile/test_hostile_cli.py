"""The console entry point: a user error raised anywhere below a command is one line and exit 2."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cxr_diffusion.cli as cli
from cxr_diffusion.params_file import read_params_file
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.errors import user_error_line
from cxr_diffusion.profiles import FOLDER, profile_data
from cxr_diffusion.stage import run_stage

from conftest import cli_refusal as refusal, write_profile

runner = CliRunner()


def _raising(error: Exception):
    def app(standalone_mode: bool = True) -> None:
        raise error
    return app


def test_a_user_error_escaping_a_command_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "app", _raising(DataError("metadata.csv: line 3 has 12 fields\nbut the header has 11")))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: metadata.csv: line 3 has 12 fields but the header has 11\n"


def test_a_full_disk_under_a_command_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "app", _raising(OSError(errno.ENOSPC, "No space left on device", "generated/x.png")))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: no space left on the device writing generated/x.png;")


def test_a_bug_under_a_command_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "app", _raising(KeyError("latent_shape")))
    with pytest.raises(KeyError):
        cli.main()


# --- one error-to-line helper for `cxr-diffusion` and every stage ------------------------------------------------


@pytest.mark.parametrize("error, line", [
    (DataError("metadata.csv: line 3 has 12 fields\nbut the header has 11"),
     "metadata.csv: line 3 has 12 fields but the header has 11"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "data/filtered.csv"),
     "data/filtered.csv: no such file; run the stages before this one (dvc repro)"),
    (OSError(errno.EACCES, "Permission denied", "models/x"),
     "permission denied on models/x: Permission denied; check the permissions of that file or folder and rerun"),
    (KeyError("latent_shape"), None),
    (OSError(errno.EIO, "Input/output error", "x"), None),
])
def test_one_helper_turns_a_user_error_into_one_line_and_leaves_bugs(error, line):
    assert user_error_line(error) == line


def test_a_missing_file_under_a_command_is_the_same_line_as_under_a_stage(monkeypatch, capsys, tmp_path):
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "data/prepared/manifest.json")
    monkeypatch.setattr(cli, "app", _raising(missing))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    command_line = capsys.readouterr().err
    (tmp_path / "params.yaml").write_text(json.dumps(read_params_file(FOLDER / "default.yaml")))
    with pytest.raises(SystemExit):
        run_stage("sample", tmp_path / "params.yaml", _raising_body(missing))
    stage_line = capsys.readouterr().err
    assert command_line == "error: data/prepared/manifest.json: no such file; run the stages before this one (dvc repro)\n"
    assert stage_line == "stage sample failed: " + command_line.removeprefix("error: ")


def _raising_body(error: Exception):
    def body(params) -> None:
        raise error
    return body


# --- `cxr-diffusion profile`: every key of the merged params checked, names only among the shipped profiles ---------


PROFILES = FOLDER  # the shipped profiles


def overlay_root(tmp_path: Path, **sections) -> tuple[Path, Path]:
    """A repository root and an overlay file of the user's own holding ``sections`` (JSON is YAML)."""
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(json.dumps(sections))
    (tmp_path / "params.yaml").write_text("# the active params, untouched by a refused profile\n")
    return tmp_path, overlay


@pytest.mark.parametrize("sections, fragment", [
    ({"dataset": {"source": "nih", "nih_root": None}, "prepare": {"shard_size": -1}},
     "params: 'prepare.shard_size' is -1"),
    ({"dataset": {"source": "nih", "nih_root": ""}, "sample": {"steps": 0}}, "params: 'sample.steps' is 0"),
    ({"dataset": {"source": "nih", "nih_root": ["a"]}}, "params: 'dataset.nih_root' is ['a']; expected a string"),
    ({"dataset": {"source": "nih", "nih_rot": "/data"}}, "params: unknown key 'dataset.nih_rot'"),
    ({"extends": "nowhere"}, "params: 'extends' is 'nowhere'; it must name a shipped profile"),
    ({"extends": ["tiny"]}, "params: 'extends' is ['tiny']; it must name a shipped profile"),
])
def test_profile_checks_every_key_of_a_users_overlay(tmp_path, sections, fragment):
    root, overlay = overlay_root(tmp_path, **sections)
    line = refusal(runner.invoke(cli.app, ["profile", str(overlay), "--root", str(root)]))
    assert line.startswith(f"error: {fragment}") and line.endswith(f"(in {overlay})"), line
    assert (root / "params.yaml").read_text().startswith("# the active params")


def test_profile_installs_an_overlay_whose_nih_root_is_left_to_fill_in(tmp_path):
    root, overlay = overlay_root(tmp_path, extends="nih-512", dataset={"nih_root": None})
    result = runner.invoke(cli.app, ["profile", str(overlay), "--root", str(root)])
    assert result.exit_code == 0, result.output
    merged = read_params_file(root / "params.yaml")
    assert merged["dataset"] == {**profile_data("nih-512")["dataset"], "nih_root": None}
    assert merged["train"] == profile_data("nih-512")["train"]


@pytest.mark.parametrize("name", ["../outside", "{root}/outside", "sub/inner", "default.yaml.bak"])
def test_profile_takes_a_shipped_name_or_an_existing_yaml_file(tmp_path, name):
    shutil.copyfile(PROFILES / "default.yaml", tmp_path / "outside")  # valid, but neither a name nor a .yaml path
    name = name.format(root=tmp_path)
    line = refusal(runner.invoke(cli.app, ["profile", name, "--root", str(tmp_path)]))
    assert line == f"error: no profile '{name}' among {PROFILES}; available: default, nih-512, rehearsal, tiny"
    assert not (tmp_path / "params.yaml").exists()


def test_profile_refuses_a_missing_yaml_path(tmp_path):
    line = refusal(runner.invoke(cli.app, ["profile", str(tmp_path / "gone.yaml"), "--root", str(tmp_path)]))
    assert line == f"error: profile {tmp_path / 'gone.yaml'} does not exist"


# --- `cxr-diffusion standins --seed`: the params' range --------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_standins_bounds_the_seed_as_the_params_do(tmp_path, seed):
    write_profile("tiny", tmp_path)
    line = refusal(runner.invoke(cli.app, ["standins", "--root", str(tmp_path), "--seed", str(seed)]))
    assert line == f"error: --seed {seed}: must be at least 0 and below 2**32 (4294967296), as the params' seed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]

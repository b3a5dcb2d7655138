"""The console entry point: a user error raised anywhere below a command is one line and exit 2."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cxr_diffusion.cli as cli
from cxr_diffusion.config import read_params_file
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.errors import user_error_line
from cxr_diffusion.stage import run_stage

from conftest import cli_refusal as refusal

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
    (tmp_path / "params.yaml").write_text(json.dumps(read_params_file(PROFILES / "default.yaml")))
    with pytest.raises(SystemExit):
        run_stage("sample", tmp_path / "params.yaml", _raising_body(missing))
    stage_line = capsys.readouterr().err
    assert command_line == "error: data/prepared/manifest.json: no such file; run the stages before this one (dvc repro)\n"
    assert stage_line == "stage sample failed: " + command_line.removeprefix("error: ")


def _raising_body(error: Exception):
    def body(params) -> None:
        raise error
    return body


# --- `cxr-diffusion profile`: every key checked, only the profiles in profiles/ ------------------------------------


PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def profile_root(tmp_path: Path, **sections) -> Path:
    """A repository root whose profiles/bad.yaml is the default profile with ``sections`` laid over it (JSON is YAML)."""
    data = read_params_file(PROFILES / "default.yaml")
    for section, values in sections.items():
        data[section] = {**data[section], **values} if isinstance(values, dict) else values
    for key, value in sections.get("dataset", {}).items():
        if value is _DROP:
            del data["dataset"][key]
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad.yaml").write_text(json.dumps(data))
    (tmp_path / "params.yaml").write_text("# the active params, untouched by a refused profile\n")
    return tmp_path


_DROP = object()


@pytest.mark.parametrize("sections, fragment", [
    ({"dataset": {"source": "nih", "nih_root": None}, "prepare": {"shard_size": -1}},
     "params: 'prepare.shard_size' is -1"),
    ({"dataset": {"source": "nih", "nih_root": ""}, "sample": {"steps": 0}}, "params: 'sample.steps' is 0"),
    ({"dataset": {"source": "nih", "nih_root": ["a"]}}, "params: 'dataset.nih_root' is ['a']; expected a string"),
    ({"dataset": {"source": "nih", "nih_root": _DROP}}, "params: 'dataset.nih_root' is missing"),
])
def test_profile_checks_every_key_of_a_profile_for_the_nih_download(tmp_path, sections, fragment):
    root = profile_root(tmp_path, **sections)
    line = refusal(runner.invoke(cli.app, ["profile", "bad", "--root", str(root)]))
    assert line.startswith(f"error: {fragment}") and line.endswith(f"(in {root / 'profiles' / 'bad.yaml'})")
    assert (root / "params.yaml").read_text().startswith("# the active params")


def test_profile_installs_a_profile_whose_nih_root_is_left_to_fill_in(tmp_path):
    root = profile_root(tmp_path, dataset={"source": "nih", "nih_root": None})
    result = runner.invoke(cli.app, ["profile", "bad", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "params.yaml").read_text() == (root / "profiles" / "bad.yaml").read_text()


@pytest.mark.parametrize("name", ["../outside", "{root}/outside", "sub/inner"])
def test_profile_accepts_only_the_names_of_files_in_profiles(tmp_path, name):
    (tmp_path / "profiles" / "sub").mkdir(parents=True)
    shutil.copyfile(PROFILES / "default.yaml", tmp_path / "profiles" / "default.yaml")
    shutil.copyfile(PROFILES / "default.yaml", tmp_path / "outside.yaml")  # valid, but not a profile
    shutil.copyfile(PROFILES / "default.yaml", tmp_path / "profiles" / "sub" / "inner.yaml")
    name = name.format(root=tmp_path)
    line = refusal(runner.invoke(cli.app, ["profile", name, "--root", str(tmp_path)]))
    assert line == f"error: no profile '{name}' in {tmp_path / 'profiles'}; available: default"
    assert not (tmp_path / "params.yaml").exists()


# --- `cxr-diffusion standins --seed`: the params' range --------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_standins_bounds_the_seed_as_the_params_do(tmp_path, seed):
    shutil.copyfile(PROFILES / "tiny.yaml", tmp_path / "params.yaml")
    line = refusal(runner.invoke(cli.app, ["standins", "--root", str(tmp_path), "--seed", str(seed)]))
    assert line == f"error: --seed {seed}: must be at least 0 and below 2**32 (4294967296), as the params' seed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]

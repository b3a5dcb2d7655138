"""The console entry point: a user error raised anywhere below a command is one line and exit 2."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import cxr_diffusion.cli as cli
from cxr_diffusion.params_file import read_params_file
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.errors import user_error_line
from cxr_diffusion.profiles import FOLDER, profile_data
from cxr_diffusion.stage import run_stage

from conftest import REPO, cli_refusal as refusal, write_profile

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


# --- strings from the user's files reach the error line escaped -------------------------------------------------
# A message quotes ids, names and file names of a download; printed as they are, a terminal sequence in them
# retitles, clears or recolours the terminal of whoever runs the stage. Shown as \u.... escapes instead.

ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"  # sets the terminal title, clears the screen, turns the text red
SHOWN = "\\u001b]0;pwned\\u0007\\u001b[2J\\u001b[31m"


@pytest.mark.parametrize("hidden, shown", [
    (ESC, SHOWN),
    ("\x9b2J", "\\u009b2J"),  # the one-byte (C1) form of ESC [
    ("\u202egp.", "\\u202egp."),  # a right-to-left override: what follows displays reversed, as another name
    ("\x00", "\\u0000"),
], ids=["osc_csi", "c1_csi", "bidi_override", "nul"])
def test_hidden_characters_in_a_user_error_are_shown_escaped(hidden, shown):
    error = DataError(f"snap/img_emb_1{hidden}.h5: not a readable HDF5 file; remove it")
    assert user_error_line(error) == f"snap/img_emb_1{shown}.h5: not a readable HDF5 file; remove it"


def test_a_command_and_a_stage_show_a_missing_files_escapes_escaped(monkeypatch, capsys, tmp_path):
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", f"snap/img_emb_1{ESC}.h5")
    monkeypatch.setattr(cli, "app", _raising(missing))
    with pytest.raises(SystemExit):
        cli.main()
    (tmp_path / "params.yaml").write_text(json.dumps(read_params_file(FOLDER / "default.yaml")))
    with pytest.raises(SystemExit):
        run_stage("embed_elixr", tmp_path / "params.yaml", _raising_body(missing))
    line = f"snap/img_emb_1{SHOWN}.h5: no such file; run the stages before this one (dvc repro)\n"
    assert capsys.readouterr().err == f"error: {line}stage embed_elixr failed: {line}"


IMAGES = ["00000001_000.png", "00000002_000.png"]
ROW = [4, 8]
IDS_FEATURE = {"Image Index": {"dtype": "bytes", "shape": []}}


def elixr_snapshot(root: Path, ids: list[str], datasets: dict | None = None) -> Path:
    """An ELIXR snapshot at ``root``: datasets.json (``datasets`` or the one the params read) and one shard."""
    datasets = datasets or {"elixrb": {"img_emb": {"type": "dataset", "features": {
        "img_emb": {"dtype": "float32", "shape": ROW}, **IDS_FEATURE}}}}
    root.mkdir(parents=True)
    (root / "datasets.json").write_text(json.dumps({"info": {}, "datasets": datasets}))
    shard = root / "elixrb" / "img_emb" / "img_emb_1.h5"
    shard.parent.mkdir(parents=True)
    with h5py.File(shard, "w") as handle:
        handle["Image Index"] = np.array([name.encode() for name in ids])
        handle["img_emb"] = np.random.default_rng(0).normal(size=(len(ids), *ROW)).astype(np.float32)
    return root


def embed_elixr_error(tmp_path: Path, capsys) -> str:
    """The one stderr line of the real `embed_elixr` stage refusing the snapshot at tmp_path/snap."""
    params = write_profile("tiny", tmp_path / "params")
    raw = yaml.safe_load(params.read_text())
    raw["elixr"]["path"] = str(tmp_path / "snap")
    params.write_text(yaml.safe_dump(raw))
    pd.DataFrame({"Image Index": IMAGES}).to_csv(tmp_path / "filtered.csv", index=False)
    spec = importlib.util.spec_from_file_location("embed_elixr_stage", REPO / "stages" / "embed_elixr.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    with pytest.raises(SystemExit) as stopped:
        stage.main(params=params, filtered=tmp_path / "filtered.csv", standin=tmp_path / "none",
                   out=tmp_path / "store", rejects=tmp_path / "rejects.csv", metrics=tmp_path / "metrics.json")
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and err.startswith("stage embed_elixr failed: "), err
    return err


TWICE = f"00000009_000{ESC}.png"
SNAPSHOTS = {
    "duplicated_id": (lambda root: elixr_snapshot(root, [IMAGES[0], TWICE, TWICE]),
                      f"image id 00000009_000{SHOWN}.png appears twice"),
    "dataset_names": (lambda root: elixr_snapshot(root, IMAGES, {f"elixr{ESC}b": {"type": "dataset", "features": {
        f"img{ESC}emb": {"dtype": "float32", "shape": ROW}, **IDS_FEATURE}}}),
                      f"it offers elixr{SHOWN}b: img{SHOWN}emb [4, 8]"),
    "feature_name": (lambda root: elixr_snapshot(root, IMAGES, {"elixrb": {"img_emb": {"type": "dataset", "features": {
        f"x{ESC}": 5, "img_emb": {"dtype": "float32", "shape": ROW}, **IDS_FEATURE}}}}),
                     f"feature 'x{SHOWN}' of dataset 'elixrb/img_emb' is 5"),
    "shard_file_name": (lambda root: (elixr_snapshot(root, IMAGES) / "elixrb" / "img_emb" /
                                      f"img_emb_2{ESC}.h5").write_bytes(b"not hdf5 at all"),
                        f"img_emb_2{SHOWN}.h5: not a readable HDF5 file"),
}


@pytest.mark.parametrize("case", SNAPSHOTS)
def test_a_stage_shows_the_terminal_escapes_of_a_downloaded_snapshot_escaped(tmp_path, capsys, case):
    make, fragment = SNAPSHOTS[case]
    make(tmp_path / "snap")
    err = embed_elixr_error(tmp_path, capsys)
    assert "\x1b" not in err and "\x07" not in err and fragment in err, repr(err)


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


# ----------------------------------------------------------------------------- pass 10: files that are not files

def test_profile_over_a_params_yaml_that_is_a_folder_is_one_line(tmp_path):
    """The atomic rename onto a folder ended in an IsADirectoryError traceback, after the profile was checked."""
    (tmp_path / "params.yaml").mkdir()
    result = runner.invoke(cli.app, ["profile", "tiny", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "params.yaml is not a regular file" in result.output, result.output
    assert (tmp_path / "params.yaml").is_dir() and not list(tmp_path.glob(".params.yaml*"))


@pytest.mark.parametrize("command", ["profile", "doctor"])
def test_a_fifo_given_as_the_params_or_profile_file_is_named_as_such_without_blocking(tmp_path, command):
    """A FIFO overlay or --params was reported as "does not exist" (it does); it must not be opened either."""
    fifo = tmp_path / "overlay.yaml"
    os.mkfifo(fifo)
    args = [command, str(fifo), "--root", str(tmp_path)] if command == "profile" else \
        [command, "--params", str(fifo), "--root", str(tmp_path)]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output
    assert "does not exist" not in result.output

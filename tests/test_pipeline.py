"""The whole DVC pipeline on the tiny profile, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.integration


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test"), env.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "test"), env.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    return env


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A git copy of the tracked files, switched to the tiny profile, after one full `dvc repro`."""
    work = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        source = REPO / name
        if source.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    sh("git", "init", "-q", cwd=work)
    sh(sys.executable, "-m", "cxr_diffusion.cli", "profile", "tiny", cwd=work)
    sh("git", "add", "-A", cwd=work)
    sh("git", "commit", "-qm", "tiny", cwd=work)
    sh("dvc", "repro", cwd=work)
    return work


def lock_outs(repo: Path, stage: str) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


def test_repro_builds_dataset_filter_prepare_on_the_tiny_profile(tiny_repo):
    manifest = json.loads((tiny_repo / "data" / "prepared" / "manifest.json").read_text())
    filtered = json.loads((tiny_repo / "metrics" / "filter.json").read_text())
    dataset = json.loads((tiny_repo / "metrics" / "dataset.json").read_text())
    assert dataset["source"] == "phantom" and dataset["rows"] == 160
    assert filtered["rows_in"] == 160 and filtered["kept"] == manifest["images_in"]
    assert manifest["written"] == manifest["images_in"] and manifest["image_size"] == 32
    assert all(manifest["per_split"][s] > 0 for s in ("train", "val", "test"))
    shown = sh("dvc", "metrics", "show", "--json", cwd=tiny_repo).stdout
    assert "rows_in" in shown


def test_second_repro_does_nothing(tiny_repo):
    result = sh("dvc", "status", cwd=tiny_repo)
    assert "Data and pipelines are up to date" in result.stdout


def test_kill_9_during_prepare_then_repro_gives_identical_outputs(tiny_repo):
    expected = lock_outs(tiny_repo, "prepare")
    # Kill the whole `dvc repro` (DVC has already removed the old output) while shards are being written.
    process = subprocess.Popen(["dvc", "repro", "-f", "-s", "prepare"], cwd=tiny_repo, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if any((tiny_repo / "data").glob(".prepared.*.tmp/*.parquet")):
            break
        time.sleep(0.005)
    assert process.poll() is None, "prepare finished before it could be killed; make the test dataset larger"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    sh("dvc", "repro", cwd=tiny_repo)
    assert lock_outs(tiny_repo, "prepare") == expected
    assert not list((tiny_repo / "data").glob(".prepared.*.tmp"))

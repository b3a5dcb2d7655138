"""Hostile fetch records: a damaged `external/assets.json` is one line naming the file and key, in
`cxr-diffusion doctor` and `fetch`, where it used to end in an AttributeError, KeyError or RecursionError.

Each test places the assets by hand, records them with the real writer, then breaks one thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cxr_diffusion.assets.catalog import needed_assets
from cxr_diffusion.assets.manifest import record, snapshot
from cxr_diffusion.assets.status import source_record
from cxr_diffusion.cli import app
from cxr_diffusion.config import load_params

REPO = Path(__file__).resolve().parents[2]
FIX = "move it away and rerun `cxr-diffusion fetch` (it re-checks what is in place)"
runner = CliRunner()


def recorded_root(root: Path) -> Path:
    """The nih-512 profile needing only its two hub folders (clip, vae), both placed and recorded."""
    raw = yaml.safe_load((REPO / "profiles" / "nih-512.yaml").read_text())
    raw["elixr"]["path"] = None
    for key in ("inception_weights", "reference_inception_weights", "xrv_weights"):
        raw["evaluate"][key] = None
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(root / "params.yaml")
    assets = needed_assets(params, root)
    assert sorted(asset.name for asset in assets) == ["clip", "vae"]
    for asset in assets:
        folder = asset.path(root)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"name": asset.name}))
        record(root / params.fetch.manifest, asset.name, asset.target, source_record(asset), snapshot(folder))
    return root


def break_record(root: Path, change) -> Path:
    path = root / "external" / "assets.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def cli_error(root: Path, command: str) -> str:
    result = runner.invoke(app, [command, "--root", str(root)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2
    return result.output


def test_an_intact_record_of_assets_placed_by_hand_passes_doctor(tmp_path):
    root = recorded_root(tmp_path)
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert result.exit_code == 0 and "All 2 assets are present and match the fetch record." in result.output


BROKEN_ENTRIES = [
    (lambda d: d["assets"].update(clip="clip"), "assets.clip is 'clip', expected an object with target, source, "
                                                "kind and files"),
    (lambda d: d["assets"]["clip"].pop("files"), "assets.clip has no 'files' key"),
    (lambda d: d["assets"]["clip"].pop("target"), "assets.clip has no 'target' key"),
    (lambda d: d["assets"]["clip"].update(target=["external"]), "assets.clip.target is ['external'], expected the "
                                                                "asset's path as text"),
    (lambda d: d["assets"]["clip"].update(source="hub"), "assets.clip.source is 'hub', expected an object saying "
                                                         "where it was fetched from"),
    (lambda d: d["assets"]["clip"].update(kind="link"), "assets.clip.kind is 'link', expected 'file' or 'directory'"),
    (lambda d: d["assets"]["clip"].update(files=["config.json"]), "assets.clip.files is ['config.json'], expected "
                                                                  "an object of file name -> {sha256, size}"),
    (lambda d: d["assets"]["clip"]["files"].update({"config.json": "abc"}), "assets.clip.files.config.json is "
                                                                            "'abc', expected an object with sha256 "
                                                                            "and size"),
    (lambda d: d["assets"]["clip"]["files"]["config.json"].update(sha256=7), "assets.clip.files.config.json.sha256 "
                                                                             "is 7, expected 64 lowercase hex digits"),
    (lambda d: d["assets"]["clip"]["files"]["config.json"].update(size="16"), "assets.clip.files.config.json.size "
                                                                              "is '16', expected a whole number of "
                                                                              "bytes, 0 or more"),
    (lambda d: d["assets"]["clip"]["files"]["config.json"].pop("size"), "assets.clip.files.config.json.size is None, "
                                                                        "expected a whole number of bytes, 0 or more"),
    (lambda d: d["assets"]["vae"]["files"].update({"a\nb": {"sha256": "0" * 64, "size": True}}),
     "assets.vae.files.'a\\nb'.size is True, expected a whole number of bytes, 0 or more"),
]
BROKEN_IDS = ["entry_text", "no_files", "no_target", "target_list", "source_text", "kind_unknown", "files_list",
              "file_text", "sha_int", "size_text", "no_size", "size_bool_odd_name"]


@pytest.mark.parametrize(("change", "expected"), BROKEN_ENTRIES, ids=BROKEN_IDS)
def test_doctor_on_a_malformed_record_entry_is_one_line_naming_the_key(tmp_path, change, expected):
    path = break_record(recorded_root(tmp_path), change)
    assert cli_error(tmp_path, "doctor") == f"error: {path}: {expected}; {FIX}\n"


@pytest.mark.parametrize(("change", "expected"), BROKEN_ENTRIES[:3], ids=BROKEN_IDS[:3])
def test_fetch_on_a_malformed_record_entry_is_one_line_naming_the_key(tmp_path, change, expected):
    path = break_record(recorded_root(tmp_path), change)
    assert cli_error(tmp_path, "fetch") == f"error: {path}: {expected}; {FIX}\n"


@pytest.mark.parametrize("command", ["doctor", "fetch"])
def test_a_record_nested_too_deeply_is_one_line_naming_it(tmp_path, command):
    # Bad syntax, bad bytes and huge integers were one line already (json's ValueError); a RecursionError was not.
    root = recorded_root(tmp_path)
    path = root / "external" / "assets.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    assert cli_error(root, command) == (f"error: {path}: not valid JSON (nested too deeply); it is not a fetch "
                                        f"manifest (version 1): {FIX}\n")

"""Hostile fetch records: a damaged `external/assets.json` is one line naming the file and key, in
`cxr-diffusion doctor` and `fetch`, where it used to end in an AttributeError, KeyError or RecursionError.

Each test places the assets by hand, records them with the real writer, then breaks one thing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file as save_numpy
from typer.testing import CliRunner

from cxr_diffusion.assets.catalog import needed_assets
from cxr_diffusion.assets.manifest import record, snapshot
from cxr_diffusion.assets.status import source_record
from cxr_diffusion.cli import app
from cxr_diffusion.params_file import load_params
from cxr_diffusion.profiles import profile_data

REPO = Path(__file__).resolve().parents[2]
FIX = "move it away and rerun `cxr-diffusion fetch` (it re-checks what is in place)"
runner = CliRunner()


def hub_root(root: Path) -> tuple[Path, list]:
    """The nih-512 profile needing only its clip and vae folders, nothing placed yet."""
    raw = profile_data("nih-512")
    raw["elixr"]["path"] = None
    for key in ("inception_weights", "reference_inception_weights", "xrv_weights", "raddino"):
        raw["evaluate"][key] = None
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root, needed_assets(load_params(root / "params.yaml"), root)


def recorded_root(root: Path) -> Path:
    """The nih-512 profile needing only its two hub folders (clip, vae), both placed and recorded."""
    root, assets = hub_root(root)
    params = load_params(root / "params.yaml")
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


# --- stand-ins and arbitrary folders must not pass as real assets ------------------------------------------------
def record_present(root: Path) -> str:
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(root)])
    assert result.exit_code == 2, result.output
    assert not (root / "external" / "assets.json").exists()
    return result.output


def test_any_folder_is_not_recorded_as_the_vae(tmp_path):
    """`/etc` once became the SD VAE: 1,036 files hashed, /etc/shadow included, and doctor said present."""
    root, assets = hub_root(tmp_path)
    for asset in assets:
        folder = asset.path(root)
        folder.mkdir(parents=True)
        (folder / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    output = record_present(root)
    assert "has no config.json, so it is not a clip folder" in output
    assert "has no config.json, so it is not a vae folder" in output


@pytest.mark.parametrize(("config", "files", "fragment"), [
    ({"model_type": "bert"}, ["model.safetensors"], "model_type is 'bert', not 'clip'"),
    ({"model_type": "clip"}, ["pytorch_model.bin"], "only pickled weights (pytorch_model.bin)"),
    ({"model_type": "clip"}, [], "holds no weights"),
])
def test_a_clip_folder_must_say_clip_and_hold_safetensors(tmp_path, config, files, fragment):
    root, assets = hub_root(tmp_path)
    for asset in assets:
        folder = asset.path(root)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config if asset.name == "clip" else
                                                       {"_class_name": "AutoencoderKL"}))
        for name in files if asset.name == "clip" else ["diffusion_pytorch_model.safetensors"]:
            save_numpy({"w": np.ones(2, np.float32)}, str(folder / name)) if name.endswith(".safetensors") \
                else (folder / name).write_bytes(b"pickled")
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(root)])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert "vae: recorded" in result.output  # the sound one is recorded, the other listed


@pytest.mark.parametrize("damage", ["removed", "renamed", "a folder", "a dangling link"])
def test_a_standin_folder_without_its_marker_is_still_a_standin(tmp_path, damage):
    """STANDIN.json removed, renamed, turned into a folder or a dangling link: the weights still say so."""
    from safetensors.torch import save_file

    from cxr_diffusion.assets.standin_marker import MARKER_NAME, label_safetensors, read_standin

    root, assets = hub_root(tmp_path)
    vae = next(asset for asset in assets if asset.name == "vae").path(root)
    vae.mkdir(parents=True)
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    import torch

    save_file({"w": torch.ones(2)}, str(vae / "diffusion_pytorch_model.safetensors"))
    label_safetensors(vae / "diffusion_pytorch_model.safetensors", {"standin": True, "build": "b1"})
    marker = vae / MARKER_NAME
    if damage == "renamed":
        (vae / "standin.json.bak").write_text("{}")
    elif damage == "a folder":
        marker.mkdir()
    elif damage == "a dangling link":
        marker.symlink_to(tmp_path / "nowhere.json")
    assert read_standin(vae)["standin"] is True
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(vae / "diffusion_pytorch_model.safetensors"))["w"], torch.ones(2))
    output = runner.invoke(app, ["fetch", "--record-present", "--root", str(root)]).output
    assert "vae: could not place it" in output and "records only real assets" in output


def test_an_elixr_standin_named_by_elixr_path_is_labelled_a_standin(tmp_path):
    import numpy as np
    import pandas as pd

    from cxr_diffusion.conditioning.elixr import build_elixr_store
    from cxr_diffusion.conditioning.elixr_format import FeatureSpec
    from cxr_diffusion.conditioning.elixr_writers import write_snapshot_index, write_snapshot_shard
    from cxr_diffusion.config import ElixrConfig
    from cxr_diffusion.profiles import profile_section

    names = [f"{n:08d}_000.png" for n in (1, 2)]
    snapshot = tmp_path / "snap"
    write_snapshot_shard(snapshot / "elixrb" / "img_emb" / "img_emb_1.h5", names, "img_emb",
                         np.random.default_rng(0).normal(size=(2, 4, 8)))
    write_snapshot_index(snapshot, {"elixrb/img_emb": [FeatureSpec("img_emb", "float32", (4, 8))]},
                         {"standin": True, "description": "NOT ELIXR"})
    pd.DataFrame({"Image Index": names}).to_csv(tmp_path / "filtered.csv", index=False)
    metrics = build_elixr_store(tmp_path / "filtered.csv", profile_section(ElixrConfig, path=str(snapshot)),
                                tmp_path / "store", tmp_path / "rejects.csv", None, "elixr")
    assert metrics["source"] == "elixr_standin"


@pytest.mark.parametrize("damage", ["empty file", "a folder", "no tensors"])
def test_a_safetensors_name_without_tensors_behind_it_is_not_recorded(tmp_path, damage):
    root, assets = hub_root(tmp_path)
    for asset in assets:
        folder = asset.path(root)
        folder.mkdir(parents=True)
        kind = {"model_type": "clip"} if asset.name == "clip" else {"_class_name": "AutoencoderKL"}
        (folder / "config.json").write_text(json.dumps(kind))
        weights = folder / "model.safetensors"
        if damage == "empty file":
            weights.write_bytes(b"")
        elif damage == "a folder":
            weights.mkdir()
        else:
            save_numpy({}, str(weights))
    output = record_present(root)
    for name in ("clip", "vae"):
        assert f"{name}: could not place it: " in output and "not a safetensors file holding tensors" in output


def elixr_only_root(root: Path) -> Path:
    """The nih-512 profile needing only its ELIXR snapshot; returns the (not yet made) snapshot folder."""
    raw = profile_data("nih-512")
    raw["clip"]["model"], raw["train"]["space"] = "demo", "pixel"
    for key in ("inception_weights", "reference_inception_weights", "xrv_weights", "raddino"):
        raw["evaluate"][key] = None
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root / raw["elixr"]["path"]


def test_an_elixr_index_without_the_selected_dataset_or_its_shards_is_not_recorded(tmp_path):
    snapshot = elixr_only_root(tmp_path)
    snapshot.mkdir(parents=True)
    (snapshot / "datasets.json").write_text(json.dumps({"datasets": {"other": {"type": "dataset", "features": {}}}}))
    assert "offers ['other'], not elixrb/img_emb" in record_present(tmp_path)
    (snapshot / "datasets.json").write_text(json.dumps(
        {"datasets": {"elixrb": {"img_emb": {"type": "dataset", "features": {"img_emb": {"shape": [32, 768]}}}}}}))
    assert "the folder of dataset 'elixrb/img_emb' is missing from the snapshot" in record_present(tmp_path)


@pytest.mark.parametrize("shard", ["a link out", "not hdf5"])
def test_an_elixr_shard_that_is_a_link_out_or_not_hdf5_is_not_recorded(tmp_path, shard):
    snapshot = elixr_only_root(tmp_path)
    (snapshot / "elixrb" / "img_emb").mkdir(parents=True)
    (snapshot / "datasets.json").write_text(json.dumps(
        {"datasets": {"elixrb": {"img_emb": {"type": "dataset", "features": {"img_emb": {"shape": [32, 768]}}}}}}))
    path = snapshot / "elixrb" / "img_emb" / "img_emb_1.h5"
    if shard == "a link out":
        (tmp_path / "passwd").write_text("root:x:0:0\n")
        path.symlink_to(tmp_path / "passwd")
        assert "img_emb_1.h5: lies outside" in record_present(tmp_path)
    else:
        path.write_text("not hdf5")
        assert "img_emb_1.h5: not an HDF5 file" in record_present(tmp_path)


def test_a_partly_redownloaded_standin_snapshot_is_still_a_standin(tmp_path):
    """Index and one shard replaced by published-looking files; the other shards still carry the label."""
    import h5py

    from cxr_diffusion.assets.standin_marker import read_standin

    folder = tmp_path / "snap" / "elixrb" / "img_emb"
    folder.mkdir(parents=True)
    (tmp_path / "snap" / "datasets.json").write_text(json.dumps({"info": {}, "datasets": {}}))
    for number in (1, 2):
        with h5py.File(folder / f"img_emb_{number}.h5", "w") as handle:
            handle["img_emb"] = np.ones((1, 2), np.float32)
            if number == 2:
                handle.attrs["standin"] = "NOT ELIXR"
    assert read_standin(tmp_path / "snap")["standin"] is True


def hub_folders(root: Path, weights_name: str = "model.safetensors") -> list[Path]:
    """The clip and vae folders of ``hub_root`` with their configs and one sound weights file each."""
    root, assets = hub_root(root)
    folders = []
    for asset in assets:
        folder = asset.path(root)
        folder.mkdir(parents=True)
        kind = {"model_type": "clip"} if asset.name == "clip" else {"_class_name": "AutoencoderKL"}
        (folder / "config.json").write_text(json.dumps(kind))
        save_numpy({"w": np.arange(4096, dtype=np.float32)}, str(folder / weights_name))
        folders.append(folder)
    return folders


@pytest.mark.parametrize("command", ["doctor", "fetch --record-present", "standins"])
def test_a_fifo_named_like_weights_or_a_shard_never_blocks(tmp_path, command):
    """A FIFO is opened by nothing: the label scan and the content checks see only regular files."""
    clip, vae = hub_folders(tmp_path)
    os.mkfifo(clip / "extra.safetensors")
    os.mkfifo(vae / "sub.safetensors")
    result = runner.invoke(app, [*command.split(), "--root", str(tmp_path)])  # a FIFO read would hang the test
    assert "Traceback" not in result.output and result.exit_code in (0, 2), result.output


def test_a_fifo_named_like_a_shard_in_an_elixr_snapshot_never_blocks(tmp_path):
    from cxr_diffusion.conditioning.elixr_format import FeatureSpec
    from cxr_diffusion.conditioning.elixr_writers import write_snapshot_index, write_snapshot_shard

    snapshot = elixr_only_root(tmp_path)
    names = [f"{n:08d}_000.png" for n in (1, 2)]
    write_snapshot_shard(snapshot / "elixrb" / "img_emb" / "img_emb_1.h5", names, "img_emb",
                         np.random.default_rng(0).normal(size=(2, 4, 8)))
    write_snapshot_index(snapshot, {"elixrb/img_emb": [FeatureSpec("img_emb", "float32", (4, 8))]}, {})
    (snapshot / "notes").mkdir()
    os.mkfifo(snapshot / "notes" / "old.h5")
    for command in ("doctor", "fetch --record-present"):
        result = runner.invoke(app, [*command.split(), "--root", str(tmp_path)])
        assert "Traceback" not in result.output and result.exit_code in (0, 2), result.output


def test_a_truncated_weights_file_is_not_recorded(tmp_path):
    """Cut as an interrupted copy leaves it: the header is whole, the tensors are not."""
    for folder in hub_folders(tmp_path):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    output = record_present(tmp_path)
    assert "model.safetensors: its tensors end at byte 16," in output and " of 200: truncated or damaged" in output
    assert "truncated or damaged; download it again" in output


def test_a_file_linked_from_outside_a_hub_folder_is_not_read_or_recorded(tmp_path, monkeypatch):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not the model's")
    clip, vae = hub_folders(tmp_path / "root")
    (clip / "notes.txt").symlink_to(secret)
    (vae / "notes.txt").symlink_to(secret)
    hashed = []
    monkeypatch.setattr("cxr_diffusion.assets.manifest.sha256_file", lambda path: hashed.append(path) or "0" * 64)
    output = record_present(tmp_path / "root")
    assert f"notes.txt: lies outside external/clip-vit-large-patch14 (it links to {secret})" in output
    assert not any(path.resolve() == secret for path in hashed)


def test_fetch_shows_a_refused_file_name_with_terminal_escapes_escaped(tmp_path):
    """The refusal quotes the file's name; `fetch` printed it as it was, title sequence and all."""
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not the model's")
    for folder in hub_folders(tmp_path / "root"):  # both refused: nothing is recorded
        (folder / "evil\x1b]0;pwned\x07.json").symlink_to(secret)
    output = record_present(tmp_path / "root")
    assert "\x1b" not in output and "\x07" not in output
    assert "evil\\u001b]0;pwned\\u0007.json: lies outside" in output


def rewrite_weights_header(path: Path, change) -> None:
    """Replace a safetensors file's header by ``change(header)``; the data bytes stay as they are."""
    import struct

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = json.dumps(change(json.loads(data[8:8 + length]))).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


@pytest.mark.parametrize("change, fragment", [
    (lambda h: {**h, "w": {**h["w"], "shape": [4096, 4096]}}, "tensor 'w' spans 16384 bytes, not its dtype x shape"),
    (lambda h: {**h, "w": {**h["w"], "dtype": "X99"}}, "tensor 'w' has no known dtype"),
    (lambda h: {**h, "w": "hello"}, "tensor 'w' has no known dtype"),
    (lambda h: {**h, "w": {**h["w"], "shape": [2048], "data_offsets": [0, 8192]},
                "v": {"dtype": "F32", "shape": [2048], "data_offsets": [4096, 12288]}}, "its tensors overlap or leave gaps"),
    (lambda h: {**h, "w": {**h["w"], "shape": [1024], "data_offsets": [0, 4096]},
                "v": {"dtype": "F32", "shape": [2048], "data_offsets": [8192, 16384]}}, "its tensors overlap or leave gaps"),
])
def test_a_weights_file_whose_header_does_not_describe_it_is_not_recorded(tmp_path, change, fragment):
    """Each of these ends where the file ends, so a size check alone passed them; safetensors refuses them all."""
    for folder in hub_folders(tmp_path):
        rewrite_weights_header(folder / "model.safetensors", change)
    output = record_present(tmp_path)
    assert f"model.safetensors: {fragment}: truncated or damaged" in output, output


def test_an_asset_of_a_terabyte_is_refused_before_it_is_hashed(tmp_path, monkeypatch):
    for folder in hub_folders(tmp_path):
        with open(folder / "huge.bin", "wb") as handle:
            handle.truncate(1 << 40)  # sparse: no disk used
    monkeypatch.setattr("cxr_diffusion.assets.manifest.sha256_file", lambda path: pytest.fail(f"hashed {path}"))
    output = record_present(tmp_path)
    assert "external/sd-vae-ft-mse holds 1,024.0 GiB, more than the 64 GiB of any asset" in output


@pytest.mark.parametrize("value", [np.array([1, 2]), np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f4")])])
def test_a_shard_whose_standin_attribute_is_not_a_scalar_still_marks_a_standin(tmp_path, value):
    import h5py

    from cxr_diffusion.assets.standin_marker import read_standin
    from cxr_diffusion.conditioning.elixr_files import scan_elixr_file
    from cxr_diffusion.conditioning.elixr_format import FeatureSpec
    from cxr_diffusion.conditioning.elixr_writers import write_snapshot_index, write_snapshot_shard

    snapshot = tmp_path / "snap"
    shard = write_snapshot_shard(snapshot / "elixrb" / "img_emb" / "img_emb_1.h5", ["00000001_000.png"], "img_emb",
                                 np.ones((1, 4, 8)))
    with h5py.File(shard, "a") as handle:
        handle.attrs["standin"] = value
    write_snapshot_index(snapshot, {"elixrb/img_emb": [FeatureSpec("img_emb", "float32", (4, 8))]}, {})
    assert read_standin(snapshot)["standin"] is True
    assert scan_elixr_file(shard, (4, 8), "img_emb").standin is True


# --- strings of an asset folder and of the fetch record are shown escaped ------------------------------------------
# `doctor` quotes file names and a stand-in's STANDIN.json; anyone can write those, so they must not reach the
# terminal as they are (as `inspect` shows a folder's strings: hidden characters as \u.... escapes).
ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"  # sets the terminal title, clears the screen, turns the text red
SHOWN = "\\u001b]0;pwned\\u0007\\u001b[2J\\u001b[31m"


def doctor_lines(root: Path) -> list[str]:
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "\x1b" not in result.output and "\x07" not in result.output, repr(result.output)
    return result.output.splitlines()


def labelled_standins(root: Path, **label) -> Path:
    """Both hub folders of ``hub_root`` as stand-ins whose STANDIN.json holds ``label``."""
    root, assets = hub_root(root)
    for asset in assets:
        folder = asset.path(root)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "STANDIN.json").write_text(json.dumps({"standin": True, **label}))
    return root


def test_a_file_added_to_a_recorded_asset_is_listed_escaped(tmp_path):
    root = recorded_root(tmp_path)
    (root / "external" / "clip-vit-large-patch14" / f"extra{ESC}.json").write_text("{}")
    assert ("clip (clip.model): mismatch: external/clip-vit-large-patch14 changed since fetch recorded it: "
            f"added extra{SHOWN}.json") in doctor_lines(root)


def test_a_file_name_in_the_fetch_record_is_listed_escaped(tmp_path):
    root = recorded_root(tmp_path)
    break_record(root, lambda d: d["assets"]["clip"]["files"].update({f"gone{ESC}.json": {"sha256": "0" * 64,
                                                                                         "size": 1}}))
    assert ("clip (clip.model): mismatch: external/clip-vit-large-patch14 changed since fetch recorded it: "
            f"removed gone{SHOWN}.json") in doctor_lines(root)


def test_a_standin_label_is_shown_escaped(tmp_path):
    root = labelled_standins(tmp_path, made_by=f"x{ESC}", warning=f"w{ESC}")
    assert (f"vae (train.vae): stand-in (random weights): external/sd-vae-ft-mse was made by `x{SHOWN}`: "
            f"w{SHOWN}") in doctor_lines(root)


def test_a_standin_label_cannot_forge_a_status_line(tmp_path):
    """A newline in made_by once printed a line of its own: `clip (clip.model): present ...` under a stand-in."""
    forged = "clip (clip.model): present: external/clip-vit-large-patch14 matches the fetch record (1 file)"
    root = labelled_standins(tmp_path, made_by=f"x\n{forged}\n")
    lines = doctor_lines(root)
    assert [line for line in lines if line.startswith("clip (")] == [
        f"clip (clip.model): stand-in (random weights): external/clip-vit-large-patch14 was made by `x {forged}`: "
        "random weights, NOT the real model"], lines


def test_fetch_record_present_shows_a_standin_label_escaped(tmp_path):
    """`fetch` refuses to record a stand-in quoting the same label: escaped where it is read (``describe``)."""
    root = labelled_standins(tmp_path, made_by=f"x{ESC}\nclip: recorded", warning=f"w{ESC}")
    output = record_present(root)
    assert "\x1b" not in output and "\x07" not in output and "\nclip: recorded" not in output, repr(output)
    assert f"clip: could not place it: external/clip-vit-large-patch14 was made by `x{SHOWN} clip: recorded`: " \
           f"w{SHOWN}; --record-present records only real assets" in output

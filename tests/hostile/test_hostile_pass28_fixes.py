"""Pass 28: probes of the pass-27 fixes (commit b745044). Each test fails on the code as it stood and asserts the
project's rule (one line naming the file/param and the fix, exit code 2, no traceback; nothing silently accepted;
valid input not refused; advice that can be followed).

Run with:
  cd /tmp/pass28 && export PYTHONPATH=/tmp/pass28/src:/tmp/pass28/tests:/tmp/pass28/tests/hostile \
      PATH=/work/main/.venv/bin:$PATH
  python -m pytest -q -p no:cacheprovider /tmp/pass28_out/test_hostile_pass28_fixes.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cxr_diffusion.cli import app
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.profiles import profile_data

runner = CliRunner()


# ---------------------------------------------------------------------------- 1. report markup: linkify after a symbol


@pytest.mark.parametrize("payload", ["reader\U0001F600.com", "x$.com", "ab\u00a9.com", "dr\u20ac.org/x", "x|.com"])
def test_a_dot_after_a_symbol_is_broken_so_no_link_starts(payload):
    """`_starts_autolink` breaks a `.` only between two alnum characters, but linkify's domain letters are any
    character that is not punctuation/space/control: `reader😀.com`, `x$.com`, `ab©.com` (and `x|.com` in a table
    cell, where `\\|` becomes `|`) still render as `<a href="http://...">` in the report. Expected: no link."""
    from test_hostile_reader_text import rendered

    from cxr_diffusion.safe_text import markdown_text

    cell = markdown_text(payload)
    html = rendered(f"In a line: {cell}\n\n| reader |\n|---|\n| {cell} |\n\n- {cell}: x\n")
    assert "<a " not in html, [line for line in html.splitlines() if "<a " in line]


# ---------------------------------------------------------------------------- 3. ELIXR: read only the scanned file


_HDF5_FIFO_RACE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np, h5py
    from cxr_diffusion.conditioning import elixr_hdf5
    from cxr_diffusion.conditioning.elixr_files import iter_embedding_blocks, scan_elixr_file
    from cxr_diffusion.data.nih import DataError
    shard = Path(sys.argv[1])
    with h5py.File(shard, "w") as handle:
        handle["image_ids"] = np.array([b"00000001_000", b"00000002_000"])
        handle["embeddings"] = np.ones((2, 4), np.float32)
    scanned = scan_elixr_file(shard, (1, 4))
    checked = elixr_hdf5.check_regular_file
    def racing(path, kind):  # the check passes, then a FIFO takes the shard's name before it is opened
        checked(path, kind)
        os.unlink(path)
        os.mkfifo(path)
    elixr_hdf5.check_regular_file = racing
    try:
        list(iter_embedding_blocks(scanned, (1, 4), np.array([0, 1]), 8))
        print("READ")
    except DataError as error:
        print("DATAERROR", error)
""")


def test_an_hdf5_shard_swapped_for_a_fifo_after_its_check_does_not_hang(tmp_path):
    """Pass 27 opens a Parquet shard through one O_NONBLOCK descriptor so a FIFO swapped in after
    `check_regular_file` reads as empty, but `_open_hdf5` still stats the name, then lets h5py open it by name
    (blocking): a FIFO swapped in between hangs the stage forever. Expected: one DataError line, no hang."""
    shard = tmp_path / "shard_1.h5"
    try:
        done = subprocess.run([sys.executable, "-c", _HDF5_FIFO_RACE, str(shard)], capture_output=True, text=True,
                              timeout=20, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {shard} hung: h5py opened a FIFO swapped in after check_regular_file")
    assert "DATAERROR" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_an_hdf5_shard_rewritten_in_place_with_its_mtime_restored_is_not_read(tmp_path):
    """`file_identity` is (device, inode, size, mtime), and mtime is the writer's to set: a shard rewritten in place
    after the scan, same size, its mtime put back with `os.utime`, is read as if it were the scanned file (here its
    embeddings silently become 7s). st_ctime_ns cannot be set back. Expected: a DataError 'changed since it was
    scanned'."""
    from cxr_diffusion.conditioning.elixr_files import iter_embedding_blocks, scan_elixr_file

    shard = tmp_path / "shard_1.h5"
    with h5py.File(shard, "w") as handle:
        handle["image_ids"] = np.array([b"00000001_000", b"00000002_000"])
        handle["embeddings"] = np.ones((2, 4), np.float32)
    scanned = scan_elixr_file(shard, (1, 4))
    before = os.stat(shard)
    data, ones = shard.read_bytes(), np.ones(8, np.float32).tobytes()
    assert data.count(ones) == 1
    with open(shard, "r+b") as handle:
        handle.seek(data.index(ones))
        handle.write(np.full(8, 7, np.float32).tobytes())
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(DataError, match="changed since it was scanned"):
        blocks = list(iter_embedding_blocks(scanned, (1, 4), np.array([0, 1]), 8))
        pytest.fail(f"read {blocks[0][1].ravel().tolist()} from a shard rewritten after its scan")


# ---------------------------------------------------------------------------- 4. assets in the Hugging Face cache


def _tiny_clip(folder: Path, text_heads: int = 2) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    config = CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   vocab_size=50, max_position_embeddings=16, projection_dim=8),
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8, projection_dim=8),
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    if text_heads != 2:  # a config.json that transformers' own config validation refuses
        raw = json.loads((folder / "config.json").read_text())
        raw["text_config"]["num_attention_heads"] = text_heads
        (folder / "config.json").write_text(json.dumps(raw))


def _clip_in_cache_params(root: Path, revision: str | None) -> Path:
    raw = profile_data("nih-512")
    raw["elixr"]["path"] = None
    for key in ("inception_weights", "reference_inception_weights", "xrv_weights", "raddino"):
        raw["evaluate"][key] = None
    raw["train"]["space"] = "pixel"
    raw["clip"]["model"] = "openai/clip-vit-large-patch14"
    raw["fetch"]["clip_revision"] = revision
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def test_check_clip_tower_refuses_a_config_transformers_rejects_in_one_line(tmp_path):
    """`check_clip_tower` catches (OSError, ValueError, TypeError) from `config_class.from_pretrained`, but
    transformers 5 validates configs through huggingface_hub's strict dataclasses, which raise
    StrictDataclassClassValidationError (not a ValueError): a config.json whose hidden size is not a multiple of its
    heads escapes as a traceback (raddino_folder catches StrictDataclassError; clip_folder does not). Expected:
    ClipFolderError naming config.json."""
    from transformers import CLIPTextModel

    from cxr_diffusion.conditioning.clip_folder import ClipFolderError, check_clip_tower

    _tiny_clip(tmp_path / "clip", text_heads=3)
    with pytest.raises(ClipFolderError, match="config.json"):
        check_clip_tower(tmp_path / "clip", CLIPTextModel)


def test_doctor_on_a_cached_clip_with_a_config_transformers_rejects_exits_2_without_a_traceback(tmp_path,
                                                                                             monkeypatch):
    """Pass 27 made `check_asset` run `check_hub_folder` (hence `check_clip_tower`) on a cached CLIP, so `doctor`
    now crashes (exit 1, StrictDataclassClassValidationError) on a cached snapshot whose config.json transformers
    refuses (hidden size 8 over 3 heads), instead of listing it. Expected: exit 2, the asset 'partial', no
    traceback."""
    from huggingface_hub import constants

    revision = "a" * 40
    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--openai--clip-vit-large-patch14" / "snapshots" / revision
    _tiny_clip(snapshot, text_heads=3)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = _clip_in_cache_params(tmp_path / "repo", revision)
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert result.exit_code == 2, (result.exit_code, repr(result.exception), result.output[-500:])
    assert "partial" in result.output and "Traceback" not in result.output, result.output


def test_a_partial_cached_asset_is_not_reported_in_place_by_fetch(tmp_path, monkeypatch):
    """`doctor` now calls a cached hub snapshot that is not the asset 'partial' and says 'run `cxr-diffusion
    fetch`', but `fetch` downloads it again (e.g. a revision that publishes no .safetensors: only the JSON files
    match its patterns) and, without checking what it got, prints 'All 1 assets are in place', exit 0; doctor then
    says partial again: a loop with no way out. Expected: fetch checks the download (`check_hub_folder`) and lists
    the asset as not placed (exit 2), naming why."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from cxr_diffusion.assets import download

    cached = tmp_path / "hf" / "snapshot"

    def hub(repo_id, *, repo_type="model", revision=None, local_dir=None, allow_patterns=None,
            local_files_only=False):
        folder = Path(local_dir) if local_dir is not None else cached
        if local_files_only:
            if not folder.is_dir():
                raise LocalEntryNotFoundError("not cached")
            return folder
        folder.mkdir(parents=True, exist_ok=True)  # the repository revision holds pickled weights only
        (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
        (folder / "vocab.json").write_text("{}")
        return folder

    monkeypatch.setattr(download, "hub_snapshot", hub)
    root = _clip_in_cache_params(tmp_path / "repo", None)
    fetched = runner.invoke(app, ["fetch", "--root", str(root)])
    doctor = runner.invoke(app, ["doctor", "--root", str(root)])
    assert doctor.exit_code == 2 and "partial" in doctor.output, doctor.output
    assert fetched.exit_code == 2 and "All 1 assets are in place" not in fetched.output, \
        f"fetch says in place, doctor says partial: {fetched.output!r}"


def test_a_partial_cached_asset_detail_names_the_folder_not_none(tmp_path, monkeypatch):
    """`check_hub_folder` writes `asset.target` into its messages, which is None for an asset in the Hugging Face
    cache: doctor prints 'partial: ... but None holds no weights; download its .safetensors files (clip.model must
    name a download of ...)', naming no folder and telling a param that already is the hub id to name a download.
    Expected: the message names the snapshot folder (or the hub id), never 'None'."""
    from huggingface_hub import constants

    revision = "b" * 40
    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--openai--clip-vit-large-patch14" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "clip"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = _clip_in_cache_params(tmp_path / "repo", revision)
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if "partial" in line)
    assert "None " not in line, line


# ---------------------------------------------------------------------------- 5. the official split's val floor


def _official(n_train: int, without_images: set[int], val_fraction: float, seed: int = 0):
    """3 test patients (1-3) and ``n_train`` train_val patients (4...), two films each; ``without_images``: patients
    whose films are not on disk (a partial download: rejected as image_missing)."""
    from conftest import nih_row

    from cxr_diffusion.config import FilterConfig, SplitConfig
    from cxr_diffusion.data.filter import filter_metadata
    from cxr_diffusion.profiles import profile_section

    labels = ["No Finding", "Effusion", "Infiltration|Effusion", "Nodule", "Mass", "Atelectasis"]
    rows = [nih_row(f"{p:08d}_{f:03d}.png", labels[(p + f) % len(labels)], patient=p, follow_up=f)
            for p in range(1, 4 + n_train) for f in range(2)]
    frame = pd.DataFrame(rows)
    lists = {"test": {r["Image Index"] for r in rows if r["Patient ID"] <= 3},
             "train_val": {r["Image Index"] for r in rows if r["Patient ID"] > 3}}
    present = {r["Image Index"] for r in rows if r["Patient ID"] not in without_images}
    config = profile_section(FilterConfig, split=profile_section(SplitConfig, method="official",
                                                                 val_fraction=val_fraction))
    return filter_metadata(frame, present, config, seed, None, lists)


@pytest.mark.parametrize(("n_train", "without_images"), [(20, set(range(4, 22))), (2, {5}), (2, {4})],
                         ids=["18_of_20_without_images", "2_train_second_without_images",
                              "2_train_first_without_images"])
def test_the_official_val_floor_counts_only_patients_with_kept_films(n_train, without_images):
    """`_official_split` draws val patients from every patient train_val_list.txt names, before rejects
    (image_missing, view, age, class cap): the one val patient the floor guarantees can be one whose films are all
    rejected, so val (or, with 2 train patients, train) is still empty, silently. `_random_split` draws from
    `alive`. Expected: train and val both keep films, or a DataError naming filter.split.val_fraction."""
    try:
        result = _official(n_train, without_images, 0.03)
    except DataError as error:
        assert "val_fraction" in str(error) and "\n" not in str(error), str(error)
        return
    splits = result.table["split"].value_counts().to_dict()
    assert splits.get("val", 0) > 0 and splits.get("train", 0) > 0, f"val_fraction 0.03 gave {splits}"


def test_a_nonzero_val_fraction_with_one_train_patient_is_not_silently_an_empty_val_split():
    """With one train_val patient the floor does not apply (`len(train_patients) >= 2`), so val_fraction 0.4 gives
    no val film and no word: the empty val split pass 26 refuses for val_fraction 0 (plateau and early stopping
    never act, evaluate fails hours later). Expected: a DataError naming filter.split.val_fraction."""
    try:
        result = _official(1, set(), 0.4)
    except DataError as error:
        assert "val_fraction" in str(error) and "\n" not in str(error), str(error)
        return
    splits = result.table["split"].value_counts().to_dict()
    assert splits.get("val", 0) > 0, f"val_fraction 0.4 > 0 but the official split made no val film: {splits}"

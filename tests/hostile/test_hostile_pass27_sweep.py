"""Pass 27 sweep over the four original threat areas (kit blindness, report markup, ELIXR reads, assets).

Run with:
  cd /tmp/pass27 && export PYTHONPATH=/tmp/pass27/src:/tmp/pass27/tests:/tmp/pass27/tests/hostile \
      PATH=/work/main/.venv/bin:$PATH
  python -m pytest -q -p no:cacheprovider /tmp/pass27_out/test_hostile_pass27_sweep.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cxr_diffusion.assets.catalog import needed_assets
from cxr_diffusion.cli import app
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.params_file import load_params
from cxr_diffusion.profiles import profile_data

runner = CliRunner()


# ---------------------------------------------------------------------------- 2. report markup


def test_a_protocol_relative_url_in_a_reader_id_is_not_autolinked_in_the_report(tmp_path):
    """A reader id `//localhost/admin` (every character is allowed) became `<a href="//localhost/admin">` in
    report.md under the project's own renderer (markdown-it + linkify, whose `//` schema needs no scheme and, for
    localhost, no dot): `markdown_text` must break `//` as it breaks `://`, `@` and dots, so no link starts."""
    from scripted_readers import response_file, truthful
    from test_hostile_reader_text import built_key, rendered

    from cxr_diffusion.reader_study.report import report_lines
    from cxr_diffusion.reader_study.scoring import score_responses

    key = built_key(tmp_path)
    response_file(tmp_path / "responses", key, "//localhost/admin", truthful, name="pilot-1__r.json")
    metrics = score_responses(tmp_path / "responses", key)
    html = rendered("\n".join(report_lines(metrics)))
    assert "<a " not in html, [line for line in html.splitlines() if "<a " in line]


# ---------------------------------------------------------------------------- 3. ELIXR read outside the snapshot


_SCAN_THROUGH_LINK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cxr_diffusion.conditioning.elixr_files import scan_elixr_file
    from cxr_diffusion.data.nih import DataError
    try:
        scan_elixr_file(Path(sys.argv[1]), (1, 4))
        print("SCANNED")
    except DataError as error:
        print("DATAERROR", error)
""")


def test_an_hdf5_external_link_to_a_fifo_outside_the_snapshot_is_refused_unopened(tmp_path):
    """`scan_hdf5` asks `handle.get("embeddings")` before `_check_stored_in_file` looks at the link, and h5py
    resolves an external link by opening its target: a link to a FIFO outside the folder hung the scan forever
    (an outside file is opened before the refusal). Expected: the link is refused from its kind (getlink=True)
    before anything it names is opened: one DataError line, the FIFO never opened."""
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = outside / "secret.h5"
    os.mkfifo(fifo)
    shard = tmp_path / "elixr" / "shard_1.h5"
    shard.parent.mkdir()
    with h5py.File(shard, "w") as handle:
        handle["image_ids"] = np.array([b"00000001_000", b"00000002_000"])
        handle["embeddings"] = h5py.ExternalLink(str(fifo), "/data")
    child = subprocess.Popen([sys.executable, "-c", _SCAN_THROUGH_LINK, str(shard)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    opened = False
    deadline = time.monotonic() + 60
    try:
        while child.poll() is None and time.monotonic() < deadline:
            try:  # succeeds only while a reader holds the FIFO open: the scan opened the outside file
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            opened = True
            os.close(fd)  # end of file for the reader: the scan goes on (and fails) instead of hanging
            break
        output, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert not opened, f"the scan opened {fifo}, outside the ELIXR folder, through an external link ({output!r})"
    assert "DATAERROR" in output and "external link" in output, output


def test_an_hdf5_shard_swapped_between_scan_and_read_is_not_read(tmp_path):
    """The scan refuses external storage, but `hdf5_blocks` reopens the shard by name and reads it unchecked:
    a shard replaced after the scan by one whose `embeddings` are external raw storage (here a file outside the
    folder, standing for /etc/passwd) was read as embeddings. Expected: the read re-checks the file (the one
    scanned: same inode, size and mtime; or the stored-in-file checks again) and raises one DataError line."""
    from cxr_diffusion.conditioning.elixr_files import iter_embedding_blocks, scan_elixr_file

    folder, outside = tmp_path / "elixr", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.arange(8, dtype=np.float32).tobytes())
    shard = folder / "shard_1.h5"
    ids = np.array([b"00000001_000", b"00000002_000"])
    with h5py.File(shard, "w") as handle:
        handle["image_ids"] = ids
        handle["embeddings"] = np.ones((2, 4), np.float32)
    scanned = scan_elixr_file(shard, (1, 4))
    swapped = folder / "incoming.h5.tmp"
    with h5py.File(swapped, "w") as handle:
        handle["image_ids"] = ids
        handle.create_dataset("embeddings", shape=(2, 4), dtype=np.float32, external=[(str(secret), 0, 32)])
    os.replace(swapped, shard)
    with pytest.raises(DataError):
        blocks = list(iter_embedding_blocks(scanned, (1, 4), np.array([0, 1]), 1024))
        pytest.fail(f"read {blocks[0][1].ravel().tolist()} from {secret} through a shard swapped after the scan")


# ---------------------------------------------------------------------------- 4. assets


def _params_root(root: Path, change) -> Path:
    raw = profile_data("nih-512")
    raw["elixr"]["path"] = None
    for key in ("inception_weights", "reference_inception_weights", "xrv_weights", "raddino"):
        raw["evaluate"][key] = None
    raw["clip"]["model"] = "demo"
    raw["train"]["space"] = "pixel"
    change(raw)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def test_an_empty_hugging_face_cache_snapshot_is_not_a_present_asset(tmp_path, monkeypatch):
    """With `evaluate.raddino: microsoft/rad-dino` (the hub id: the files live in the HF cache), `check_asset`
    asks `snapshot_download(local_files_only=True)`, which offline returns the snapshot folder without looking
    inside: an empty `snapshots/<revision>/` (an interrupted or partial `hf download`) made doctor say "present"
    and exit 0, and `fetch` then skips it as "already in place", so the weights are never downloaded. Expected:
    the cached folder is held to the local folder's content checks (`check_hub_folder`), so it is missing or
    partial and doctor exits 2."""
    from huggingface_hub import constants

    revision = "1" * 40

    def change(raw):
        raw["evaluate"]["raddino"] = "microsoft/rad-dino"
        raw["fetch"]["raddino_revision"] = revision

    root = _params_root(tmp_path / "repo", change)
    hub = tmp_path / "hf" / "hub"
    (hub / "models--microsoft--rad-dino" / "snapshots" / revision).mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output


def _tiny_clip(folder: Path, max_shard_size: str = "5GB") -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    config = CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   vocab_size=50, max_position_embeddings=16),
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder, max_shard_size=max_shard_size)


def _two_layers_over_one(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))


def _last_shard_missing(folder: Path) -> None:
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()


@pytest.mark.parametrize(("damage", "shard_size"), [(_two_layers_over_one, "5GB"), (_last_shard_missing, "2KB")],
                         ids=["config_of_two_layers_over_one", "partial_sharded_copy"])
def test_record_present_refuses_a_clip_folder_the_stages_refuse(tmp_path, damage, shard_size):
    """`fetch --record-present` checks a CLIP folder only for `model_type: clip` and some readable safetensors, not
    with the stages' own `check_clip_tower` (as it does RadDINO's with `check_raddino_folder`): a partial copy of
    a sharded CLIP (a shard missing) or a config of 2 layers over weights of 1 was recorded (exit 0), so doctor
    says present and `fetch` never completes it, while embed_clip_* refuse it. Expected: exit 2 naming the folder
    and the stage's reason, nothing recorded."""
    from cxr_diffusion.conditioning.clip_folder import ClipFolderError, check_clip_tower
    from transformers import CLIPTextModel

    root = _params_root(tmp_path, lambda raw: raw["clip"].update(model="external/clip-vit-large-patch14"))
    (asset,) = needed_assets(load_params(root / "params.yaml"), root)
    folder = asset.path(root)
    _tiny_clip(folder, shard_size)
    damage(folder)
    with pytest.raises(ClipFolderError):  # what the stages say of this folder
        check_clip_tower(folder, CLIPTextModel)
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(root)])
    assert result.exit_code == 2, result.output
    assert not (root / "external" / "assets.json").exists(), result.output

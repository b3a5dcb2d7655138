"""Pass 21: the pass-20 fixes (commit 79703cf) and the pass-19 ones (945bc96) probed, as a hostile and as a
legitimate user. Each test builds its input in ``tmp_path`` and asserts the behaviour the project's rule asks for;
each failed on the code it was filed on. See REPORT_fixes.md.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cxr_diffusion.cli import app

from test_hostile_elixr import ROW, snapshot
from test_hostile_models import embedding, generate_args, model, saved_model  # noqa: F401  (fixtures)
from test_hostile_pass14 import _load_fresh, _trained_checkpoint
from test_hostile_pass20_areas import _PAGE_HARNESS, APP_JS, _edited_checkpoint

runner = CliRunner()


# ---------------------------------------------------------------------------- checkpoints: legitimate resume


def test_a_checkpoint_saved_by_a_torch_without_decoupled_weight_decay_is_resumed(tmp_path):
    """torch 2.7 made AdamW a subclass of Adam whose param groups carry `decoupled_weight_decay` (True for AdamW;
    AdamW.__setstate__ sets it on load, so torch itself loads an older state dict). _check_same_settings requires
    every live key in the saved group: a checkpoint written under torch <= 2.6 (same params, same data, same config
    hash: the torch version is not in it) is skipped as 'parameter group 0's decoupled_weight_decay is nothing', the
    run starts from scratch, and its first save prunes every checkpoint of the long run as 'newer ... abandoned'.
    A setting the saved group lacks should be taken from torch's own default when that equals this run's."""
    _edited_checkpoint(tmp_path, edit_json=lambda rest: rest["param_groups"][0].pop("decoupled_weight_decay"))
    loaded, _, optimizer, lines = _load_fresh(tmp_path)
    assert loaded is not None, f"a torch-2.6 checkpoint of this very run is not resumed: {lines}"
    assert optimizer.param_groups[0]["decoupled_weight_decay"] is True


# ---------------------------------------------------------------------------- checkpoints: hostile optimizer state


def test_an_optimizer_step_too_large_for_a_float_is_skipped_not_a_traceback(tmp_path):
    """_check_step converts a JSON step with float(step): an integer of 400 digits (valid JSON, read as a Python
    int) raises OverflowError, which load_latest_checkpoint does not catch (only _Unusable): the train stage ends in
    a traceback instead of skipping the checkpoint with its reason."""
    def huge(rest):
        for entries in rest["state"].values():
            entries["step"] = 10 ** 400

    def without_step(tensors):
        return {key: value for key, value in tensors.items() if not key.endswith(".step")}

    _edited_checkpoint(tmp_path, edit_json=huge, edit_tensors=without_step)
    loaded, lines = _loaded_without_a_traceback(tmp_path)
    assert loaded is None and any("step" in line for line in lines), lines


def test_optimizer_state_entries_that_are_not_a_mapping_are_skipped_not_a_traceback(tmp_path):
    """optimizer.json's `state` maps each parameter to its entries; a list of the three key names (with the tensors
    dropped from optimizer.safetensors, hashes re-recorded) passes the key check (`set(entries)` is the expected
    set), then `entries["step"]` raises TypeError (list indices must be integers), uncaught: a traceback."""
    def as_list(rest):
        for index in rest["state"]:
            rest["state"][index] = ["exp_avg", "exp_avg_sq", "step"]

    _edited_checkpoint(tmp_path, edit_json=as_list, edit_tensors=lambda tensors: {})
    loaded, lines = _loaded_without_a_traceback(tmp_path)
    assert loaded is None and any("optimizer" in line for line in lines), lines


def _loaded_without_a_traceback(checkpoints):
    """What loading the newest checkpoint under ``checkpoints`` gave, and its log; a traceback fails the test."""
    try:
        loaded, _, _, lines = _load_fresh(checkpoints)
    except Exception as error:
        pytest.fail(f"traceback: {type(error).__name__}: {str(error)[:200]}")
    return loaded, lines


def test_a_checkpoint_whose_state_json_is_a_link_is_not_resumed(tmp_path):
    """Pass 20 refused a checkpoint file that is a symbolic link, but only the files state.json lists: state.json
    itself (which holds the counters and every other file's hash) is read through a link to anywhere. A
    checkpoint's files are its own, state.json first; the checkpoint should be skipped."""
    from test_hostile_pass20_areas import linked_out_of_checkpoint

    _trained_checkpoint(tmp_path / "checkpoints")
    linked_out_of_checkpoint(tmp_path, "state.json")
    loaded, _, _, lines = _load_fresh(tmp_path / "checkpoints")
    assert loaded is None, f"resumed with a state.json read through a link out of the checkpoint: {lines[-1]}"
    assert any("state.json" in line for line in lines), lines


# ---------------------------------------------------------------------------- ELIXR ids: variable length, not text


def test_variable_length_ids_that_are_not_text_are_refused_before_they_are_read(tmp_path):
    """_read_ids bounds variable-length ids by `len(value)` only when a value is bytes or str; the dtype check lets
    any kind "O" through, so a vlen *integer* column (h5py.vlen_dtype) counts 0 bytes a row. With every row's
    descriptor pointing at one 1 MB heap object, a 1.2 MB shard reads as 300 MB of arrays (10 million rows: 10 TB)
    before normalized_id refuses row 0. A column whose elements are not strings should be refused from its dtype,
    before a row is read."""
    shard = snapshot(tmp_path / "snap")
    rows, width = 300, 1 << 20
    values = [np.zeros(width, dtype=np.int8)] + [np.array([row % 100], dtype=np.int8) for row in range(1, rows)]
    column = np.empty(rows, dtype=object)
    column[:] = values
    with h5py.File(shard, "w") as handle:
        handle.create_dataset("Image Index", data=column, dtype=h5py.vlen_dtype(np.int8))
        handle["img_emb"] = np.zeros((rows, *ROW), dtype=np.float32)
        offset = handle["Image Index"].id.get_offset()
    data = bytearray(shard.read_bytes())
    descriptor = data[offset:offset + 16]
    assert struct.unpack("<I", descriptor[:4])[0] == width
    for row in range(1, rows):
        data[offset + 16 * row:offset + 16 * row + 16] = descriptor
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size < 2 << 20

    # h5py's variable-length buffers are not seen by tracemalloc: the scan runs in a child, its peak RSS measured
    child = subprocess.run([sys.executable, "-c", _MEASURED_SCAN, str(shard)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, child.stderr[-600:]
    grown, message = child.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(grown) < 64, f"{grown} MB read from a {shard.stat().st_size:,}-byte shard before: {message[:160]}"
    assert "Image Index" in message, message[:300]


_MEASURED_SCAN = r"""
import re, sys
from pathlib import Path
from cxr_diffusion.conditioning.elixr_hdf5 import scan_hdf5
from cxr_diffusion.data.nih import DataError
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss starts at the forking parent's)
    return int(re.search(r"VmHWM:\s*(\d+)", open("/proc/self/status").read()).group(1))
before = peak()
try:
    scan_hdf5(Path(sys.argv[1]), None, "img_emb", None, "elixrb/img_emb")
    message = "accepted"
except DataError as error:
    message = str(error)
print((peak() - before) >> 10, " ".join(message.split()))
"""


# ---------------------------------------------------------------------------- the study page vs scoring


def test_the_page_and_scoring_agree_on_a_reader_id_with_a_letter_newer_than_pythons_unicode(tmp_path):
    """app.js drops `\\p{Cn}` (unassigned) with the browser's Unicode tables, then accepts an id whose NFKD form is
    Latin; responses.reader_id_problem uses Python's unicodedata (3.11: Unicode 14.0), where the same character is
    unassigned, so is_hidden and the whole export is a `bad_reader_id`. U+1CCD6 OUTLINED LATIN CAPITAL LETTER A
    (Unicode 16) decomposes to "A": the page starts the study as "\U0001CCD6lice", scoring refuses every answer
    afterwards. The page must refuse what scoring will refuse."""
    from cxr_diffusion.reader_study.responses import reader_id_problem

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("needs node to run the study page's script")
    reader = "\U0001CCD6lice"
    harness = tmp_path / "harness.js"
    harness.write_text(_PAGE_HARNESS)
    result = subprocess.run([node, str(harness), str(APP_JS), reader], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout.strip().splitlines()[-1])
    problem = reader_id_problem(page["started"] or reader)
    assert not (page["started"] and problem), \
        f"the page started the study as {page['started']!r}; scoring rejects that id: it {problem}"


# ---------------------------------------------------------------------------- params text: joiners in real words


@pytest.mark.parametrize("word", ["\u0dc1\u0dca\u200d\u0dbb\u0dd3",    # ශ්‍රී (Sinhala "Sri": virama + ZWJ)
                                  "\u0915\u094d\u200d\u0937",          # क्‍ष (Devanagari half form: virama + ZWJ)
                                  "\u0915\u094d\u200c\u0937"])         # क्‌ष (explicit virama: virama + ZWNJ)
def test_an_indic_word_with_its_joiner_after_a_virama_is_a_usable_folder_name(word):
    """config._unseen allows a joiner only between two characters that are `isalpha()`, but in Indic scripts the
    joiner's usual place is after the virama (a combining mark, category Mn, not alpha): Sinhala writes "Sri" as
    ශ්‍රී, Devanagari half forms are consonant + virama + ZWJ. The docstring says the joiner is 'part of the spelling
    of Persian, Indic and other scripts', yet a folder so named cannot be given as any params path."""
    from cxr_diffusion.profiles import params_with

    folder = f"/data/{word}/clip"
    assert params_with({"clip": {"model": folder}}).clip.model == folder


# ---------------------------------------------------------------------------- `~`: the check and the use


def test_embed_elixr_reads_the_elixr_path_where_fetch_and_doctor_put_it(tmp_path, monkeypatch):
    """Asset.path expanded `~` ("as the loaders read it"): fetch placed `elixr.path: ~/elixr` in $HOME/elixr and
    doctor checked it there, but embed_elixr's scan_elixr_source read Path(config.path) unexpanded, i.e. ./~/elixr
    under the repository (the VAE, Inception, xrv and RadDINO weights and fetch.manifest likewise). Pass 22: a
    path from a home folder is refused by the params, naming the key, so every reader and check sees one path."""
    from cxr_diffusion.config import ParamsError
    from cxr_diffusion.profiles import params_with

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key, section in (("path", "elixr"), ("manifest", "fetch"), ("inception_weights", "evaluate")):
        with pytest.raises(ParamsError) as refused:
            params_with({section: {key: "~/elixr"}})
        assert f"{section}.{key}" in str(refused.value) and "home folder (~)" in str(refused.value)


# ---------------------------------------------------------------------------- generate --out: checked vs written


def test_generate_out_through_a_link_and_dotdot_does_not_replace_the_model(model, embedding, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    """_check_out judges --out by os.path.realpath (the link followed, then `..`), but _write_outputs' atomic_directory
    now takes os.path.abspath (`..` removed as text, the link never followed). `--out link/../../model`, with link
    pointing two folders deep elsewhere, is checked as a new folder beside the link's target and written as the
    model folder itself: atomic_directory swaps the model out for two PNGs and settings.json (the same path form
    replaces any earlier --out folder full of generations). Where it is written must be where it was checked."""
    work, deep = tmp_path / "work", tmp_path / "far" / "deep" / "deeper"
    work.mkdir()
    deep.mkdir(parents=True)
    os.symlink(deep, work / "link")
    monkeypatch.chdir(work)
    before = sorted(p.name for p in model.iterdir())
    result = runner.invoke(app, generate_args(model, embedding, Path("link/../../model")))
    after = sorted(p.name for p in model.iterdir())
    assert after == before, f"exit {result.exit_code}: the model folder {model} now holds {after}"

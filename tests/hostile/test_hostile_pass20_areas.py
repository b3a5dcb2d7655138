"""Hostile inputs, pass 20 (areas: the reader study, ELIXR snapshots, training checkpoints). Each case builds its
bad input in tmp_path and asserts the project's rule (refused in one line, a listed reject, or a checkpoint skipped
with its reason); each failed on the code it was filed against. See REPORT_areas.md.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr_diffusion.data.nih import DataError
from test_hostile_elixr import NAMES, ROW, build, snapshot
from test_hostile_pass14 import _load_fresh, _rehash, _trained_checkpoint

REPO = Path(__file__).resolve().parents[2]
APP_JS = REPO / "src" / "cxr_diffusion" / "reader_study" / "page" / "app.js"

# ---------------------------------------------------------------------------- the study page vs scoring

# A stub DOM just large enough to run app.js under node: the reader form is submitted with argv[3] as the typed id,
# and the page reports whether it started the study under that id or refused it (an alert).
_PAGE_HARNESS = r"""
const fs = require("fs");
const src = fs.readFileSync(process.argv[2], "utf8");
const typed = process.argv[3];
const elements = {};
function element(id) {
  if (!elements[id]) {
    elements[id] = { id, hidden: false, textContent: "", value: "", className: "", innerHTML: "",
      style: { setProperty() {} }, listeners: {}, attributes: {}, classList: { add() {} },
      addEventListener(type, listener) { this.listeners[type] = listener; },
      setAttribute(key, value) { this.attributes[key] = value; }, getAttribute(key) { return this.attributes[key] ?? null; },
      appendChild() {}, focus() {}, querySelectorAll() { return []; }, remove() {}, click() {} };
  }
  return elements[id];
}
let alerted = null, made = 0;
const storage = {};
global.window = { READER_STUDY: { study_id: "pilot-1", kit_id: "ab", display_size: 64, findings: ["Effusion"],
  calibration: [], items: [{ id: "item-0000001", image: "images/item-0000001.png" }] },
  localStorage: { getItem: key => storage[key] ?? null, setItem: (key, value) => { storage[key] = value; } },
  alert: message => { alerted = message; }, scrollTo() {} };
global.document = { getElementById: element, createElement: () => element("made-" + (made++)),
  createTextNode: () => ({}), documentElement: { style: { setProperty() {} } }, addEventListener() {},
  body: { appendChild() {} }, activeElement: null, title: "" };
global.Image = function () {};
eval(src);
element("reader-id").value = typed;
element("reader-form").listeners.submit({ preventDefault() {} });
console.log(JSON.stringify({ started: element("reader-name").textContent, alerted }));
"""


@pytest.mark.parametrize("reader", ["...", "\u00b4\u00b4", "- ( )"])
def test_the_page_refuses_a_reader_id_that_scoring_refuses(tmp_path, reader):
    """Scoring rejects a reader id with no letter or digit (`bad_reader_id`, tests/hostile/test_hostile_reader_text.py),
    and reliability.md says the page refuses the same ids when typed; app.js only checks the character set, so a
    reader who types "..." (or two spacing accents, or "- ( )") answers the whole study and the exported file is
    rejected as a whole afterwards. The page should refuse the id at the start, as scoring will."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("needs node to run the study page's script")
    harness = tmp_path / "harness.js"
    harness.write_text(_PAGE_HARNESS)
    result = subprocess.run([node, str(harness), str(APP_JS), reader], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout.strip().splitlines()[-1])
    assert page["started"] == "" and page["alerted"], \
        f"the page started the study as reader {reader!r}, whose export scoring rejects as bad_reader_id: {page}"


# ---------------------------------------------------------------------------- ELIXR: variable-length ids


def test_variable_length_ids_sharing_one_heap_object_are_bounded_before_they_are_read(tmp_path):
    """A snapshot shard whose `Image Index` is variable-length (dtype kind "O", accepted with "S" and "U") has no
    width or total-size check: MAX_ID_BYTES and MAX_ID_COLUMN_BYTES are applied to fixed-width ids only. Every
    row's 16-byte descriptor may point at the same global-heap object, so a file of N x 16 bytes plus one object
    of L bytes reads as N x L bytes of ids: here a 0.5 MB file reads as 65 MB (past the 64 MB bound); 10 million
    rows (a few hundred KB compressed) would ask for terabytes. The ids are read whole and only then refused as
    duplicates. They should be refused from the dataset's declaration before they are read, as fixed-width ids are."""
    shard = snapshot(tmp_path / "snap")
    rows, width = 130, 512 << 10
    wide = b"A" * width
    ids = [wide] + [b"%08d_000.png" % (900 + row) for row in range(1, rows - len(NAMES))] + \
        [name.encode() for name in NAMES]
    with h5py.File(shard, "w") as handle:
        handle.create_dataset("Image Index", data=np.array(ids, dtype=object), dtype=h5py.vlen_dtype(bytes))
        handle["img_emb"] = np.random.default_rng(0).normal(size=(rows, *ROW)).astype(np.float32)
        offset = handle["Image Index"].id.get_offset()
    data = bytearray(shard.read_bytes())
    descriptor = data[offset:offset + 16]
    assert struct.unpack("<I", descriptor[:4])[0] == width  # the first row's descriptor: length, heap collection, index
    for row in range(1, rows - len(NAMES)):
        data[offset + 16 * row:offset + 16 * row + 16] = descriptor  # the same heap object, row after row
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size < 1 << 20

    tracemalloc.start()
    try:
        with pytest.raises(DataError) as raised:
            build(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(raised.value)
    assert "appears twice" not in message, f"the ids were read whole ({peak >> 20} MB) before anything refused them: " \
                                           f"{message[:200]}"
    assert "Image Index" in message and "bytes" in message, message[:300]
    assert peak < 32 << 20, f"{peak >> 20} MB allocated reading the ids of a {shard.stat().st_size:,}-byte shard"


# ---------------------------------------------------------------------------- checkpoints


def _edited_checkpoint(directory: Path, edit_json=None, edit_tensors=None) -> Path:
    """The pass-14 trained checkpoint with optimizer.json and/or optimizer.safetensors edited, hashes re-recorded."""
    _trained_checkpoint(directory)
    checkpoint = directory / "step-00000001"
    if edit_json is not None:
        rest = json.loads((checkpoint / "optimizer.json").read_text())
        edit_json(rest)
        (checkpoint / "optimizer.json").write_text(json.dumps(rest))
        _rehash(checkpoint, "optimizer.json")
    if edit_tensors is not None:
        tensors = edit_tensors(load_file(checkpoint / "optimizer.safetensors"))
        save_file(tensors, checkpoint / "optimizer.safetensors")
        _rehash(checkpoint, "optimizer.safetensors")
    return checkpoint


@pytest.mark.parametrize(("key", "value"), [("maximize", True), ("weight_decay", 1e6), ("eps", -1.0),
                                            ("amsgrad", True), ("betas", "ab")])
def test_a_checkpoints_optimizer_settings_do_not_replace_this_runs(tmp_path, key, value):
    """_optimizer_state hands optimizer.json's param_groups to load_state_dict, which replaces the live groups'
    settings with them; only the parameter counts and ids are checked. A checkpoint whose optimizer.json says
    `maximize: true` resumes as gradient ascent, `weight_decay: 1e6` or `eps: -1` silently, all under a matching
    config hash (train.weight_decay is in it); `amsgrad: true` ends the first step in KeyError 'max_exp_avg_sq' and
    `betas: "ab"` in a TypeError. The checkpoint should be skipped with its reason (or this run's settings kept)."""
    _edited_checkpoint(tmp_path, edit_json=lambda rest: rest["param_groups"][0].update({key: value}))
    loaded, _, optimizer, lines = _load_fresh(tmp_path)
    if loaded is None:
        return  # skipped with its reason
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, fused=True).param_groups[0]
    assert optimizer.param_groups[0][key] == fresh[key], \
        f"resumed with the checkpoint's {key}={optimizer.param_groups[0][key]!r}, this run's is {fresh[key]!r}"


def _step_as_json(value):
    def edit(rest):
        for entries in rest["state"].values():
            entries["step"] = value
    return edit


def _without_step(tensors):
    return {key: value for key, value in tensors.items() if not key.endswith(".step")}


def _negative_step(tensors):
    return {key: (torch.full_like(value, -5.0) if key.endswith(".step") else value) for key, value in tensors.items()}


@pytest.mark.parametrize("case", ["json-text", "json-negative", "json-nan", "tensor-negative"])
def test_an_optimizer_step_count_that_adamw_cannot_have_is_not_resumed(tmp_path, case):
    """_check_moments checks the step's shape, and skips any value that is not a tensor: AdamW's `step` written in
    optimizer.json's JSON part (dropped from the safetensors, hashes re-recorded) as "abc" ends load_latest_checkpoint
    in a ValueError traceback inside optimizer.load_state_dict (only _Unusable is caught), and -5 or NaN (json reads
    NaN) is resumed silently, as is a step tensor of -5: the bias corrections 1 - beta**step then scale every update
    wrongly (NaN: every weight becomes NaN). The checkpoint should be skipped with its reason."""
    edits = {"json-text": dict(edit_json=_step_as_json("abc"), edit_tensors=_without_step),
             "json-negative": dict(edit_json=_step_as_json(-5), edit_tensors=_without_step),
             "json-nan": dict(edit_json=_step_as_json(float("nan")), edit_tensors=_without_step),
             "tensor-negative": dict(edit_tensors=_negative_step)}[case]
    _edited_checkpoint(tmp_path, **edits)
    loaded, _, optimizer, lines = _load_fresh(tmp_path)  # a traceback here fails the test as it stands
    steps = [float(state["step"]) for state in optimizer.state.values()]
    assert loaded is None, f"resumed with AdamW step counts {steps}: {lines[-1]}"
    assert any("optimizer" in line for line in lines), lines


def test_a_checkpoint_file_linked_from_outside_the_checkpoints_folder_is_not_resumed(tmp_path):
    """Pass 13 refused a step folder that is a symbolic link (never resumed, never pruned), but the files inside a
    step folder are followed: model.safetensors replaced by a link to a file elsewhere (its hash is that file's, so
    the recorded sha256 still matches) is hashed and loaded into the model. A checkpoint must hold its files itself,
    as an ELIXR snapshot, a RadDINO folder or a reader's response must; the checkpoint should be skipped."""
    _trained_checkpoint(tmp_path / "checkpoints")
    linked_out_of_checkpoint(tmp_path, "model.safetensors")
    loaded, _, _, lines = _load_fresh(tmp_path / "checkpoints")
    assert loaded is None, f"resumed through a link out of the checkpoints folder: {lines[-1]}"
    assert any("model.safetensors" in line for line in lines), lines


def linked_out_of_checkpoint(tmp_path: Path, name: str) -> None:
    """Move the first checkpoint's file ``name`` out of tmp_path/checkpoints and leave a link to it in its place."""
    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(checkpoint / name, elsewhere / name)
    os.symlink(elsewhere / name, checkpoint / name)

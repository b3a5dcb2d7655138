"""Hostile inputs, pass 15: what pass 14 named without filing (a checkpoint's plateau scale above 1 and a data
position past the end of the epoch were resumed; an answer key's calibration string became its letters), and the
problems two fresh passes over the reader study, reports, assets and the training, sampling and evaluation paths
found. Each case builds its input and runs the real entry point or the library function a stage calls, asserting
the project's rule: one line naming the file or key and what to do, exit 2, no traceback; never a hang, a silent
acceptance, or an allocation a small file declares.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import stage_line
from cxr_diffusion.cli import app
from cxr_diffusion.evaluation.report import MetricsFileError
from cxr_diffusion.reader_study.items import StudyItem
from cxr_diffusion.reader_study.kit import build_kit
from cxr_diffusion.reader_study.scoring import score_responses
from scripted_readers import guesser, response_file, truthful
from test_hostile_assets import recorded_root
from test_hostile_pass14 import TwoShapes, _Accelerator
from test_hostile_reports import inputs, report_of, write


# ---------------------------------------------------------------------------- checkpoints: counters of another run


def _saved_and_resumed(directory: Path, **state_fields) -> tuple[object, list[str]]:
    """A checkpoint of TwoShapes saved with ``state_fields``, then resumed by a run of 4 images per step and 10
    micro-batches per epoch: what ``resume`` returns, and what it logged."""
    from cxr_diffusion.diffusion.checkpoints import TrainingState, config_hash, save_checkpoint
    from cxr_diffusion.diffusion.ema import EMA
    from cxr_diffusion.diffusion.resume import resume
    from cxr_diffusion.diffusion.run_plan import Plan

    torch.manual_seed(0)
    model = TwoShapes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMA(list(model.parameters()), on_host=True)
    run_hash = config_hash({"x": 1})
    rng = {"noise": torch.Generator().get_state()[None], "torch": torch.get_rng_state()[None]}
    save_checkpoint(directory, TrainingState(config_hash=run_hash, **state_fields), {"denoiser": model}, optimizer,
                    rng, 2, {"ema": ema.tensors()}, log=lambda line: None)
    lines: list[str] = []

    class Logging(_Accelerator):
        @staticmethod
        def print(*args):
            lines.append(" ".join(map(str, args)))

    return resume(Logging(), directory, run_hash, model, optimizer, ema, torch.Generator(), Plan(4, 10, 100)), lines


@pytest.mark.parametrize("fields, reason", [
    ({"step": 2, "images_seen": 8, "plateau_scale": 2.0}, "plateau_scale"),
    ({"step": 2, "images_seen": 8, "batch_in_epoch": 11}, "batch_in_epoch"),
    ({"step": 2, "images_seen": 9}, "images_seen"),
])
def test_a_checkpoint_whose_counters_this_run_cannot_have_written_is_skipped(tmp_path, fields, reason):
    """The plateau schedule only cuts the rate, so `plateau_scale: 2` resumed a run at twice its learning rate;
    `batch_in_epoch` past the epoch's 10 micro-batches silently skipped the rest of the epoch's data; images seen
    that are not step x images per step misplace the EMA's warm-up. Each is skipped with its reason."""
    resumed, lines = _saved_and_resumed(tmp_path, **fields)
    assert resumed is None, f"resumed from {fields}"
    assert any("skipping" in line and reason in line for line in lines), lines


def test_a_checkpoint_saved_at_the_last_micro_batch_of_an_epoch_is_resumed(tmp_path):
    """Guard: a save at an epoch's last step holds `batch_in_epoch` equal to the epoch's micro-batches."""
    resumed, lines = _saved_and_resumed(tmp_path, step=5, images_seen=20, batch_in_epoch=10, plateau_scale=0.25)
    assert resumed is not None and resumed.batch_in_epoch == 10, lines


# ---------------------------------------------------------------------------- answer keys


@pytest.mark.parametrize("calibration", ["i2", ["i2"], {"7": "x", "8": "y"}, 3])
def test_an_answer_key_whose_calibration_is_not_a_mapping_of_ids_is_refused(tmp_path, calibration):
    """`calibration: "i2"` was read as the calibration ids i and 2, and a list or number went through
    frozenset() the same way; the kit writes a mapping of item id to truth."""
    from cxr_diffusion.reader_study.responses import read_key

    item = {"source": "real", "origin_id": "00000001_000.png", "labels": ["Effusion"]}
    key = {"study_id": "s1", "kit_id": "ab12", "findings": ["Effusion"], "items": {"i1": item},
           "calibration": calibration}
    (tmp_path / "key.json").write_text(json.dumps(key))
    if isinstance(calibration, dict):  # guard: the kit's own form is read
        assert read_key(tmp_path / "key.json").calibration == frozenset({"7", "8"})
        return
    line = stage_line(lambda: read_key(tmp_path / "key.json"))
    assert "not an answer key" in line, line


# ============================================================================ pass 15a: reader study, reports, assets

runner = CliRunner()
FINDINGS = ["Effusion"]


def study_key(folder: Path) -> Path:
    """A 12-item kit (6 real, 6 clip_text) and its answer key, built with a fixed study key."""
    items = [StudyItem(np.full((8, 8), index * 10, np.uint8), "real" if index % 2 else "clip_text", ("Effusion",),
                       f"{index:08d}_000.png") for index in range(12)]
    key = folder / "key.json"
    build_kit(items, folder / "kit", key, "pilot-1", FINDINGS, 0, 32, study_key=b"k")
    return key


# ---------------------------------------------------------------------------- the report's reader-study section


def scored_metrics(tmp_path: Path) -> dict:
    """metrics/reader_study.json as the score_reader_study stage writes it: two readers, one right, one guessing."""
    key = study_key(tmp_path / "study")
    response_file(tmp_path / "responses", key, "alice", truthful)
    response_file(tmp_path / "responses", key, "bob", guesser(3))
    metrics = score_responses(tmp_path / "responses", key)
    assert metrics["readers"] == 2
    return json.loads(json.dumps(metrics))


BOOL_EDITS = {
    "accuracy": lambda pooled: pooled["call"].update(accuracy=True, ci95=[True, True]),
    "balanced_accuracy": lambda pooled: pooled.update(balanced_accuracy=True),
    "auc": lambda pooled: pooled.update(auc=True),
    "realism": lambda pooled: pooled["realism"]["real"].update(mean=True, ci95=None),
}


@pytest.mark.parametrize("edit", sorted(BOOL_EDITS))
def test_a_reader_study_figure_of_true_is_not_reported_as_one(tmp_path, edit):
    """Sibling of the utility fix (a gap fraction of true): the reader-study section formats its numbers with
    its own ``_interval``/``_number`` (``f"{value:.2f}"``), so JSON true in metrics/reader_study.json becomes
    "1.00": a perfect accuracy, balanced accuracy, AUC or realism that no reader gave."""
    metrics = scored_metrics(tmp_path)
    BOOL_EDITS[edit](metrics["pooled"])
    write(inputs(tmp_path).reader_study, metrics)
    try:
        text = report_of(tmp_path)
    except MetricsFileError as error:  # refusing the file is as good as showing the value as text
        assert "\n" not in str(error) and "reader_study.json" in str(error)
        return
    section = text[text.index("## Expert reader study"):]
    rows = [line for line in section.splitlines()
            if line.startswith("| **All readers, pooled**") or line.startswith("| real images")]
    assert rows and all("1.00" not in row for row in rows), rows


def test_a_real_share_of_true_does_not_say_every_item_was_real(tmp_path):
    """``abs(True - 0.5) > 0.05`` and ``f"{True:.0%}"``: the report warned that 100% of the items are real."""
    metrics = scored_metrics(tmp_path)
    metrics["pooled"]["real_share"] = True
    write(inputs(tmp_path).reader_study, metrics)
    try:
        text = report_of(tmp_path)
    except MetricsFileError as error:
        assert "\n" not in str(error) and "reader_study.json" in str(error)
        return
    assert "100% of the answered items are real" not in text


# ---------------------------------------------------------------------------- the responses folder


def test_a_responses_path_that_is_a_file_is_refused_not_scored_as_no_responses(tmp_path):
    """The stage reads ``--responses reader_study/responses``; a reader's export saved there as a file (not
    into the folder) was scored as "No reader responses yet", its answers silently left out."""
    key = study_key(tmp_path / "study")
    export = response_file(tmp_path, key, "alice", truthful, name="export.json")
    responses = tmp_path / "responses"
    export.rename(responses)
    line = stage_line(lambda: score_responses(responses, key))
    assert str(responses) in line and "folder" in line, line


def test_a_fifo_at_the_responses_path_is_refused_not_scored_as_no_responses(tmp_path):
    key = study_key(tmp_path / "study")
    responses = tmp_path / "responses"
    os.mkfifo(responses)
    line = stage_line(lambda: score_responses(responses, key))
    assert str(responses) in line, line


def test_a_responses_folder_that_links_elsewhere_is_not_read(tmp_path):
    """A response file that is a link is refused ("it may point outside the folder"); the folder itself as a
    link was followed, and every export in the folder it points to was scored."""
    key = study_key(tmp_path / "study")
    elsewhere = tmp_path / "someone-elses" / "downloads"
    response_file(elsewhere, key, "alice", truthful)
    (tmp_path / "repo").mkdir()
    responses = tmp_path / "repo" / "responses"
    responses.symlink_to(elsewhere, target_is_directory=True)
    try:
        metrics = score_responses(responses, key)
    except Exception:  # a one-line refusal is what the rule asks: checked by stage_line below
        line = stage_line(lambda: score_responses(responses, key))
        assert "link" in line, line
        return
    assert metrics["readers"] == 0, "read the exports of a folder outside the responses path through a link"


# ---------------------------------------------------------------------------- doctor and the fetch record


def test_doctor_does_not_pass_a_recorded_file_replaced_by_a_link_out_of_the_asset(tmp_path, monkeypatch):
    """fetch refuses a file that links out of a hub folder ("lies outside ...; copy the file itself in") and
    never hashes it; doctor (and fetch's "already in place") compare the record by hashing whatever the name
    resolves to, so the same link, placed after the record, is read and passed as "present"."""
    root = recorded_root(tmp_path / "root")
    folder = root / "external" / "clip-vit-large-patch14"
    outside = tmp_path / "outside" / "config.json"
    outside.parent.mkdir()
    outside.write_bytes((folder / "config.json").read_bytes())  # the same bytes: the hash matches
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)
    from cxr_diffusion.io import sha256_file

    hashed: list[Path] = []
    monkeypatch.setattr("cxr_diffusion.assets.manifest.sha256_file",
                        lambda path: hashed.append(Path(path)) or sha256_file(path))
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert not any(path.resolve() == outside for path in hashed), "doctor read a file outside the asset folder"
    assert result.exit_code == 2 and ("lies outside" in result.output or "link" in result.output), result.output

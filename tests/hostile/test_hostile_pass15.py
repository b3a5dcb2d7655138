"""Hostile inputs, pass 15: what pass 14 named without filing (a checkpoint's plateau scale above 1 and a data
position past the end of the epoch were resumed; an answer key's calibration string became its letters), and the
problems two fresh passes over the reader study, reports, assets and the training, sampling and evaluation paths
found. Each case builds its input and runs the real entry point or the library function a stage calls, asserting
the project's rule: one line naming the file or key and what to do, exit 2, no traceback; never a hang, a silent
acceptance, or an allocation a small file declares.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import stage_line
from test_hostile_pass14 import TwoShapes, _Accelerator


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

"""Pass 24: the pass-23 fixes (commit eb18f78) probed, as a hostile and as a legitimate user. Each test failed on
the code it was filed on. See REPORT_fixes.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_hostile_pass14 import _load_fresh
from test_hostile_pass20_areas import _edited_checkpoint


# ---------------------------------------------------------------------------- checkpoints: fused is what a step does

def _fused_false(rest):
    rest["param_groups"][0]["fused"] = False


def _fused_null(rest):
    rest["param_groups"][0]["fused"] = None


def _fused_absent(rest):
    del rest["param_groups"][0]["fused"]


@pytest.mark.parametrize("edit", [_fused_false, _fused_null, _fused_absent], ids=["false", "null", "absent"])
def test_a_checkpoint_that_is_not_fused_is_not_resumed_into_a_step_that_needs_the_fused_kernel(tmp_path, edit):
    """_check_same_settings accepts a saved `fused` of true, false or null (or none at all) and leaves it out of the
    comparison (_NOT_COMPARED: 'how torch computes a step is not what it computes'). But the trainer builds its AdamW
    with fused=True because step.optimizer_step hands the skip of a non-finite step to the fused kernel through
    `found_inf`: torch's foreach and single-tensor AdamW raise AssertionError('Expected grad_scale and found_inf to
    be None') on it. A checkpoint whose optimizer.json says fused false/null (or lacks it: torch fills None) is
    resumed, and then every bf16/fp32 step of the run ends in that traceback. It should be skipped with its reason
    (or resumed with this run's fused=True)."""
    _edited_checkpoint(tmp_path, edit_json=edit)
    loaded, model, optimizer, lines = _load_fresh(tmp_path)
    if loaded is None:
        assert any("fused" in line for line in lines), lines
        return
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.found_inf = torch.zeros((), dtype=torch.float32)  # as step.optimizer_step does without a scaler
    try:
        optimizer.step()  # AssertionError on the current code
    finally:
        del optimizer.found_inf

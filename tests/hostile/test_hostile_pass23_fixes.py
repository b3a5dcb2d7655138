"""Pass 23: the pass-22 fixes (commits 1f328a5, 0b5aaca, 97a8407) probed, as a hostile and as a legitimate user.
Each test builds its input in ``tmp_path`` and asserts the behaviour the project's rule asks for; each failed on
the code it was filed on. See REPORT_fixes.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cxr_diffusion.evaluation.report import MetricsFileError
from test_hostile_pass14 import _load_fresh
from test_hostile_pass20_areas import _edited_checkpoint
from test_hostile_pass21_areas import report_inputs, run_compare, write
from test_hostile_reports import with_subgroups
from test_report import utility_metrics


# ---------------------------------------------------------------------------- params: '~' refused everywhere

@pytest.mark.parametrize(("key", "value"), [("normal_prompt", "~ no acute cardiopulmonary process"),
                                            ("prompt_template", "~{findings}")])
def test_a_prompt_that_starts_with_a_tilde_is_text_not_a_home_folder(key, value):
    """Section._not_from_a_home_folder runs on every string field (field_validator('*')), so a CLIP prompt, which
    is text and never a path, is refused when it starts with '~' (clinical shorthand for 'approximately'):
    "'clip.normal_prompt' ... starts from a home folder (~) ... write the path in full". Only the fields that name
    a file or folder can start from a home folder."""
    from cxr_diffusion.profiles import params_with

    params = params_with({"clip": {key: value}})
    assert getattr(params.clip, key) == value


# ---------------------------------------------------------------------------- checkpoints: kernel flags

@pytest.mark.parametrize("edit", [{"foreach": 1}, {"fused": 0.0}], ids=["foreach-1", "fused-0.0"])
def test_a_checkpoints_kernel_flags_that_are_not_flags_are_refused(tmp_path, edit):
    """_check_same_settings now requires foreach/fused to be 'true, false or null' but tests
    `value not in (None, True, False)`, and 1 == True, 0.0 == False: optimizer.json edited to foreach: 1 or
    fused: 0.0 (hashes re-recorded) is resumed and torch's param group keeps the number 1 / 0.0."""
    key, value = next(iter(edit.items()))
    _edited_checkpoint(tmp_path, edit_json=lambda rest: rest["param_groups"][0].update(edit))
    loaded, _, optimizer, lines = _load_fresh(tmp_path)
    if loaded is None:
        assert any(key in line for line in lines), lines
        return
    live = optimizer.param_groups[0][key]
    assert live is None or isinstance(live, bool), f"resumed with {key}={live!r}"


# ---------------------------------------------------------------------------- compare: numbers still unchecked

def _test_patients(metrics):
    metrics["test_patients"] = -3


def _synthetic_steps(metrics):
    metrics["synthetic_set"]["steps"] = -3


def _synthetic_guidance(metrics):
    metrics["synthetic_set"]["guidance_scale"] = -7.5


@pytest.mark.parametrize("edit", [_test_patients, _synthetic_steps, _synthetic_guidance],
                         ids=["test-patients", "synthetic-steps", "synthetic-guidance"])
def test_compare_refuses_utility_numbers_the_report_prints_but_ranges_leave_unchecked(tmp_path, edit):
    """metric_ranges.UTILITY now covers the subgroups and seed counts, but not the utility file's own numbers that
    report.md prints in its prose: test_patients ('scored on the same N real test images of -3 patients') and
    synthetic_set.steps / guidance_scale ('dpm++, -3 steps, guidance -7.5'), while SAMPLING refuses the same
    steps and guidance_scale below 1 in metrics/sample."""
    inputs = report_inputs(tmp_path)
    metrics = with_subgroups(utility_metrics())
    edit(metrics)
    write(inputs.utility / "elixr.json", metrics)
    write(inputs.evaluations / "elixr.json", {"closeness": {"domain_fd": 50.0}})
    with pytest.raises(MetricsFileError) as raised:
        run_compare(tmp_path)
    assert "\n" not in str(raised.value) and "elixr.json" in str(raised.value)


# ---------------------------------------------------------------------------- sample: missing_condition vs count

def test_sample_does_not_count_a_test_image_beyond_sample_count_as_rejected(tmp_path):
    """sample_branch now writes `images_in: len(test) + missing` and `rejected: missing` (missing_condition), but
    ConditionedImages counts missing_condition over the WHOLE test split before `limit` (sample.count) cuts it:
    with sample.count 1 and the store lacking the second test image (one never meant to be sampled), the manifest
    says images_in 2, written 1, rejected 1 {missing_condition: 1} and the metrics missing_condition 1, while
    the same run with that image's condition present says images_in 1, rejected 0. Only an image skipped among
    those sampled (before the count was reached) was rejected."""
    from conftest import make_training_data
    from test_hostile_pass16 import _sample_params, saved_untrained_model

    from cxr_diffusion.data.shards import PreparedImages
    from cxr_diffusion.profiles import params_with
    from cxr_diffusion.sampling.sample import sample_branch

    data = make_training_data(tmp_path / "data", n_images=16)
    saved_untrained_model(data["store"], tmp_path / "model")
    from test_hostile_pass22_areas import store_without

    test_names = PreparedImages(data["prepared"], "test").image_indices
    assert len(test_names) >= 2
    left_out = test_names[-1]  # after the first: sample.count 1 never reaches it
    store_without(data["store"], left_out, tmp_path / "store")
    base = _sample_params().model_dump()
    params = params_with({**base, "sample": {**base["sample"], "count": 1, "batch_size": 1}})
    sample_branch(params, "elixr", tmp_path / "model", data["prepared"], tmp_path / "store", tmp_path / "samples",
                  tmp_path / "figures", tmp_path / "metrics.json")
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert manifest["written"] == 1
    assert manifest["rejected"] == 0 and manifest["images_in"] == 1, manifest

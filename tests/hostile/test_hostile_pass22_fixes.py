"""Pass 22: the pass-21 fixes (commit f11fbdc) probed, as a hostile and as a legitimate user. Each test builds its
input in ``tmp_path`` and asserts the behaviour the project's rule asks for; each failed on the code it was filed on.
See REPORT_fixes.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import stage_line
from cxr_diffusion.evaluation.report import MetricsFileError
from test_hostile_pass14 import _load_fresh
from test_hostile_pass20_areas import _edited_checkpoint
from test_hostile_pass21_areas import filtered_and_prepared, prepare_again, report_inputs, run_compare, write
from test_hostile_reports import with_subgroups
from test_report import utility_metrics


# ---------------------------------------------------------------------------- filter vs prepare's re-check

def test_prepare_refuses_a_filtered_table_whose_patient_gender_the_filter_rejects(tmp_path):
    """The filter now rejects a Patient Gender other than M or F (invalid_sex), but check_split_table (prepare's
    re-check of filtered.csv, which mirrors invalid_age and the label/view rules so the two 'cannot drift apart')
    does not: filtered.csv edited to 'Female' is prepared and put in the subgroups' 'other' group, silently."""
    _, params, _ = filtered_and_prepared(tmp_path)
    table = pd.read_csv(tmp_path / "filtered" / "filtered.csv", dtype=str, keep_default_na=False)
    table.loc[0, "Patient Gender"] = "Female"
    table.to_csv(tmp_path / "filtered" / "filtered.csv", index=False)
    line = stage_line(lambda: prepare_again(tmp_path, params))
    assert "Patient Gender" in line and "\n" not in line


# ---------------------------------------------------------------------------- utility statistics

def test_a_subgroup_of_one_patient_gets_no_zero_width_interval():
    """patient_draws now gives no draws for a split of one patient (an interval [x, x] reads as certainty), but a
    subgroup of one patient inside a larger split gets exactly that: every draw holds that patient's films 0..k
    times, the group's AUROC and underdiagnosis rate never move, and metrics/utility reports ci [0.4, 0.4]."""
    from cxr_diffusion.utility.statistics import patient_draws
    from cxr_diffusion.utility.subgroups import subgroup_results

    rng = np.random.default_rng(0)
    labels = np.zeros((40, 2), int)
    labels[::2, 0], labels[1::2, 1] = 1, 1
    scores = rng.random((40, 2))
    patients = ["solo"] * 20 + [f"p{i}" for i in range(20)]
    sex = ["F"] * 20 + ["M"] * 20
    result = subgroup_results(labels, scores, ["Effusion", "No Finding"], patients, {"sex": sex},
                              {"sex": ["F", "M"]}, patient_draws(patients, 200, 0))
    female = result["sex"]["groups"]["F"]
    assert female["patients"] == 1
    for low, high in (("ci_low", "ci_high"), ("underdiagnosis_ci_low", "underdiagnosis_ci_high")):
        assert female[low] is None and female[high] is None, female


# ---------------------------------------------------------------------------- compare: numbers still unchecked

def _sub_auroc(metrics, _):
    metrics["arms"]["synthetic"]["subgroups"]["sex"]["groups"]["F"]["macro_auroc"] = 7.5


def _sub_rate(metrics, _):
    metrics["arms"]["synthetic"]["subgroups"]["sex"]["groups"]["F"]["underdiagnosis"] = -3.0


def _seed_count(metrics, _):
    metrics["arms"]["synthetic"]["seeds"]["count"] = -3


def _images_per_second(_, inputs):
    write(inputs.sampling / "elixr.json", {"images_per_second": -3.0})


@pytest.mark.parametrize("edit", [_sub_auroc, _sub_rate, _seed_count, _images_per_second],
                         ids=["subgroup-auroc", "subgroup-underdiagnosis", "seed-count", "sampling-images-per-second"])
def test_compare_refuses_the_numbers_metric_ranges_still_leaves_unchecked(tmp_path, edit):
    """metric_ranges.UTILITY checks arms.*.macro/per_class/vs_real/seeds.{mean,sd,min,max} but not the subgroups
    (a group's macro AUROC of 7.5 is written to report.md's 'By sex' table and summary.json), seeds.count (-3 in
    summary.json) nor the sampling metrics (images_per_second -3.0 in summary.json)."""
    inputs = report_inputs(tmp_path)
    metrics = with_subgroups(utility_metrics())
    edit(metrics, inputs)
    write(inputs.utility / "elixr.json", metrics)
    write(inputs.evaluations / "elixr.json", {"closeness": {"domain_fd": 50.0}})
    with pytest.raises(MetricsFileError) as raised:
        run_compare(tmp_path)
    assert "\n" not in str(raised.value) and "elixr.json" in str(raised.value)
    assert not (tmp_path / "summary.json").exists()


# ---------------------------------------------------------------------------- checkpoints

def test_a_checkpoint_whose_optimizer_says_differentiable_is_not_resumed_into_a_failing_step(tmp_path):
    """_NOT_COMPARED skips 'differentiable' as 'how, not what, a step computes'; load_state_dict then puts the
    checkpoint's value on the live group. optimizer.json edited to differentiable: true (hashes re-recorded) is
    resumed, and the first optimizer.step() ends in RuntimeError 'Adam with fused=True does not support
    differentiable=True' (a traceback mid-training). Skip the checkpoint with its reason, or keep this run's."""
    _edited_checkpoint(tmp_path, edit_json=lambda rest: rest["param_groups"][0].update({"differentiable": True}))
    loaded, model, optimizer, lines = _load_fresh(tmp_path)
    if loaded is None:
        return
    sum(parameter.sum() for parameter in model.parameters()).backward()
    try:
        optimizer.step()
    except RuntimeError as error:
        pytest.fail(f"resumed, then the first step failed: {error}")


# ---------------------------------------------------------------------------- params: ~ expansion

def test_the_run_hash_of_a_home_relative_vae_does_not_depend_on_who_runs_it(tmp_path, monkeypatch):
    """Section._home_expanded turned train.vae '~/models/vae' into /home/<user>/models/vae before maths_settings
    took it into the checkpoint's config hash: the same params.yaml run as another user or in a container with
    another HOME got another hash, every checkpoint of the long run was 'written under config hash ..., starting
    from scratch', and the new run's first save pruned them. A path from a home folder names another folder for
    each user, so the params refuse it, naming the key: no hash can depend on who runs it."""
    from cxr_diffusion.config import ParamsError
    from cxr_diffusion.profiles import params_with

    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    with pytest.raises(ParamsError) as refused:
        params_with({"train": {"vae": "~/models/vae"}})
    assert "train.vae" in str(refused.value) and "home folder (~)" in str(refused.value)


# ---------------------------------------------------------------------------- io.placed_path

def test_a_trailing_slash_does_not_make_atomic_directory_replace_what_a_link_points_to(tmp_path):
    """placed_path keeps a link at the target's own name ('a link there is replaced, not what it points to'), but
    for 'out/' os.path.split gives the name '' and realpath follows the link: atomic_directory('out/') replaces the
    linked folder's contents (every other file there deleted), where atomic_directory('out') replaces the link."""
    from cxr_diffusion.io import atomic_directory

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("someone else's file")
    (tmp_path / "out").symlink_to(elsewhere)
    with atomic_directory(f"{tmp_path / 'out'}/") as folder:
        (folder / "new.txt").write_text("new")
    assert (elsewhere / "keep.txt").read_text() == "someone else's file"

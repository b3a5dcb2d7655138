"""Pass 26 sweep (utility subgroups, split fractions, compare's range rules): each test failed on the code at filing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_diffusion.errors import UserError
from cxr_diffusion.config import ParamsError
from cxr_diffusion.profiles import params_with


# ----------------------------------------------------------------------------- 1. age bands outside the filter's ages

@pytest.mark.parametrize("overrides", [
    {"filter": {"age_max": 50}, "utility": {"age_bands": [40, 60]}},   # 60+ can hold no film
    {"filter": {"age_max": 100}, "utility": {"age_bands": [40, 110]}},  # 110+ can hold no film; "40-109" ends at 100
    {"filter": {"age_min": 40}, "utility": {"age_bands": [40, 60]}},   # <40 can hold no film
])
def test_an_age_band_the_filter_leaves_empty_is_refused_at_params_time(overrides):
    """utility.age_bands is checked only for increasing, never against filter.age_min/age_max: a band start above age_max
    (or at/below age_min) gives a band no film can fall in, which the utility stage drops silently (a band missing from
    the report, the gap n/a or between fewer bands than configured); it must be one ParamsError naming age_bands."""
    with pytest.raises(ParamsError, match=r"age_bands"):
        params_with(overrides)


# ----------------------------------------------------------------------------- 2. an empty validation split

@pytest.mark.parametrize("train", [{"lr_schedule": "plateau"}, {"early_stopping_patience": 2}])
def test_a_validation_steered_schedule_without_a_validation_split_is_refused(train):
    """With filter.split.val_fraction 0 the val split is empty, the Validator returns no loss and record_validation
    returns at once: train.lr_schedule plateau silently runs at a constant rate and early stopping never fires. The
    params must refuse the pair, naming filter.split.val_fraction or the train key."""
    with pytest.raises(ParamsError, match=r"val_fraction|lr_schedule|early_stopping_patience"):
        params_with({"filter": {"split": {"val_fraction": 0.0}}, "train": train})


class _Images:
    def __init__(self, names, classes=("Effusion", "No Finding")):
        self.image_indices, self.classes = list(names), tuple(classes)

    def __len__(self):
        return len(self.image_indices)


def test_evaluate_refusing_an_empty_val_split_names_val_fraction_not_the_filter():
    """filter.split.val_fraction: 0 passes params, the models train, then evaluate refuses "0 val images ... the filter
    leaves too few: widen it": wrong advice (widening the filter adds no val image) and no param named. The refusal must
    name filter.split.val_fraction (better still: refuse val_fraction 0 at params time, before hours of training)."""
    from cxr_diffusion.evaluation.evaluate import BranchImages

    test = _Images([f"{i:08d}_000.png" for i in range(4)])
    images = BranchImages(test=test, val=_Images([]), train=_Images(["x.png"] * 4), generated=_Images(test.image_indices))
    with pytest.raises(UserError) as raised:
        images.check_generated_from_test(Path("samples"))
    assert "val_fraction" in str(raised.value), str(raised.value)


# ----------------------------------------------------------------------------- 3. tied scores at the underdiagnosis threshold

def test_tied_no_finding_scores_are_not_all_called_no_finding():
    """The threshold is np.quantile of the No Finding scores and every film scoring >= it is called No Finding, so tied
    scores (float32 probabilities saturate at 1.0) are all called: a constant-score arm calls all 40 films No Finding
    though 10 have it, and reports an underdiagnosis rate of 1.0 in every group, while the docstring and report say each
    arm calls as many films as have it. Ties at the threshold must share the remaining calls (expected rate 10/40)
    or the rate must be withheld with a note saying why."""
    from cxr_diffusion.utility.statistics import patient_draws
    from cxr_diffusion.utility.subgroups import group_order, subgroup_results

    n = 40
    normal = np.array([True] * 10 + [False] * 30)
    labels = np.stack([~normal, normal], axis=1).astype(int)
    scores = np.full((n, 2), 0.5)  # the arm gives every film the same probability
    patients = [f"p{i}" for i in range(n)]
    subgroups = {"sex": ["F" if i % 2 else "M" for i in range(n)]}
    result = subgroup_results(labels, scores, ["Effusion", "No Finding"], patients, subgroups, group_order([40, 60]),
                              patient_draws(patients, 20, 0))
    for name, group in result["sex"]["groups"].items():
        rate = group["underdiagnosis"]
        assert (rate is None and "tie" in group.get("note", "")) or rate == pytest.approx(0.25), (name, group)


# ----------------------------------------------------------------------------- 4. compare's range rules

def _report_inputs(tmp_path):
    from test_hostile_reports import inputs, write
    return inputs(tmp_path), write


def _compare_refuses(tmp_path, path_name: str) -> None:
    from cxr_diffusion.evaluation.report import MetricsFileError
    from test_hostile_reports import report_of

    with pytest.raises(MetricsFileError) as raised:
        report_of(tmp_path)
    assert path_name in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("value", [5.0, 1e300])
def test_a_gap_fraction_above_one_is_refused_by_compare(tmp_path, value):
    """gap_fraction = (real - arm) / real is at most 1 (an arm cannot lose more than all of real's AUROC), but
    metric_ranges.UTILITY has no rule for arms.*.vs_real.gap_fraction: 5.0 or 1e300 in metrics/utility/<branch>.json is
    printed as the arm's gap (a 300-digit cell) and kept in the summary. compare must refuse it naming the file."""
    from test_report import utility_metrics

    paths, write = _report_inputs(tmp_path)
    metrics = utility_metrics()
    metrics["arms"]["synthetic"]["vs_real"]["gap_fraction"] = value
    write(paths.utility / "elixr.json", metrics)
    _compare_refuses(tmp_path, "elixr.json")


READER_EDITS = {
    "accuracy": lambda m: m["pooled"]["call"].update(accuracy=7.5),
    "p_value": lambda m: m["pooled"]["call"].update(p_value=-3.0),
    "balanced_accuracy": lambda m: m["pooled"].update(balanced_accuracy=42.0),
    "auc": lambda m: m["pooled"].update(auc=-0.3),
    "called_real": lambda m: m["pooled"]["called_real"]["real"].update(fraction=3.0),
    "realism": lambda m: m["pooled"]["realism"]["real"].update(mean=99.0),
    "f1": lambda m: m["pooled"]["findings"]["Effusion"]["real"].update(f1=-2.0),
    "readers": lambda m: m.update(readers=-5),
}


@pytest.mark.parametrize("edit", sorted(READER_EDITS))
def test_an_impossible_reader_study_figure_is_refused_by_compare(tmp_path, edit):
    """compare reads metrics/reader_study.json with _read and no range rules (metric_ranges has none for it): an
    accuracy of 7.5, a p-value of -3, a realism mean of 99 on the 1-5 scale, a negative reader count... are written into
    the report as the readers' results. It must be refused as the out-of-range utility and evaluate metrics are."""
    from test_hostile_pass15 import scored_metrics

    paths, write = _report_inputs(tmp_path)
    metrics = scored_metrics(tmp_path)
    READER_EDITS[edit](metrics)
    write(paths.reader_study, metrics)
    _compare_refuses(tmp_path, "reader_study.json")


def test_an_evaluator_auroc_above_one_is_refused_by_compare(tmp_path):
    """metrics/evaluator.json is read with no range rule: a test_macro_auroc of 7.5 is printed in the report's header
    as the evaluator's AUROC ("test macro AUROC 7.500"). It must be refused like the utility AUROCs."""
    paths, write = _report_inputs(tmp_path)
    write(paths.evaluator, {"test_macro_auroc": 7.5})
    _compare_refuses(tmp_path, "evaluator.json")

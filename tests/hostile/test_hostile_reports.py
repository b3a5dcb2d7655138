"""The comparison report built from metrics files edited by hand (or damaged on a DVC remote): a string where a
number belongs is inert text, and a file missing a key or holding a list for a mapping is one line naming it.
Found by the seventh hostile pass: numbers were written with str(), so an edited metric became raw HTML or a
table cell of its own, and a damaged file ended compare in a KeyError, TypeError or AttributeError traceback.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO
from cxr_diffusion.evaluation.report import MetricsFileError, ReportInputs, compare
from cxr_diffusion.profiles import params_with
from test_report import utility_metrics

PAYLOAD = "<img src=x onerror=alert(1)>"


def inputs(tmp_path: Path) -> ReportInputs:
    return ReportInputs(*(tmp_path / "in" / name for name in ("evaluate", "evaluator.json", "sample", "live",
                                                             "utility", "reader_study.json", "embed_elixr.json")))


def write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def report_of(tmp_path: Path) -> str:
    compare(params_with({"branches": ["elixr"]}), inputs(tmp_path), tmp_path / "summary.json", tmp_path / "report.md")
    return (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("key", ["domain_fd", "kid", "inception_fid"])
def test_a_metric_edited_to_text_is_written_as_text(tmp_path, key):
    write(inputs(tmp_path).evaluations / "elixr.json", {"closeness": {key: PAYLOAD}})
    text = report_of(tmp_path)
    assert "<img" not in text and "&lt;img" in text


def test_a_pipe_in_a_metric_cannot_add_a_table_cell(tmp_path):
    write(inputs(tmp_path).evaluations / "elixr.json", {"closeness": {"kid": "1 | injected | 3"}})
    row = next(line for line in report_of(tmp_path).splitlines() if line.startswith("| KID |"))
    assert row.count("|") - row.count("\\|") == 3, row


def test_the_evaluator_auroc_edited_to_markup_is_text(tmp_path):
    write(inputs(tmp_path).evaluator, {"test_macro_auroc": PAYLOAD})
    assert "<img" not in report_of(tmp_path)


@pytest.mark.parametrize("where", ["arm", "classifier", "sampler", "train_images"])
def test_utility_strings_are_text(tmp_path, where):
    metrics = utility_metrics()
    if where == "arm":
        metrics["arms"][PAYLOAD] = metrics["arms"].pop("synthetic")
    elif where == "classifier":
        metrics["classifier"] = PAYLOAD
    elif where == "sampler":
        metrics["synthetic_set"]["sampler"] = PAYLOAD
    else:
        metrics["arms"]["synthetic"]["train_images"] = PAYLOAD
    write(inputs(tmp_path).utility / "elixr.json", metrics)
    assert "<img" not in report_of(tmp_path)


def test_the_pretrained_network_notes_are_text(tmp_path):
    details = {"features": PAYLOAD, "real": "test split", "n_real": 3, "n_generated": 3, "resolution": "16x16",
               "weights_sha256": "<b>bold</b>0123456789"}
    write(inputs(tmp_path).evaluations / "elixr.json", {"closeness": {"inception_fid": 1.0,
                                                                        "inception_fid_details": details}})
    text = report_of(tmp_path)
    assert "<img" not in text and "<b>" not in text


def test_the_reader_study_item_count_edited_to_markup_is_text(tmp_path):
    write(inputs(tmp_path).reader_study, {"readers": 0, "items": PAYLOAD, "study_id": "cxr-study", "rejects": []})
    assert "<img" not in report_of(tmp_path)


def test_an_arm_scaled_by_a_superscript_digit_is_reported_not_a_traceback(tmp_path):
    """'²'.isdigit() is True and int('²') raised ValueError when the arms were ordered."""
    metrics = utility_metrics()
    metrics["arms"]["synthetic_x\u00b2"] = metrics["arms"]["synthetic"]
    write(inputs(tmp_path).utility / "elixr.json", metrics)
    assert "| elixr | synthetic_x\u00b2 |" in report_of(tmp_path)


def damage(folder: ReportInputs, how: str) -> Path:
    metrics = utility_metrics()
    if how == "no_synthetic_set":
        del metrics["synthetic_set"]
    elif how == "arm_without_macro":
        del metrics["arms"]["synthetic"]["macro"]
    elif how == "closeness_list":
        write(folder.evaluations / "elixr.json", {"closeness": [1, 2]})
        return folder.evaluations / "elixr.json"
    elif how == "prdc_list":
        write(folder.evaluations / "elixr.json", {"prdc": [0.5]})
        return folder.evaluations / "elixr.json"
    elif how == "pooled_list":
        write(folder.reader_study, {"readers": 1, "pooled": []})
        return folder.reader_study
    write(folder.utility / "elixr.json", metrics)
    return folder.utility / "elixr.json"


@pytest.mark.parametrize("how", ["no_synthetic_set", "arm_without_macro", "closeness_list", "prdc_list",
                                 "pooled_list"])
def test_a_damaged_metrics_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, how):
    folder = inputs(tmp_path)
    damaged = damage(folder, how)
    with pytest.raises(MetricsFileError) as raised:
        report_of(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "not the metrics its stage writes" in message
    assert str(damaged) in message or str(damaged.parent) in message, message
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "summary.json").exists()


def test_the_compare_stage_exits_2_with_one_line_on_a_damaged_utility_file(tmp_path, capsys, tiny_params_file):
    folder = inputs(tmp_path)
    damage(folder, "no_synthetic_set")
    spec = importlib.util.spec_from_file_location("compare_stage", REPO / "stages" / "compare.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    with pytest.raises(SystemExit) as exit_info:
        stage.main(params=tiny_params_file, evaluations=folder.evaluations, evaluator=folder.evaluator,
                   sampling=folder.sampling, training=folder.training, utility=folder.utility,
                   reader_study=folder.reader_study, elixr_embedding=folder.elixr_embedding,
                   summary=tmp_path / "summary.json", report=tmp_path / "report.md",
                   training_curves=tmp_path / "training_curves.png")
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and error[0].startswith("stage compare failed: ")


# ---- an eighth hostile pass ----------------------------------------------------------------------------------
def with_subgroups(metrics: dict) -> dict:
    """``metrics`` with a by-sex subgroup result on every arm, as the utility stage writes it."""
    groups = {"F": {"images": 20, "macro_auroc": 0.8, "underdiagnosis": 0.1},
              "M": {"images": 20, "macro_auroc": 0.75, "underdiagnosis": 0.2}}
    for arm in metrics["arms"].values():
        arm["subgroups"] = {"sex": {"classes": ["Effusion"], "groups": json.loads(json.dumps(groups)),
                                    "auroc_gap": {"gap": 0.05, "ci_low": 0.0, "ci_high": 0.1, "worst": "M"},
                                    "underdiagnosis_gap": {"gap": None, "ci_low": None, "ci_high": None}}}
    return metrics


def test_subgroups_as_the_utility_stage_writes_them_are_reported(tmp_path):
    write(inputs(tmp_path).utility / "elixr.json", with_subgroups(utility_metrics()))
    assert "By sex (test films: F: 20, M: 20; classes: Effusion):" in report_of(tmp_path)


@pytest.mark.parametrize("where", ["group size", "attribute name"])
def test_subgroup_sizes_and_attribute_names_edited_to_markup_are_text(tmp_path, where):
    """A group's 'images' and the attribute (a key of 'subgroups') reached report.md as raw HTML:
    'By sex (test films: F: <img ...>' and 'By <img ...> (test films: ...'."""
    metrics = with_subgroups(utility_metrics())
    for arm in metrics["arms"].values():
        if where == "group size":
            arm["subgroups"]["sex"]["groups"]["F"]["images"] = PAYLOAD
        else:
            arm["subgroups"][PAYLOAD] = arm["subgroups"].pop("sex")
    write(inputs(tmp_path).utility / "elixr.json", metrics)
    text = report_of(tmp_path)
    assert "<img" not in text and "&lt;img" in text


def utility_with_a_nan_interval() -> dict:
    metrics = utility_metrics()
    metrics["arms"]["real"]["per_class"]["Effusion"]["ci_low"] = float("nan")
    return metrics


NON_FINITE = {  # the folder (a ReportInputs field), the file in it, the key as the message names it, the constant
    # as JSON spells it, and the file's content
    "evaluate": ("evaluations", "elixr.json", "closeness.domain_fd", "NaN",
                 lambda: {"closeness": {"domain_fd": float("nan"), "domain_fd_95ci": [1.0, 2.0]}}),
    "sample": ("sampling", "elixr.json", "images_per_second", "Infinity", lambda: {"images_per_second": float("inf")}),
    "training": ("training", "elixr/metrics.json", "val.loss", "-Infinity", lambda: {"val": {"loss": float("-inf")}}),
    "utility": ("utility", "elixr.json", "arms.real.per_class.Effusion.ci_low", "NaN", utility_with_a_nan_interval),
}


@pytest.mark.parametrize("where", sorted(NON_FINITE))
def test_a_nan_or_infinity_in_a_metrics_file_is_one_line_naming_file_and_key_and_replaces_nothing(tmp_path, where):
    """json reads NaN and Infinity; compare wrote report.md (a 'nan' in its table), then failed writing the summary
    with a ValueError traceback, leaving the old summary beside the new report."""
    folder, name, key, constant, metrics = NON_FINITE[where]
    path = getattr(inputs(tmp_path), folder) / name
    write(path, metrics())
    assert constant in path.read_text()
    for output in ("summary.json", "report.md"):
        (tmp_path / output).write_text("the last good one")
    with pytest.raises(MetricsFileError) as raised:
        report_of(tmp_path)
    assert str(raised.value) == (f"{path}: {key} is {constant}, not a number; rerun the stage that writes it "
                                 f"(`dvc repro`)")
    for output in ("summary.json", "report.md"):
        assert (tmp_path / output).read_text() == "the last good one"


def test_a_nan_in_a_training_log_compare_does_not_read_is_left_alone(tmp_path):
    """DVCLive logs training as it goes (a skipped step's loss can be NaN); only val.loss, val.conditioning_gap and
    final.steps reach the summary."""
    write(inputs(tmp_path).training / "elixr" / "metrics.json", {"train": {"loss": float("nan")}, "val": {"loss": 0.5},
                                                                 "final": {"steps": 10}})
    assert "| Val loss / conditioning gap | 0.5000 / n/a |" in report_of(tmp_path)


# ----------------------------------------------------------------------------- pass 9: JSON true where a number belongs

def test_a_gap_fraction_of_true_is_shown_as_text_not_as_a_hundred_percent(tmp_path):
    """true + 0.0 is 1.0: the report said the arm lost all of the real arm's AUROC."""
    metrics = utility_metrics()
    metrics["arms"]["synthetic"]["vs_real"]["gap_fraction"] = True
    write(inputs(tmp_path).utility / "elixr.json", metrics)
    row = next(line for line in report_of(tmp_path).splitlines() if line.startswith("| elixr | synthetic |"))
    assert row.rstrip(" |").endswith("True") and "1.000 |" not in row


def test_a_macro_difference_of_true_is_shown_as_text_not_as_plus_one(tmp_path):
    metrics = utility_metrics()
    metrics["arms"]["synthetic"]["vs_real"]["macro"]["difference"] = True
    write(inputs(tmp_path).utility / "elixr.json", metrics)
    text = report_of(tmp_path)
    assert "+1.000" not in text and "True [" in text

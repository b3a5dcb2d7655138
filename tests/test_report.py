"""compare reads what dvc.yaml passes it, nothing at a fixed path: summary and report come from those files."""

from __future__ import annotations

import json

from cxr_diffusion.profiles import params_with
from cxr_diffusion.evaluation.report import ReportInputs, compare


def write(path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_compare_reads_the_inputs_it_is_given_and_links_figures_beside_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing under the working directory: a fixed path would find nothing
    inputs = ReportInputs(tmp_path / "in/evaluate", tmp_path / "in/evaluator.json", tmp_path / "in/sample",
                          tmp_path / "in/live", tmp_path / "in/utility", tmp_path / "in/reader_study.json")
    write(inputs.evaluations / "elixr.json", {"closeness": {"domain_fd": 12.5, "domain_fd_95ci": [10.0, 15.0]}})
    write(inputs.evaluator, {"test_macro_auroc": 0.875})
    write(inputs.sampling / "elixr.json", {"images_per_second": 4.5})
    write(inputs.training / "elixr" / "metrics.json", {"val": {"loss": 0.25, "conditioning_gap": 0.01},
                                                      "final": {"steps": 40}})
    report = tmp_path / "out/reports/report.md"
    (report.parent / "samples" / "elixr").mkdir(parents=True)
    (report.parent / "samples" / "elixr" / "original_vs_generated_6.png").write_bytes(b"")

    write(inputs.utility / "elixr.json", utility_metrics())
    summary = compare(params_with({"branches": ["elixr"]}), inputs, tmp_path / "out/summary.json", report)

    assert summary["elixr"]["domain_fd"] == 12.5 and summary["elixr"]["domain_fd_ci_high"] == 15.0
    assert summary["elixr"]["val_loss"] == 0.25 and summary["elixr"]["train_steps"] == 40
    assert summary["elixr"]["sampling_img_per_s"] == 4.5
    assert json.loads((tmp_path / "out/summary.json").read_text()) == summary
    text = report.read_text()
    assert "test macro AUROC 0.875" in text and "12.50 [10.00, 15.00]" in text
    assert "(samples/elixr/original_vs_generated_6.png)" in text and "one_row_per_finding" not in text
    utility = summary["elixr"]["utility"]
    assert utility["real"]["macro_auroc"] == 0.9 and "vs_real" not in utility["real"]
    assert utility["synthetic"]["vs_real"] == -0.1 and utility["synthetic"]["gap_fraction"] == 0.1 / 0.9
    assert utility["synthetic"]["per_class"]["Effusion"] == {"auroc": 0.75, "ci_low": 0.6, "ci_high": 0.85}
    assert "| elixr | synthetic | 64 | 0.800 [0.700, 0.880] | 0.025 (0.780-0.830) | -0.100 [-0.180, -0.020] | 0.111 |" \
        in text
    assert "| elixr | real | 64 | 0.900 [0.840, 0.950] | n/a (1 seed) | (baseline) | |" in text
    assert "| real | 0.90 [0.80, 0.95] | 0.90 [0.85, 0.95] |" in text
    assert "variations of the training images" in text and "(utility/elixr/auroc.png)" in text
    assert "(<training_curves.png>)" in text and (report.parent / "training_curves.png").stat().st_size > 10_000


def test_report_says_how_to_get_the_utility_tables_before_they_exist(tmp_path):
    inputs = ReportInputs(*(tmp_path / name for name in ("evaluate", "evaluator.json", "sample", "live", "utility",
                                                   "reader_study.json")))
    summary = compare(params_with({"branches": ["elixr"]}), inputs, tmp_path / "summary.json", tmp_path / "report.md")
    assert summary["elixr"]["utility"] == {}
    assert "Not computed yet: run `dvc repro` (stages utility_real and utility@<branch>)" in (tmp_path / "report.md").read_text()


def utility_metrics() -> dict:
    """metrics/utility/<branch>.json as the utility stage writes it, with round numbers."""
    def auroc(effusion, nodule, macro):
        return {"per_class": {"Effusion": effusion, "Nodule/Mass": nodule}, "macro": macro}
    real = auroc({"auroc": 0.9, "ci_low": 0.8, "ci_high": 0.95}, {"auroc": 0.9, "ci_low": 0.85, "ci_high": 0.95},
                 {"auroc": 0.9, "ci_low": 0.84, "ci_high": 0.95})
    synthetic = auroc({"auroc": 0.75, "ci_low": 0.6, "ci_high": 0.85}, {"auroc": 0.85, "ci_low": 0.8, "ci_high": 0.9},
                      {"auroc": 0.8, "ci_low": 0.7, "ci_high": 0.88})
    difference = {"per_class": {"Effusion": {"difference": -0.15, "ci_low": -0.3, "ci_high": -0.05},
                                "Nodule/Mass": {"difference": -0.05, "ci_low": -0.1, "ci_high": 0.0}},
                  "macro": {"difference": -0.1, "ci_low": -0.18, "ci_high": -0.02}, "gap_fraction": 0.1 / 0.9}
    return {"branch": "elixr", "train_images": 64, "test_images": 40, "classes": ["Effusion", "Nodule/Mass"],
            "classifier": "cnn", "conditions": "variations of the training images: ...",
            "synthetic_set": {"sampler": "dpm++", "steps": 10, "guidance_scale": 1.0},
            "arms": {"real": {"train_images": 64, **real},
                     "synthetic": {"train_images": 64, **synthetic, "vs_real": difference,
                                   "seeds": {"macro_auroc": [0.8, 0.78, 0.83], "count": 3, "mean": 0.803, "sd": 0.025,
                                             "min": 0.78, "max": 0.83}}}}


def test_the_elixr_column_is_labelled_by_what_embed_elixr_read_not_by_the_param(tmp_path):
    """A stand-in snapshot named by elixr.path was once reported as real ELIXR."""
    (tmp_path / "embed_elixr.json").write_text(json.dumps({"source": "elixr_standin"}))
    inputs = ReportInputs(*(tmp_path / name for name in ("evaluate", "evaluator.json", "sample", "live", "utility",
                                                   "reader_study.json", "embed_elixr.json")))
    params = params_with({"branches": ["elixr"], "elixr": {"path": "external/nih-cxr14-elixr"}})
    summary = compare(params, inputs, tmp_path / "summary.json", tmp_path / "report.md")
    assert summary["elixr"]["condition_source"] == "elixr_standin"
    assert "| metric | elixr (stand-in) |" in (tmp_path / "report.md").read_text()

"""compare reads what dvc.yaml passes it, nothing at a fixed path: summary and report come from those files."""

from __future__ import annotations

import json

from cxr_diffusion.config import params_with
from cxr_diffusion.evaluation.report import ReportInputs, compare


def write(path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_compare_reads_the_inputs_it_is_given_and_links_figures_beside_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing under the working directory: a fixed path would find nothing
    inputs = ReportInputs(tmp_path / "in/evaluate", tmp_path / "in/evaluator.json", tmp_path / "in/sample",
                          tmp_path / "in/live")
    write(inputs.evaluations / "elixr.json", {"closeness": {"domain_fd": 12.5, "domain_fd_95ci": [10.0, 15.0]}})
    write(inputs.evaluator, {"test_macro_auroc": 0.875})
    write(inputs.sampling / "elixr.json", {"images_per_second": 4.5})
    write(inputs.training / "elixr" / "metrics.json", {"val": {"loss": 0.25, "conditioning_gap": 0.01},
                                                      "final": {"steps": 40}})
    report = tmp_path / "out/reports/report.md"
    (report.parent / "samples" / "elixr").mkdir(parents=True)
    (report.parent / "samples" / "elixr" / "original_vs_generated_6.png").write_bytes(b"")

    summary = compare(params_with({"branches": ["elixr"]}), inputs, tmp_path / "out/summary.json", report)

    assert summary["elixr"]["domain_fd"] == 12.5 and summary["elixr"]["domain_fd_ci_high"] == 15.0
    assert summary["elixr"]["val_loss"] == 0.25 and summary["elixr"]["train_steps"] == 40
    assert summary["elixr"]["sampling_img_per_s"] == 4.5
    assert json.loads((tmp_path / "out/summary.json").read_text()) == summary
    text = report.read_text()
    assert "test macro AUROC 0.875" in text and "12.50 [10.00, 15.00]" in text
    assert "(samples/elixr/original_vs_generated_6.png)" in text and "one_row_per_finding" not in text

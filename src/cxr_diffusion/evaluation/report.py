"""Stage `compare`: one table of branches x metrics, the figures, and the settings that produced them."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cxr_diffusion.config import Params
from cxr_diffusion.evaluation.training_curves import draw_training_curves, save_figure
from cxr_diffusion.evaluation.metric_ranges import (
    EVALUATE, EVALUATOR, READER_STUDY, SAMPLING, TRAINING, UTILITY, out_of_range,
)
from cxr_diffusion.evaluation.report_numbers import number, signed_with_interval, with_interval, without_negative_zero
from cxr_diffusion.io import atomic_path, read_json, write_json
from cxr_diffusion.reader_study.labels import REAL
from cxr_diffusion.reader_study.report import report_lines
from cxr_diffusion.errors import UserError
from cxr_diffusion.safe_text import markdown_text, visible_text
from cxr_diffusion.sampling.settings import PARAM_OF_SETTING, changed_setting
from cxr_diffusion.utility.subgroup_report import subgroup_lines, subgroup_summary


@dataclass(frozen=True)
class ReportInputs:
    """What compare reads, as dvc.yaml passes it: each earlier stage's metrics."""

    evaluations: Path  # metrics/evaluate: <branch>.json per evaluate stage
    evaluator: Path    # metrics/evaluator.json
    sampling: Path     # metrics/sample: <branch>.json per sample stage
    training: Path     # dvclive: <branch>/metrics.json per train stage
    utility: Path      # metrics/utility: <branch>.json per utility stage
    reader_study: Path  # metrics/reader_study.json of the score_reader_study stage
    elixr_embedding: Path | None = None  # metrics/embed_elixr.json: its "source" says real ELIXR or a stand-in


TRAINING_CURVES = "training_curves.png"  # written next to the report
_RERUN = "rerun the stage that writes it (`dvc repro`)"


class MetricsFileError(UserError, ValueError):
    """A metrics file lacks a key or holds a wrong type: hand-edited, or damaged on a DVC remote."""


@contextmanager
def _reading(*paths: Path):
    """Turn a missing key or a wrong type in what ``paths`` hold into one line naming them (a bug in this module
    would read the same way, with the error's own words kept in the line)."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as error:
        where = " or ".join(str(path) for path in paths)
        raise MetricsFileError(f"{where}: not the metrics its stage writes ({type(error).__name__}: "
                               f"{visible_text(error, 120)}); rerun that stage (`dvc repro -f <stage>`)") from None


def _read_branch(path: Path, branch: str, ranges: list | None = None) -> dict:
    """A branch's metrics file; one that says it is another branch's (its ``branch`` key) is refused."""
    metrics = _read(path, ranges=ranges)
    if isinstance(metrics, dict) and "branch" in metrics and metrics["branch"] != branch:
        raise MetricsFileError(f"{path}: the metrics of branch {visible_text(repr(metrics['branch']), 60)}, not "
                               f"{branch}'s; {_RERUN}")
    return metrics


def _check_sampled_as_the_params_say(path: Path, sampling: dict, params: Params) -> None:
    """The report's header names the sampler of params.sample: a sample metrics file that records another
    (samples made before the params changed) would put its numbers under settings they were not made with."""
    changed = changed_setting(sampling, params, keys=[key for key in PARAM_OF_SETTING if key in sampling])
    if changed is not None:
        raise MetricsFileError(f"{path}: {changed.describe()}; {_RERUN}")


def _read(path: Path, checked: tuple[str, ...] = ("",), ranges: list | None = None) -> dict:
    """A metrics file ({} before its stage ran), refused when a number at one of the ``checked`` keys (dotted;
    "": the whole file) is NaN or Infinity. JSON parsers read those, but no stage writes them (``write_json``
    refuses them), so the summary could not hold them and the report would show "nan": one line naming the
    file and the key instead, before either output is touched."""
    if not path.exists() and not path.is_symlink():
        return {}
    if not path.is_file():  # a folder, FIFO or dangling link is not "not run yet"
        raise MetricsFileError(f"{path}: not a regular file (a folder, FIFO or dangling link); {_RERUN}")
    metrics = read_json(path, _RERUN)
    for key in checked:
        _refuse_non_finite(path, _at(metrics, key), key)
    problem = out_of_range(metrics, ranges) if ranges else None
    if problem:  # no stage writes it: reported, it would read as a result
        raise MetricsFileError(f"{path}: {problem}; {_RERUN}")
    return metrics


def _at(metrics: dict, key: str) -> object:
    """The value at a dotted ``key`` ("" is ``metrics`` itself); None where the path does not exist."""
    value: object = metrics
    for name in filter(None, key.split(".")):
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _refuse_non_finite(path: Path, value: object, key: str) -> None:
    """A ``MetricsFileError`` naming ``path`` and the first NaN or Infinity in ``value`` (walked without recursion:
    a metrics file may nest as deep as JSON allows)."""
    pending = [(key, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            written = "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
            raise MetricsFileError(f"{path}: {visible_text(where, 120)} is {written}, not a "
                                   f"number; {_RERUN}")
        if isinstance(item, dict):
            pending += [(f"{where}.{name}" if where else str(name), child) for name, child in reversed(item.items())]
        elif isinstance(item, list):
            pending += [(f"{where}[{index}]", child) for index, child in reversed(list(enumerate(item)))]


def read_evaluations(branches: list[str], folder: Path) -> dict[str, dict]:
    """Each branch's evaluate-stage metrics from ``folder`` ({} for a branch not evaluated yet)."""
    return {branch: _read_branch(folder / f"{branch}.json", branch, EVALUATE) for branch in branches}


def _arm_order(arm: str) -> tuple[int, int]:
    """real, synthetic, real_plus_synthetic, synthetic_then_real, then synthetic_x<k> by k (JSON files hold
    them sorted by name)."""
    fixed = {"real": 0, "synthetic": 1, "real_plus_synthetic": 2, "synthetic_then_real": 3}
    if arm in fixed:
        return fixed[arm], 0
    scale = arm.removeprefix("synthetic_x")
    return 4, int(scale) if scale.isascii() and scale.isdigit() else 0  # '²' is a digit to isdigit


def utility_summary(utility: dict) -> dict:
    """A branch's utility arms as the summary keeps them: AUROC with its interval, per class and macro, and
    each arm's paired difference to the real-only arm (macro) with Packhaeuser's gap."""
    arms = {}
    for arm in sorted(utility.get("arms", {}), key=_arm_order):
        result = utility["arms"][arm]
        macro = result["macro"]
        entry = {"train_images": result["train_images"], "macro_auroc": macro["auroc"],
                 "macro_ci_low": macro["ci_low"], "macro_ci_high": macro["ci_high"],
                 "per_class": {name: dict(value) for name, value in result["per_class"].items()}}
        if "seeds" in result:
            entry.update({"seeds": result["seeds"]["count"], "seed_mean": result["seeds"]["mean"],
                          "seed_sd": result["seeds"]["sd"], "seed_min": result["seeds"]["min"],
                          "seed_max": result["seeds"]["max"]})
        if "subgroups" in result:
            entry["subgroups"] = subgroup_summary(result["subgroups"])
        if "vs_real" in result:
            difference = result["vs_real"]
            entry.update({"vs_real": difference["macro"]["difference"], "vs_real_ci_low": difference["macro"]["ci_low"],
                          "vs_real_ci_high": difference["macro"]["ci_high"], "gap_fraction": difference["gap_fraction"],
                          "per_class_vs_real": {name: dict(value) for name, value in difference["per_class"].items()}})
        arms[arm] = entry
    return arms


def summarize(params: Params, evaluations: dict[str, dict], inputs: ReportInputs) -> dict:
    """Every branch's metrics, flattened to the numbers `dvc metrics diff` compares."""
    summary = {}
    readers = _read(inputs.reader_study, ranges=READER_STUDY)
    elixr_source = _read(inputs.elixr_embedding).get("source") if inputs.elixr_embedding is not None else None
    for branch in params.branches:
        with _reading(inputs.evaluations / f"{branch}.json", inputs.training / branch / "metrics.json",
                      inputs.sampling / f"{branch}.json", inputs.utility / f"{branch}.json", inputs.reader_study):
            summary[branch] = _branch_summary(params, branch, evaluations[branch], inputs, readers, elixr_source)
    return summary


def _branch_summary(params: Params, branch: str, evaluation: dict, inputs: ReportInputs, readers: dict,
                    elixr_source: str | None) -> dict:
    """One branch's row of the summary."""
    # DVCLive logs training as it goes (a skipped step's loss may be NaN): only the numbers used here are checked.
    training = _read(inputs.training / branch / "metrics.json", checked=("val.loss", "val.conditioning_gap",
                                                                        "final.steps"), ranges=TRAINING)
    sampling = _read_branch(inputs.sampling / f"{branch}.json", branch, SAMPLING)
    _check_sampled_as_the_params_say(inputs.sampling / f"{branch}.json", sampling, params)
    closeness, faith = evaluation.get("closeness", {}), evaluation.get("faithfulness", {})
    return {
        # From what embed_elixr read (a stand-in snapshot says so in its files), not from which param named it.
        "condition_source": (elixr_source or ("elixr_standin" if params.elixr.path is None else branch))
        if branch == "elixr" else branch,
        "domain_fd": closeness.get("domain_fd"),
        "domain_fd_ci_low": (closeness.get("domain_fd_95ci") or [None, None])[0],
        "domain_fd_ci_high": (closeness.get("domain_fd_95ci") or [None, None])[1],
        "domain_fd_ratio_to_floor": closeness.get("domain_fd_ratio_to_floor"),
        "untrained_fd_matched": closeness.get("untrained_fd_matched"),
        "trained_fd_same_size": closeness.get("trained_fd_same_size"),
        "kid": closeness.get("kid"),
        "inception_fid": closeness.get("inception_fid"),
        "reference_compatible_fid": closeness.get("reference_compatible_fid"),
        **{f"raddino_{key}": evaluation.get("raddino", {}).get(key)
           for key in ("fd", "kid", "precision", "recall", "density", "coverage")},
        "xrv_fd": evaluation.get("xrv_densenet", {}).get("fd"),
        "xrv_fd_ratio_to_floor": evaluation.get("xrv_densenet", {}).get("fd_ratio_to_floor"),
        "xrv_macro_auroc_vs_requested": evaluation.get("xrv_densenet", {}).get("macro_auroc_vs_requested_labels"),
        # Only the four PRDC numbers: a key of this section cannot stand in for another metric of the summary.
        **{key: evaluation.get("prdc", {}).get(key) for key in ("precision", "recall", "density", "coverage")},
        "macro_auroc_vs_requested": faith.get("macro_auroc_vs_requested_labels"),
        "label_exact_match": (faith.get("label_agreement") or {}).get("exact_match"),
        "feature_cosine_to_reference": faith.get("feature_cosine_to_reference"),
        "ms_ssim_generated": evaluation.get("diversity", {}).get("ms_ssim_same_labels_generated"),
        "ms_ssim_real": evaluation.get("diversity", {}).get("ms_ssim_same_labels_real"),
        "memorized_fraction_pixels": evaluation.get("memorization", {}).get("pixels", {}).get("fraction_at_or_below_threshold"),
        "memorized_fraction_features": evaluation.get("memorization", {}).get("features", {}).get("fraction_at_or_below_threshold"),
        "val_loss": (training.get("val") or {}).get("loss"),
        "conditioning_gap": (training.get("val") or {}).get("conditioning_gap"),
        "train_steps": (training.get("final") or {}).get("steps"),
        "sampling_img_per_s": sampling.get("images_per_second"),
        "utility": utility_summary(_read_branch(inputs.utility / f"{branch}.json", branch, UTILITY)),
        "reader_study": reader_study_summary(readers, branch),
    }


def reader_study_summary(metrics: dict, branch: str) -> dict | None:
    """The readers' pooled verdict on one branch's images (None before any responses)."""
    pooled = metrics.get("pooled")
    if not pooled or branch not in pooled["called_real"]:
        return None
    called, realism = pooled["called_real"][branch], pooled["realism"][branch]
    return {"readers": metrics["readers"], "answers": called["n"], "called_real": called["fraction"],
            "realism": realism["mean"], "realism_of_real": pooled["realism"].get(REAL, {}).get("mean"),
            "study_accuracy": pooled["call"]["accuracy"]}


def _pretrained_notes(evaluations: dict[str, dict]) -> list[str]:
    """Why a pretrained-network metric is missing, or the settings it was computed with (one line each)."""
    notes = []
    for name, label in (("inception_fid", "Standard FID"), ("reference_compatible_fid", "Reference-compatible FID")):
        details = [e.get("closeness", {}).get(f"{name}_details") for e in evaluations.values()]
        first = next((d for d in details if d), None)
        if first is None:
            continue
        if "reason" in first:
            notes.append(f"- {label}: not computed: {markdown_text(first['reason'], 400)}")
        else:
            notes.append(f"- {label}: {markdown_text(first['features'])}; real = {markdown_text(first['real'])} "
                         f"(n = {number(first['n_real'])}), generated n = {number(first['n_generated'])}; "
                         f"{markdown_text(first['resolution'])}; weights sha256 {markdown_text(first['weights_sha256'], 12)}")
    raddino = next((e["raddino"]["details"] for e in evaluations.values()
                    if isinstance(e.get("raddino"), dict) and isinstance(e["raddino"].get("details"), dict)), None)
    if raddino is not None and "reason" in raddino:
        notes.append(f"- RadDINO: not computed: {markdown_text(str(raddino['reason']), 400)}")
    elif raddino is not None:
        text = lambda key: markdown_text(str(raddino.get(key)), 120)  # noqa: E731
        notes.append(f"- RadDINO: {text('features')}; {text('preprocessing')}; real = {text('real')} (n = "
                     f"{number(raddino.get('n_real'))}), generated n = {number(raddino.get('n_generated'))}; KID over "
                     f"{number(raddino.get('kid_subsets'))} subsets of {number(raddino.get('kid_subset'))}; PRDC k = "
                     f"{number(raddino.get('prdc_k'))}; model {text('model')}. CheXGenBench's leaderboard (MIMIC-CXR, "
                     "other data): RadDINO FID 54.2 (Sana), 69.7 (RadEdit), 118.9 (SD-1.5 fine-tuned)")
    judges = [e.get("xrv_densenet") for e in evaluations.values()]
    judge = next((j for j in judges if j), None)
    if judge and judge.get("fd") is None:
        notes.append(f"- DenseNet (torchxrayvision): not computed: {markdown_text(judge['reason'], 400)}")
    elif judge:
        notes.append(f"- DenseNet (torchxrayvision): 1024-d features, 224x224 inputs; classes it does not cover: "
                     f"{', '.join(map(markdown_text, judge['classes_not_covered'])) or 'none'}; weights sha256 {markdown_text(judge['weights_sha256'], 12)}")
    return notes + ([""] if notes else [])


def _seed_count(utilities: dict[str, dict]) -> object:
    """How many seeds the utility stages trained each arm with, from their metrics (the params may have moved on)."""
    counts = {arm.get("seeds", {}).get("count", 1) for u in utilities.values() for arm in u["arms"].values()}
    return counts.pop() if len(counts) == 1 else "several"


def _seed_cell(entry: dict) -> str:
    if entry.get("seed_sd") is None:
        return "n/a (1 seed)" if entry.get("seeds", 1) == 1 else "n/a"
    return f"{number(entry['seed_sd'])} ({number(entry['seed_min'])}-{number(entry['seed_max'])})"


def utility_section(params: Params, summary: dict, utilities: dict[str, dict]) -> list[str]:
    """The train-on-synthetic, test-on-real tables: macro per branch and arm, then per class per branch."""
    done = {branch: u for branch, u in utilities.items() if u.get("arms")}
    if not done:
        return ["## Downstream utility (train on synthetic, test on real)", "",
                "Not computed yet: run `dvc repro` (stages utility_real and utility@<branch>).", ""]
    first = next(iter(done.values()))
    synthetic = first["synthetic_set"]
    patients = f" of {number(first['test_patients'])} patients" if "test_patients" in first else ""
    lines = [
        "## Downstream utility (train on synthetic, test on real)", "",
        f"One classifier per arm ({markdown_text(first['classifier'], 40)}, {params.utility.classifier.epochs} epochs, "
        f"the same augmentation and seed for every arm), each scored on the same {number(first['test_images'])} real "
        "test images"
        f"{patients}. "
        f"N = {number(first['train_images'])} real train images (a seeded subset); synthetic sets: "
        f"{markdown_text(synthetic['sampler'], 40)}, {number(synthetic['steps'])} steps, guidance "
        f"{number(synthetic['guidance_scale'], 1)}, the labels each image was generated for. "
        "Intervals: 95% bootstrap over test patients (all films of each drawn patient); differences to the real-only "
        "arm are paired (same resamples); gap = (real - arm) / real, as Packhaeuser et al. report it. Read the "
        "differences with two caveats: each branch's diffusion model was trained on the whole train split, so a "
        "synthetic arm can carry information from more than its N real images; and an arm of 2N images takes twice "
        "the optimizer steps (the same epochs). The intervals resample test patients; the seed column is the "
        f"spread of training itself: the sd of the macro AUROC over {number(_seed_count(done))} training seed(s) "
        "(utility.seeds; the table's values are the first seed's).", "",
        "| branch | arm | train images | macro AUROC [95% CI] | seed sd (min-max) | vs real-only [95% CI] | gap |",
        "|---|---|---:|---|---|---|---:|",
    ]
    for branch, utility in done.items():
        for arm, entry in summary[branch]["utility"].items():
            lines.append(f"| {branch} | {markdown_text(arm, 40)} | {number(entry['train_images'])} | "
                         f"{with_interval(entry['macro_auroc'], entry['macro_ci_low'], entry['macro_ci_high'])} | "
                         f"{_seed_cell(entry)} | "
                         + (f"{signed_with_interval(entry['vs_real'], entry['vs_real_ci_low'], entry['vs_real_ci_high'])} | "
                            f"{number(without_negative_zero(entry['gap_fraction']))} |" if "vs_real" in entry else "(baseline) | |"))
    lines.append("")
    for branch, utility in done.items():
        classes = utility["classes"]
        lines += [f"### Utility per class: {branch}", "", f"Synthetic set: {markdown_text(utility['conditions'], 400)}.", "",
                  "| arm | " + " | ".join(map(markdown_text, classes)) + " |", "|---|" + "---|" * len(classes)]
        for arm, entry in summary[branch]["utility"].items():
            cells = [with_interval(entry["per_class"][c]["auroc"], entry["per_class"][c]["ci_low"],
                               entry["per_class"][c]["ci_high"], 2) for c in classes]
            lines.append(f"| {markdown_text(arm, 40)} | " + " | ".join(cells) + " |")
        lines += ["", f"![{branch} utility](utility/{branch}/auroc.png)", ""]
    lines += subgroup_lines(done, _arm_order, params.utility.age_bands)
    if params.dataset.source == "phantom":
        lines += ["On the phantom these numbers test the method, not the models' clinical value: findings are drawn "
                  f"shapes at {params.image_size}x{params.image_size} that a small CNN learns from a few hundred real "
                  "images, so a gap measures how faithfully a branch renders those shapes for the labels asked. They "
                  "support comparing branches and settings on this pipeline; they say nothing about real chest X-rays.",
                  ""]
    return lines


def write_report(params: Params, summary: dict, evaluations: dict[str, dict], evaluator: dict, out: Path,
                 utilities: dict[str, dict] | None = None, readers: dict | None = None) -> Path:
    """The markdown report (``report_text``), written atomically to ``out``."""
    return _write_text(out, report_text(params, summary, evaluations, evaluator, out, utilities, readers))


def _write_text(out: Path, text: str) -> Path:
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out


def report_text(params: Params, summary: dict, evaluations: dict[str, dict], evaluator: dict, out: Path,
                utilities: dict[str, dict] | None = None, readers: dict | None = None,
                curves_link: str | None = None) -> str:
    """The markdown report to be written at ``out``; its figures are linked relative to it (reports/samples,
    reports/evaluate, the training curves at ``curves_link`` when drawn), a sample figure only when it is
    already there."""
    rows = [
        ("Domain FD (evaluator features) [95% CI]", lambda s: f"{number(s['domain_fd'], 2)} [{number(s['domain_fd_ci_low'], 2)}, {number(s['domain_fd_ci_high'], 2)}]"),
        ("FD / real-vs-real floor (same n)", lambda s: number(s["domain_fd_ratio_to_floor"], 2)),
        ("FD trained vs untrained (same n)", lambda s: f"{number(s['trained_fd_same_size'], 2)} vs {number(s['untrained_fd_matched'], 2)}"),
        ("KID", lambda s: number(s["kid"], 4)),
        ("Inception FID (standard: pool3 vs real test)", lambda s: number(s["inception_fid"], 2)),
        ("Reference-compatible FID (logits vs train)", lambda s: number(s["reference_compatible_fid"], 2)),
        ("RadDINO FD / KID (CheXGenBench's distance)", lambda s: f"{number(s['raddino_fd'], 2)} / {number(s['raddino_kid'], 4)}"),
        ("RadDINO precision / recall / density / coverage", lambda s: " / ".join(
            number(s[f"raddino_{key}"], 2) for key in ("precision", "recall", "density", "coverage"))),
        ("DenseNet (torchxrayvision) FD / floor ratio", lambda s: f"{number(s['xrv_fd'], 2)} / {number(s['xrv_fd_ratio_to_floor'], 2)}"),
        ("DenseNet (torchxrayvision) macro AUROC vs requested", lambda s: number(s["xrv_macro_auroc_vs_requested"])),
        ("Precision / recall", lambda s: f"{number(s.get('precision'), 2)} / {number(s.get('recall'), 2)}"),
        ("Density / coverage", lambda s: f"{number(s.get('density'), 2)} / {number(s.get('coverage'), 2)}"),
        ("Macro AUROC vs requested labels", lambda s: number(s["macro_auroc_vs_requested"])),
        ("Label exact match", lambda s: number(s["label_exact_match"])),
        ("Feature cosine to reference", lambda s: number(s["feature_cosine_to_reference"])),
        ("MS-SSIM same labels, generated (real)", lambda s: f"{number(s['ms_ssim_generated'])} ({number(s['ms_ssim_real'])})"),
        ("Memorized fraction, pixels / features", lambda s: f"{number(s['memorized_fraction_pixels'])} / {number(s['memorized_fraction_features'])}"),
        ("Val loss / conditioning gap", lambda s: f"{number(s['val_loss'], 4)} / {number(s['conditioning_gap'], 4)}"),
    ]
    branches = list(summary)
    names = [f"{b} (stand-in)" if summary[b]["condition_source"] == "elixr_standin" else b for b in branches]
    lines = [
        "# cxr-diffusion comparison report", "",
        f"Dataset: {params.dataset.source}{' (phantom, not patient data)' if params.dataset.source == 'phantom' else ''}; "
        f"image size {params.image_size}; classes {', '.join(map(markdown_text, params.filter.classes))}.",
        f"Sampler: {params.sample.sampler}, {params.sample.steps} steps, guidance {params.sample.guidance_scale}, "
        f"{params.sample.count} test conditions per branch, seed {params.seed}.",
        f"Evaluator (CXR classifier trained on the real train split): test macro AUROC "
        f"{number(evaluator.get('test_macro_auroc'))}. All distances are in its feature space.", "",
        "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(branches),
    ]
    lines += ["| " + label + " | " + " | ".join(render(summary[b]) for b in branches) + " |" for label, render in rows]
    lines += ["", "The reference work reports FID 26.183 (text), 21.831 (vision), 24.070 (ELIXR) on 1000-class "
              "Inception logits against its own training images: compare those with the reference-compatible FID "
              "row only; they are not comparable to the standard FID or the domain FD (different features, "
              "different reference set).", ""]
    if curves_link is not None:
        lines += [f"![training loss, validation loss and conditioning gap per branch](<{curves_link}>)", ""]
    lines += _pretrained_notes(evaluations)
    lines += utility_section(params, summary, utilities or {})
    lines += report_lines(readers) if readers else \
        ["## Expert reader study", "", "Not built yet: run `dvc repro` (stages reader_study, score_reader_study).", ""]
    for branch in branches:
        lines += [f"## {branch}", ""]
        for figure in ("original_vs_generated_6.png", "one_row_per_finding.png"):
            if (out.parent / "samples" / branch / figure).is_file():
                lines.append(f"![{branch} {figure}](samples/{branch}/{figure})")
        lines += [f"![{branch} PCA](evaluate/{branch}/pca.png)",
                  f"![{branch} closest to train](evaluate/{branch}/closest_to_train.png)", ""]
    return "\n".join(lines) + "\n"


def _relative_link(target: Path, start: Path) -> str:
    """``target`` as a Markdown link from the folder ``start`` (forward slashes, angle brackets escaped)."""
    link = Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()
    return link.replace("<", "%3C").replace(">", "%3E")


def compare(params: Params, inputs: ReportInputs, summary_path: Path, report_path: Path,
            curves_path: Path | None = None) -> dict:
    """The summary, the report and the training-curves figure (``curves_path``, by default beside the report,
    which links it by its path from there), each written only when all could be built (one line naming the
    metrics files when one of them is not what its stage writes)."""
    curves_path = report_path.parent / TRAINING_CURVES if curves_path is None else Path(curves_path)
    evaluations = read_evaluations(params.branches, inputs.evaluations)
    summary = summarize(params, evaluations, inputs)
    utilities = {branch: _read_branch(inputs.utility / f"{branch}.json", branch, UTILITY) for branch in params.branches}
    # Built in memory first: a damaged DVCLive series or metrics file stops the stage before any of the
    # three is replaced.
    curves = draw_training_curves(inputs.training, list(params.branches))
    with _reading(inputs.evaluations, inputs.evaluator, inputs.utility, inputs.reader_study):
        report = report_text(params, summary, evaluations, _read(inputs.evaluator, ranges=EVALUATOR), report_path, utilities,
                             _read(inputs.reader_study, ranges=READER_STUDY), _relative_link(curves_path, report_path.parent))
    write_json(summary_path, summary)  # refuses a value JSON cannot hold before the others are replaced
    save_figure(curves, curves_path)
    _write_text(report_path, report)
    return summary

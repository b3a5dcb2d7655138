"""The reader study's section of the report, as markdown lines, from ``scoring.score_responses``' metrics."""

from __future__ import annotations

from pathlib import Path

from cxr_diffusion.evaluation.report_numbers import as_float, fixed, is_number, number
from cxr_diffusion.reader_study.labels import REAL
from cxr_diffusion.safe_text import markdown_text, visible_text

POOLED_ROW = "**All readers, pooled**"  # bold: no reader id can look like it (their text is escaped)


def _how_to(metrics: dict) -> str:
    """What to do when no reader has answered yet, with the kit, the file names and the folder as code spans."""
    kit = metrics.get("kit")
    given = (f"the kit's zip, {_code(kit + '.zip')} (never a zip of your own: compressed sizes tell images apart); "
             f"they unzip it and open {_code(Path(kit).name + '/index.html')}") if kit else \
        "the reader-study kit's zip; they unzip it and open `index.html`"
    responses = _code(metrics["responses"]) if metrics.get("responses") else "the responses folder"
    return (f"No reader responses yet. Give each reader {given} in Chromium or Firefox (no server needed), answer "
            f"the {number(metrics['items'])} items and press Export answers. Put the downloaded "
            f"{_code(metrics['study_id'] + '__<reader>.json')} files into {responses}, then run `dvc repro`: only "
            f"this stage and compare rerun.")


def _code(value: str) -> str:
    """``value`` as an inline code span (inert in Markdown: no tag, link or emphasis), or escaped text when it
    holds what a code span cannot (a backtick, a line break, a hidden character)."""
    if visible_text(value, 400) == value and "`" not in value:
        return f"`{value}`"
    return markdown_text(value, 400)


def report_lines(metrics: dict, level: int = 2) -> list[str]:
    """Markdown lines: headline accuracy, a table per reader, per source, per finding; agreement; rejects."""
    lines = [f"{'#' * level} Expert reader study", ""]
    if metrics["readers"] == 0:
        lines += [_how_to(metrics), ""]
        return lines + _rejects(metrics["rejects"])
    pooled = metrics["pooled"]
    call = pooled["call"]
    lines += [
        f"{number(metrics['readers'])} reader(s), {number(metrics['items'])} blinded items, {number(pooled['answered'])} answers. "
        f"Real-vs-synthetic accuracy, pooled: **{_interval(call['accuracy'], call['ci95'])}** (exact "
        f"Clopper-Pearson 95% interval; two-sided binomial test against 50%: p = {_p(call['p_value'])}); "
        f"balanced accuracy {_number(pooled['balanced_accuracy'])}. Chance (50%) means readers cannot tell the "
        f"generated images from real ones. Pooled figures count every answer as independent.",
        "",
    ]
    if is_number(pooled["real_share"]) and abs(pooled["real_share"] - 0.5) > 0.05:
        lines += [f"**{pooled['real_share']:.0%} of the answered items are real, not half**: a reader who cannot tell "
                  f"them apart scores that share (or its complement) by always giving the commoner answer, so the "
                  f"test against 50% does not measure realism here. Read the balanced accuracy and the AUC (0.5 "
                  f"at chance for any mix), or build the kit with `reader_study.real_fraction: 0.5`.", ""]
    lines += ["| Reader | Answered | Accuracy [95% CI] | p (vs 50%) | Balanced accuracy | AUC (confidence-weighted) |",
              "|---|---:|---|---:|---:|---:|"]
    for reader, summary in [*((_cell(reader), summary) for reader, summary in metrics["per_reader"].items()),
                            (POOLED_ROW, pooled)]:
        result = summary["call"]
        lines.append(f"| {reader} | {number(summary['answered'])} | {_interval(result['accuracy'], result['ci95'])} "
                     f"| {_p(result['p_value'])} | {_number(summary['balanced_accuracy'])} | {_number(summary['auc'])} |")
    lines += ["", "| Source | Answers | Called real | Realism 1-5, mean [95% t-interval] |", "|---|---:|---:|---|"]
    sources = sorted(pooled["called_real"], key=lambda source: (source != REAL, source))  # JSON keeps them sorted
    for source in sources:
        called, realism = pooled["called_real"][source], pooled["realism"][source]
        name = "real images" if source == REAL else _cell(source)
        lines.append(f"| {name} | {number(called['n'])} | {_number(called['fraction'])} | "
                     f"{_interval(realism['mean'], realism['ci95'])} |")
    lines += ["", "Findings the readers ticked, F1 against the true labels (real images) or the requested ones "
              "(generated), pooled:", "",
              "| Finding | " + " | ".join("real" if source == REAL else _cell(source) for source in sources) + " |",
              "|---|" + "---:|" * len(sources)]
    for finding, per_source in pooled["findings"].items():
        lines.append(f"| {_cell(finding)} | " + " | ".join(_number(per_source[source]["f1"]) for source in sources)
                     + " |")
    agreement = metrics["agreement"]
    if agreement["method"] is not None:
        method = "Cohen's" if agreement["method"] == "cohen" else "Fleiss'"
        left_out = agreement.get("left_out") or []
        lines += ["", f"Inter-reader agreement on the call: {method} kappa = {_number(agreement['kappa'])} over the "
                      f"{number(agreement['items'])} items all {number(agreement['readers'])} readers answered"
                      + (f" (left out, not having answered every item: {', '.join(map(_cell, left_out))})."
                         if left_out else ".")]
    return lines + [""] + _rejects(metrics["rejects"])


def _rejects(rejects: list[dict]) -> list[str]:
    if not rejects:
        return []
    return [f"Rejected response files ({len(rejects)}):", ""] + \
        [_reject_line(reject["file"], reject["reason"]) for reject in rejects] + [""]


def _reject_line(file: str, reason: str) -> str:
    """``- <file>: `<code>`: <detail>``; the code is one of ours (a word), the file and detail are escaped."""
    code, _, detail = str(reason).partition(": ")
    code = f"`{code}`" if code.replace("_", "").isalpha() and code.isascii() else _cell(code)
    return f"- {_cell(file)}: {code}: {_cell(detail, 300)}"


def _interval(value, interval) -> str:
    if value is None:
        return "n/a"
    if interval is None:
        return _number(value)
    if isinstance(interval, list) and len(interval) == 2:
        return f"{_number(value)} [{_number(interval[0])}, {_number(interval[1])}]"
    return f"{_number(value)} [{markdown_text(interval, 60)}]"


def _p(value) -> str:
    shown = as_float(value)
    return f"{shown:.3g}" if shown is not None else number(value)


def _number(value) -> str:
    """Two decimals for a number; JSON's true is not 1.00 (``report_numbers.number`` writes it as text)."""
    return fixed(value, 2)


def _cell(text: object, limit: int = 120) -> str:
    """Text from a reader's file (or its name): inert Markdown, safe in a table cell."""
    return markdown_text(text, limit)

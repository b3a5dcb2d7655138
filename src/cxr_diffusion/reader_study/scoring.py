"""Reader-study metrics: can experts tell the generated images from real ones, and do they see the findings?

Per reader and pooled over readers (every answer counted once, readers not modelled: the pooled interval
and test treat answers as independent, so they are narrower than a reader-clustered analysis):

- ``call``: accuracy of the real/synthetic call with an exact (Clopper-Pearson) 95% interval and the
  two-sided exact binomial test against 50%. 50% is chance only when half the items are real
  (``reader_study.real_fraction: 0.5``, the default): with fewer real items a reader who always answers
  "synthetic" scores their share. ``real_share`` says what the study held;
- ``balanced_accuracy``: the mean of the recall on real and on generated items, 0.5 for any reader who
  cannot tell them apart whatever the mix (None without both kinds among the answers);
- ``auc``: ROC AUC of the confidence-weighted call (+confidence when called synthetic, -confidence when
  called real) against the truth (synthetic = positive); None without both kinds among the answers;
- ``called_real``: per source ("real" and each branch) the fraction of its images called real;
- ``realism``: per source the Likert mean with a Student t 95% interval (None under two answers);
- ``findings``: per finding (and "none", which "No Finding" and no label at all map to) and per source,
  the F1 of the ticked findings against the true labels (real) or the requested ones (generated); None
  where the finding is neither present nor ticked.

``agreement`` is on the call: Cohen's kappa for two readers, Fleiss' kappa for three or more, None for one;
over every item when at least two readers answered them all (readers who did not are listed as left
out), else over the items every reader answered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from cxr_diffusion.reader_study.labels import NONE, REAL, answer_findings
from cxr_diffusion.reader_study.responses import Answer, ItemTruth, ReaderResponse, load_responses, read_key

Row = tuple[ItemTruth, Answer]


def score_responses(responses_dir: Path, key_path: Path, kit_dir: Path | None = None) -> dict:
    """Metrics of every accepted response file in ``responses_dir`` against the answer key (see module
    docstring); rejected files are listed. With no accepted file: ``readers: 0`` and a ``how_to``."""
    key = read_key(key_path)
    responses, rejects = load_responses(responses_dir, key)
    sources = sorted({truth.source for truth in key.items.values()}, key=lambda source: (source != REAL, source))
    metrics: dict = {"study_id": key.study_id, "items": len(key.items), "readers": len(responses),
                     "files": len(responses) + len(rejects), "rejects": rejects}
    if not responses:
        kit = (f"the kit's zip, {kit_dir}.zip (never a zip of your own: compressed sizes tell images apart); they "
               f"unzip it and open {Path(kit_dir).name}/index.html") if kit_dir is not None else \
            "the reader-study kit's zip; they unzip it and open index.html"
        metrics["how_to"] = (f"No reader responses yet. Give each reader {kit} in "
                             f"Chromium or Firefox (no server needed), answer the {len(key.items)} items and press "
                             f"Export answers. Put the downloaded {key.study_id}__<reader>.json files into "
                             f"{responses_dir}, then run `dvc repro`: only this stage and compare rerun.")
        metrics["kit"] = str(kit_dir) if kit_dir is not None else None
        metrics["responses"] = str(responses_dir)
        return metrics
    per_reader = {}
    for response in sorted(responses, key=lambda response: response.reader_id):
        rows = _rows(response, key.items)
        per_reader[response.reader_id] = {"file": response.file, "unanswered": len(key.items) - len(rows),
                                          **summarise(rows, sources, key.findings)}
    pooled = [row for response in responses for row in _rows(response, key.items)]
    metrics.update(per_reader=per_reader, pooled=summarise(pooled, sources, key.findings),
                   agreement=call_agreement(responses, sorted(key.items)))
    return metrics


def _rows(response: ReaderResponse, truths: dict[str, ItemTruth]) -> list[Row]:
    return [(truths[item_id], answer) for item_id, answer in sorted(response.answers.items())]


def summarise(rows: Sequence[Row], sources: Sequence[str], findings: Sequence[str]) -> dict:
    """The metrics of one set of answers (one reader's, or all readers' pooled)."""
    synthetic = [truth.source != REAL for truth, _ in rows]
    called_synthetic = [answer.call == "synthetic" for _, answer in rows]
    correct = sum(truth == call for truth, call in zip(synthetic, called_synthetic))
    scores = [answer.confidence if answer.call == "synthetic" else -answer.confidence for _, answer in rows]
    by_source = {source: [answer for truth, answer in rows if truth.source == source] for source in sources}
    recalls = [sum(truth == call for truth, call in zip(synthetic, called_synthetic) if truth == kind) /
               synthetic.count(kind) for kind in (False, True) if kind in synthetic]
    return {
        "answered": len(rows),
        "real_share": _rounded(synthetic.count(False) / len(rows)) if rows else None,
        "call": binomial_summary(correct, len(rows)),
        "balanced_accuracy": _rounded(sum(recalls) / 2) if len(recalls) == 2 else None,
        "auc": _rounded(roc_auc_score(synthetic, scores)) if len(set(synthetic)) == 2 else None,
        "called_real": {source: {"n": len(answers), "fraction": _rounded(
            sum(answer.call == "real" for answer in answers) / len(answers)) if answers else None}
            for source, answers in by_source.items()},
        "realism": {source: mean_interval([answer.realism for answer in answers])
                    for source, answers in by_source.items()},
        "findings": findings_f1(rows, sources, findings),
    }


def binomial_summary(correct: int, n: int) -> dict:
    """Accuracy, its exact Clopper-Pearson 95% interval and the two-sided exact test against 0.5."""
    if n == 0:
        return {"correct": 0, "n": 0, "accuracy": None, "ci95": None, "p_value": None}
    test = stats.binomtest(correct, n, 0.5, alternative="two-sided")
    interval = test.proportion_ci(confidence_level=0.95, method="exact")
    return {"correct": correct, "n": n, "accuracy": _rounded(correct / n),
            "ci95": [_rounded(interval.low), _rounded(interval.high)], "p_value": float(f"{test.pvalue:.4g}")}


def mean_interval(values: Sequence[float]) -> dict:
    """Mean and Student t 95% interval (None under two values; zero width when all values agree)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = float(np.mean(values))
    if n < 2:
        return {"n": n, "mean": _rounded(mean), "ci95": None}
    half = stats.t.ppf(0.975, n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return {"n": n, "mean": _rounded(mean), "ci95": [_rounded(mean - half), _rounded(mean + half)]}


def findings_f1(rows: Sequence[Row], sources: Sequence[str], findings: Sequence[str]) -> dict:
    """Per finding (and "none"), per source: F1 of the ticked findings against the labels, and how many
    of the source's answered images carry the finding (``positives``)."""
    table: dict[str, dict] = {}
    for finding in [*findings, NONE]:
        table[finding] = {}
        for source in sources:
            pairs = [(finding in answer_findings(truth.labels, findings), finding in answer.findings)
                     for truth, answer in rows if truth.source == source]
            true_positive = sum(present and ticked for present, ticked in pairs)
            wrong = sum(present != ticked for present, ticked in pairs)  # false positives + false negatives
            f1 = 2 * true_positive / (2 * true_positive + wrong) if true_positive or wrong else None
            table[finding][source] = {"f1": _rounded(f1), "positives": sum(present for present, _ in pairs)}
    return table


def call_agreement(responses: Sequence[ReaderResponse], items: Sequence[str]) -> dict:
    """Agreement of the readers' real/synthetic calls (``items``: the study's scored items): over all of them
    among the readers who answered every one, when there are two or more such readers; else over the items
    every reader answered. A partial reader then never hides the agreement of the others."""
    complete = [response for response in responses if set(items) <= set(response.answers)]
    left_out = [] if len(complete) < 2 else sorted(r.reader_id for r in responses if r not in complete)
    if len(complete) >= 2:
        responses = complete
    shared = sorted(set.intersection(*(set(response.answers) for response in responses))) if responses else []
    result = {"readers": len(responses), "items": len(shared), "method": None, "kappa": None, "left_out": left_out}
    if len(responses) < 2 or not shared:
        return result
    calls = np.array([[response.answers[item].call == "synthetic" for item in shared] for response in responses],
                     dtype=int)
    if len(responses) == 2:
        kappa = cohen_kappa_score(calls[0], calls[1]) if len(np.unique(calls)) > 1 else None
        return {**result, "method": "cohen", "kappa": _rounded(kappa)}
    counts = np.stack([(calls == 0).sum(axis=0), (calls == 1).sum(axis=0)], axis=1)  # items x categories
    return {**result, "method": "fleiss", "kappa": _rounded(fleiss_kappa(counts))}


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of an items x categories table of how many raters put each item in each category
    (every item rated by the same number of raters). None when chance agreement is already perfect."""
    counts = np.asarray(counts, dtype=float)
    raters = counts.sum(axis=1)
    if counts.ndim != 2 or len(counts) == 0 or not np.all(raters == raters[0]) or raters[0] < 2:
        raise ValueError(f"expected items x categories counts with the same number (2 or more) of raters per item, "
                         f"got rows summing to {sorted(set(raters.tolist()))}")
    n = raters[0]
    per_item = ((counts * (counts - 1)).sum(axis=1)) / (n * (n - 1))  # agreement within each item
    shares = counts.sum(axis=0) / counts.sum()  # how often each category is used
    observed, chance = per_item.mean(), float((shares**2).sum())
    if math.isclose(chance, 1.0):
        return None
    return float((observed - chance) / (1 - chance))


def _rounded(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 4)

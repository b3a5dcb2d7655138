"""The subgroup results of the utility arms, as the summary keeps them and as the report shows them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cxr_diffusion.evaluation.report_numbers import number, with_interval
from cxr_diffusion.safe_text import markdown_text
from cxr_diffusion.utility.subgroups import group_order

ATTRIBUTE_TITLES = {"sex": "sex", "age": "age band"}


def subgroup_summary(subgroups: dict) -> dict:
    """Per attribute: each group's macro AUROC and underdiagnosis rate, and both gaps with their intervals:
    numbers only, which `dvc metrics diff` compares (which group fares worst is in metrics/utility)."""
    summary = {}
    for attribute, entry in subgroups.items():
        flat = {}
        for measure in ("auroc_gap", "underdiagnosis_gap"):
            gap = entry[measure]
            flat.update({measure: gap["gap"], f"{measure}_ci_low": gap["ci_low"], f"{measure}_ci_high": gap["ci_high"]})
        flat["groups"] = {group: {"images": values["images"], "macro_auroc": values.get("macro_auroc"),
                                  "underdiagnosis": values.get("underdiagnosis")}
                          for group, values in entry["groups"].items()}
        summary[attribute] = flat
    return summary


def _gap_cell(gap: dict) -> str:
    if gap["gap"] is None:
        return "n/a"
    return f"{with_interval(gap['gap'], gap['ci_low'], gap['ci_high'])} ({markdown_text(gap['worst'], 40)} worst)"


def subgroup_lines(utilities: dict[str, dict], arm_order: Callable[[str], tuple], age_bands: Sequence[int]) -> list[str]:
    """One table per attribute: every branch's arms (sorted by ``arm_order``), each group's macro AUROC, and
    the two gaps. Groups in reading order (``age_bands`` as the utility stage cut them): metrics files hold
    them sorted by name."""
    first = next(iter(utilities.values()))
    real = first["arms"].get("real", {})
    if "subgroups" not in real:
        return []
    lines = ["### Utility by sex and age", "",
             "Each arm's macro AUROC per group (over the classes defined in every group of the attribute), the gap "
             "between its highest and lowest group, and the underdiagnosis gap: the spread, between groups, of the "
             "share of films with a finding that the arm calls No Finding (Seyyed-Kalantari et al.'s measure). Each "
             "arm calls No Finding on as many test films as have it, a threshold fixed per arm (not the paper's "
             "F1-maximising one on validation data), so the intervals leave out its uncertainty, and the rates "
             "follow this split's capped No Finding share: compare them within this report only. Intervals: 95% "
             "bootstrap over test patients, the same draws for every arm; with three age bands the compared pair is "
             "picked after seeing the estimates, so that interval is optimistic. A group under 10 test films (or 10 "
             "films with a finding) has no estimate. Groups from NIH's Patient Gender and Patient Age.", ""]
    order = group_order(age_bands)
    for attribute in sorted(real["subgroups"], key=lambda name: list(order).index(name) if name in order else 99):
        entry = real["subgroups"][attribute]
        known = order.get(attribute, [])
        groups = sorted(entry["groups"], key=lambda g: (known.index(g) if g in known else len(known), g))
        sizes = ", ".join(f"{markdown_text(g, 40)}: {number(entry['groups'][g]['images'])}" for g in groups)
        lines += [f"By {markdown_text(ATTRIBUTE_TITLES.get(attribute, attribute), 40)} (test films: {sizes}; classes: "
                  f"{', '.join(markdown_text(c, 40) for c in entry['classes']) or 'none in every group'}):", "",
                  "| branch | arm | " + " | ".join(markdown_text(g, 40) for g in groups)
                  + " | AUROC gap [95% CI] | underdiagnosis gap [95% CI] |",
                  "|---|---|" + "---:|" * len(groups) + "---|---|"]
        for branch, utility in utilities.items():
            for arm in sorted(utility["arms"], key=arm_order):
                result = utility["arms"][arm]
                if arm == "real" and branch != next(iter(utilities)):
                    continue  # the real arm is the same classifier for every branch
                found = result["subgroups"][attribute]
                cells = [number(found["groups"].get(g, {}).get("macro_auroc")) for g in groups]
                lines.append(f"| {'all' if arm == 'real' else branch} | {markdown_text(arm, 40)} | " + " | ".join(cells)
                             + f" | {_gap_cell(found['auroc_gap'])} | {_gap_cell(found['underdiagnosis_gap'])} |")
        lines.append("")
    return lines

"""The utility study's figure: AUROC per class and macro, one bar per arm, with 95% bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxr_diffusion.io import atomic_path

# One colour per arm: real, four synthetic arms and up to 8 scaled ones (utility.scaling holds at most 8).
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
            "tab:olive", "tab:cyan", "gold", "teal", "lightcoral")  # none black: the error bars are


def _plain(text: str) -> str:
    """Text as matplotlib shows it literally: a $ would start math, and $\\bad$ raises when the figure is saved."""
    return str(text).replace("$", r"\$")


def auroc_bars(arms: dict[str, dict], classes: list[str], title: str, path: Path) -> Path:
    """``arms``: arm name -> ``auroc_with_intervals`` result. Classes whose AUROC is undefined on the test
    split (one label value only) are left empty. Saved as a PNG at ``path``, atomically."""
    groups = [*classes, "macro"]
    figure = Figure(figsize=(max(7.0, 1.3 * len(groups) + 2), 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(arms)
    for i, (arm, result) in enumerate(arms.items()):
        entries = [result["per_class"][c] for c in classes] + [result["macro"]]
        values = np.array([np.nan if e["auroc"] is None else e["auroc"] for e in entries])
        low = np.array([np.nan if e["ci_low"] is None else e["ci_low"] for e in entries])
        high = np.array([np.nan if e["ci_high"] is None else e["ci_high"] for e in entries])
        errors = np.nan_to_num(np.vstack([values - low, high - values]), nan=0.0).clip(min=0)
        x = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        axes.bar(x, np.nan_to_num(values, nan=0.0), width, yerr=errors, capsize=2, label=_plain(arm),
                 color=_COLOURS[i % len(_COLOURS)], edgecolor="black", linewidth=0.4)
    axes.axhline(0.5, color="black", linestyle=":", linewidth=1, label="chance")
    axes.set_xticks(np.arange(len(groups)), [_plain(group) for group in groups], rotation=20, ha="right")
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("AUROC on the real test split (95% bootstrap CI)")
    axes.set_title(_plain(title))
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(arms) + 1, 4), fontsize=9, frameon=False)
    figure.tight_layout()  # the legend sits under the class names, clear of every bar
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path

"""One picture of how every branch trained: training loss, validation loss and conditioning gap per step.

It reads the TSV series DVCLive writes (``<live>/<branch>/plots/metrics/{train,val}/<name>.tsv``), the same
files ``dvc plots show`` draws, and puts the branches on shared axes so a reader of the report sees without
running DVC whether a branch converged, overfitted, or learned to ignore its condition (a gap near zero).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import atomic_path
from cxr_diffusion.safe_text import visible_text

# (folder, metric, panel title): the three series a training run is judged by.
PANELS = (
    ("train", "loss", "training loss (running mean of 20 steps)"),
    ("val", "loss", "validation loss"),
    ("val", "conditioning_gap", "conditioning gap (shuffled minus true conditions)"),
)
# DVCLive writes one short line per logged step; a million steps stay far below this.
MAX_SERIES_BYTES = 64 << 20
SMOOTHING_STEPS = 20
MAX_STEP_DIGITS = 12  # a trillion optimizer steps; the steps are held as int64
# A float as Python writes it (repr), or nan: float() alone also takes 1_0, full-width and Arabic-Indic digits.
_DECIMAL = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf)", re.ASCII | re.IGNORECASE)
NON_NEGATIVE = frozenset({"loss"})  # mean squared errors (the conditioning gap, a difference of two, may be negative)


class TrainingLogError(UserError, ValueError):
    """A DVCLive series is not what the train stage writes: hand-edited or damaged."""


def read_series(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The (steps, values) of one DVCLive TSV; empty arrays when the file is absent (a branch not trained yet).

    Steps must be whole numbers that increase; values are decimal numbers as Python writes floats (ASCII: no
    digit separator or other script's digits), NaN allowed (a skipped step logs NaN)."""
    fix = "rerun its train stage (`dvc repro -f train@<branch>`)"
    if path.is_symlink() and not path.exists():  # a DVC checkout whose cache lost the file: not "not trained"
        raise TrainingLogError(f"{path}: a link to a missing file; {fix}")
    if not path.exists():
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if not path.is_file():
        raise TrainingLogError(f"{path}: not a regular file; {fix}")
    if path.stat().st_size > MAX_SERIES_BYTES:
        raise TrainingLogError(f"{path}: larger than {MAX_SERIES_BYTES >> 20} MB, not a DVCLive series; {fix}")
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    if not lines or lines[0].split("\t") != ["step", metric]:
        raise TrainingLogError(f"{path}: header is not 'step<TAB>{metric}'; {fix}")
    steps, values = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if (len(fields) != 2 or not fields[0].isascii() or not fields[0].isdigit() or len(fields[0]) > MAX_STEP_DIGITS
                    or not _DECIMAL.fullmatch(fields[1])):
                raise ValueError
            step, value = int(fields[0]), float(fields[1])
        except ValueError:
            raise TrainingLogError(f"{path}: line {number} {visible_text(line, 80)!r} is not '<step><TAB><number>'; "
                                   f"{fix}") from None
        if steps and step <= steps[-1]:
            raise TrainingLogError(f"{path}: line {number}: step {step} does not follow step {steps[-1]}; {fix}")
        if math.isinf(value):
            raise TrainingLogError(f"{path}: line {number}: an infinite {metric}; {fix}")
        if metric in NON_NEGATIVE and value < 0:  # the loss is a mean squared error: never below 0
            raise TrainingLogError(f"{path}: line {number}: a negative {metric} ({value}); {fix}")
        steps.append(step)
        values.append(value)
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of the last ``window`` finite values at each point (NaNs, skipped steps, are left out)."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    start = np.maximum(np.arange(len(values)) - window, -1)
    window_sums = sums - np.where(start >= 0, sums[np.maximum(start, 0)], 0.0)
    window_counts = counts - np.where(start >= 0, counts[np.maximum(start, 0)], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(window_counts > 0, window_sums / np.maximum(window_counts, 1), np.nan)


def training_curves(live: Path, branches: list[str], path: Path) -> Path:
    """Draw the three panels for ``branches`` from the DVCLive folder ``live``; save a PNG at ``path``
    atomically and return it. A branch with no series yet is named in the legend as "not trained"."""
    return save_figure(draw_training_curves(live, branches), path)


def save_figure(figure: Figure, path: Path) -> Path:
    """``figure`` as a PNG at ``path``, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def draw_training_curves(live: Path, branches: list[str]) -> Figure:
    """The three panels for ``branches`` from the DVCLive folder ``live``, drawn in memory (every series read
    and checked), so that a caller can write it together with what it goes with."""
    figure = Figure(figsize=(15, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    for index, (folder, metric, title) in enumerate(PANELS):
        axes = figure.add_subplot(1, len(PANELS), index + 1)
        for branch in branches:
            steps, values = read_series(live / branch / "plots" / "metrics" / folder / f"{metric}.tsv", metric)
            if not len(steps):
                axes.plot([], [], label=f"{branch} (not trained)")
                continue
            if folder == "train":
                values = running_mean(values, SMOOTHING_STEPS)
            axes.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=4, label=branch)
        axes.set_title(title, fontsize=11)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        if metric == "loss":
            axes.set_yscale("log")
        else:
            axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.legend(loc="best", fontsize=9)
    figure.tight_layout()
    return figure

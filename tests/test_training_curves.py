"""The training-curves figure: drawn from the DVCLive series the train stage writes, refused when they are damaged."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cxr_diffusion.evaluation.training_curves import TrainingLogError, read_series, running_mean, training_curves


def write_series(live, branch, folder, metric, rows) -> None:
    path = live / branch / "plots" / "metrics" / folder / f"{metric}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\t" + metric + "\n" + "".join(f"{step}\t{value}\n" for step, value in rows))


def test_the_figure_shows_every_branch_large_enough_to_read(tmp_path):
    live = tmp_path / "dvclive"
    for offset, branch in enumerate(["clip_text", "elixr"]):
        write_series(live, branch, "train", "loss", [(step, 0.3 / step + offset * 0.01) for step in range(1, 61)])
        write_series(live, branch, "val", "loss", [(20, 0.05), (40, 0.04), (60, 0.03 + offset * 0.01)])
        write_series(live, branch, "val", "conditioning_gap", [(20, 0.001), (40, 0.002), (60, 0.003)])
    path = training_curves(live, ["clip_text", "elixr", "clip_vision"], tmp_path / "reports" / "curves.png")
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width >= 1000 and height >= 400
    # Not a blank canvas: the lines are drawn in colour (matplotlib's tab:blue of the first branch).
    assert ((np.abs(pixels.astype(int) - [31, 119, 180]).sum(-1)) < 30).sum() > 100
    assert not list((tmp_path / "reports").glob("*.tmp*"))


def test_a_missing_series_is_empty_and_a_good_one_reads_back(tmp_path):
    assert [len(part) for part in read_series(tmp_path / "absent.tsv", "loss")] == [0, 0]
    write_series(tmp_path, "b", "train", "loss", [(1, 0.5), (2, float("nan")), (3, 0.25)])
    steps, values = read_series(tmp_path / "b/plots/metrics/train/loss.tsv", "loss")
    assert steps.tolist() == [1, 2, 3] and values[0] == 0.5 and math.isnan(values[1]) and values[2] == 0.25


@pytest.mark.parametrize("content, words", [
    ("step\tlr\n1\t0.1\n", "header is not 'step<TAB>loss'"),
    ("", "header is not"),
    ("step\tloss\n1\tlow\n", "is not '<step><TAB><number>'"),
    ("step\tloss\n1\t0.1\t7\n", "line 2"),
    ("step\tloss\n-1\t0.1\n", "line 2"),
    ("step\tloss\n\u0661\t0.1\n", "line 2"),          # an Arabic-Indic one is not a step
    ("step\tloss\n2\t0.1\n2\t0.2\n", "step 2 does not follow step 2"),
    ("step\tloss\n1\tinf\n", "an infinite loss"),
    ("step\tloss\n1\t0.1\n\x1b]0;owned\x07\t1\n", "line 3"),
])
def test_a_damaged_series_is_one_line_naming_the_file_and_line(tmp_path, content, words):
    path = tmp_path / "loss.tsv"
    path.write_text(content)
    with pytest.raises(TrainingLogError) as error:
        read_series(path, "loss")
    message = str(error.value)
    assert str(path) in message and words in message and "dvc repro" in message
    assert "\n" not in message and "\x1b" not in message


def test_a_folder_in_place_of_a_series_is_refused(tmp_path):
    (tmp_path / "loss.tsv").mkdir()
    with pytest.raises(TrainingLogError, match="not a regular file"):
        read_series(tmp_path / "loss.tsv", "loss")


def test_the_running_mean_skips_nan_steps_and_uses_the_last_window():
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    assert running_mean(values, 2).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0]
    assert math.isnan(running_mean(np.array([np.nan, np.nan]), 3)[1])

"""The utility stages' inputs edited by hand: a real arm that says more than it holds, probabilities that are
not probabilities, a store of another branch. Each is refused in one line before a synthetic image is made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import one_line_message
from cxr_diffusion.utility.real_arm import REAL, REAL_ARM, SCORES, UtilityError, read_real_arm, write_scores

CLASSES = ["Effusion", "No Finding"]
TEST = ["00000001_000.png", "00000002_000.png", "00000003_000.png"]


def real_arm(folder: Path, scores: np.ndarray, train_images: int = 2, classifier: dict | None = None) -> Path:
    """A real arm as `utility_real` writes it, trained with the default params' classifier unless told."""
    from cxr_diffusion.profiles import params_with

    folder.mkdir(parents=True, exist_ok=True)
    classifier = classifier or params_with({}).utility.classifier.model_dump(mode="json")
    (folder / REAL_ARM).write_text(json.dumps({"classes": CLASSES, "train_images": train_images,
                                               "train_image_indices": ["a.png", "b.png"], "seed_macro_auroc": [0.5],
                                               "classifier": classifier}))
    write_scores(folder / SCORES, {REAL: scores}, TEST, CLASSES)
    return folder


def test_a_sound_real_arm_is_read(tmp_path):
    facts, scores = read_real_arm(real_arm(tmp_path, np.full((3, 2), 0.25)), CLASSES, TEST, 1)
    assert facts["train_images"] == 2 and scores.shape == (3, 2)


def test_a_train_count_its_list_does_not_hold_is_refused(tmp_path):
    folder = real_arm(tmp_path, np.full((3, 2), 0.25), train_images=999_999)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert "'train_images' is 999999 but its list holds 2" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -500.0, 500.0, 1.5])
def test_probabilities_outside_0_1_are_refused_naming_the_image_and_class(tmp_path, bad):
    scores = np.full((3, 2), 0.25)
    scores[2, 1] = bad
    message = one_line_message(lambda: read_real_arm(real_arm(tmp_path, scores), CLASSES, TEST, 1), UtilityError)
    assert f"{SCORES}: 1 probabilities are not in [0, 1]" in message and "00000003_000.png, No Finding" in message


def test_a_store_of_another_branch_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """utility@elixr given the clip_vision store once generated from it and called the result elixr."""
    from cxr_diffusion.conditioning.store import ConditionStoreWriter, StoreError
    from cxr_diffusion.profiles import params_with
    from cxr_diffusion.utility import study

    store = tmp_path / "store"
    with ConditionStoreWriter(store, 1, 1, 4) as writer:
        writer.write(0, np.ones((1, 1, 4), np.float32))
        writer.finish(["00000001_000.png"], np.arange(1), {"branch": "clip_vision"})

    class Prepared:  # only what branch_utility reads before it checks the store
        def __init__(self, _folder, split, channels):
            self.classes, self.image_indices = CLASSES, TEST if split == "test" else ["a.png", "b.png"]

    monkeypatch.setattr(study, "PreparedImages", Prepared)
    monkeypatch.setattr(study, "train_subset", lambda *_args: [0, 1])
    real = real_arm(tmp_path / "real", np.full((3, 2), 0.25))
    message = one_line_message(lambda: study.branch_utility(
        params_with({}), "elixr", tmp_path / "no-model", tmp_path / "prepared", tmp_path / "filtered.csv", store, real, tmp_path / "out",
        tmp_path / "figures", tmp_path / "m.json"), StoreError)
    assert "holds 'clip_vision' conditions, not elixr's" in message
    assert not (tmp_path / "out").exists()


def test_rows_of_another_arm_or_scores_that_are_not_floats_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = real_arm(tmp_path / "a", np.full((3, 2), 0.25))
    table = pq.read_table(folder / SCORES)
    pq.write_table(table.set_column(0, "arm", pa.array(["real", "synthetic", "real"])), folder / SCORES)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert "rows of arms ['real', 'synthetic'], expected only 'real'" in message
    folder = real_arm(tmp_path / "b", np.full((3, 2), 0.25))
    table = pq.read_table(folder / SCORES)
    pq.write_table(table.set_column(2, "Effusion", pa.array([" 0.7 ", "0.1", "0.2"])), folder / SCORES)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert "class columns ['Effusion'] are not floating-point probabilities (string)" in message


def test_a_small_scores_file_declaring_millions_of_rows_is_refused_from_its_footer(tmp_path, monkeypatch):
    """Millions of rows of one repeated value compress to a few hundred KB; 20 million read whole took a minute."""
    folder = real_arm(tmp_path, np.full((3, 2), 0.25))
    rows = 2_000_000
    table = pa.table({"arm": pa.array([REAL] * 1, pa.string()).take(pa.array(np.zeros(rows, np.int64))),
                      "image_index": pa.array([TEST[0]]).take(pa.array(np.zeros(rows, np.int64))),
                      **{name: pa.array(np.full(rows, 0.5)) for name in CLASSES}})
    pq.write_table(table, folder / SCORES, compression="zstd")
    monkeypatch.setattr(pq, "read_table", lambda *args, **kwargs: pytest.fail("read the whole table"))
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert f"{SCORES}: 2,000,000 rows, this run's real test split has 3 images" in message


def test_an_extra_class_column_is_named_in_the_reason(tmp_path):
    folder = real_arm(tmp_path, np.full((3, 2), 0.25))
    table = pq.read_table(folder / SCORES)
    pq.write_table(table.append_column("Mass", pa.array([0.1, 0.2, 0.3])), folder / SCORES)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert f"{SCORES}: class columns {CLASSES + ['Mass']}, this run's classes are {CLASSES}" in message


def test_a_fifo_named_as_the_scores_file_is_refused_instead_of_blocking(tmp_path):
    """pyarrow opens a FIFO and waits for a writer: the utility stage hung with no output."""
    import os
    import subprocess
    import sys

    folder = real_arm(tmp_path, np.full((3, 2), 0.25))
    (folder / SCORES).unlink()
    os.mkfifo(folder / SCORES)
    code = ("from pathlib import Path\nfrom cxr_diffusion.utility.real_arm import read_real_arm\n"
            f"read_real_arm(Path({str(folder)!r}), {CLASSES!r}, {TEST!r}, 1)")
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("read_real_arm blocked on a FIFO named test_scores.parquet")
    assert f"{folder / SCORES}: not a regular file" in result.stderr.strip().splitlines()[-1]


def test_a_scores_file_of_kilobytes_declaring_gigabytes_is_refused_from_its_footer(tmp_path):
    """Three rows whose image ids are 8 MB of one letter each, a few KB of zstd (the pass that found it used
    64 MB ids: 4 KB that read_table inflated to hundreds of MB before the ids were compared)."""
    folder = real_arm(tmp_path, np.full((3, 2), 0.25))
    table = pa.table({"arm": [REAL] * 3, "image_index": ["x" * (8 << 20)] * 3,
                      "Effusion": [0.1, 0.2, 0.3], "No Finding": [0.4, 0.5, 0.6]})
    pq.write_table(table, folder / SCORES, compression="zstd")
    assert (folder / SCORES).stat().st_size < 100_000
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert f"{folder / SCORES}: declares " in message and "more than 3 rows of scores can hold" in message


def test_a_train_count_of_true_is_not_one_image(tmp_path):
    folder = real_arm(tmp_path, np.full((3, 2), 0.25))
    facts = json.loads((folder / REAL_ARM).read_text())
    (folder / REAL_ARM).write_text(json.dumps({**facts, "train_images": True, "train_image_indices": ["a.png"]}))
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert "no 'train_images' count" in message


@pytest.mark.parametrize("per_seed", [None, [], [0.5, 0.6], ["0.5"], [1.5], [True]])
def test_a_real_arm_without_one_auroc_per_seed_is_refused(tmp_path, per_seed):
    """utility.seeds: 1 here; a file written for other seeds (or by hand) is refused before anything trains."""
    folder = real_arm(tmp_path, np.full((3, 2), 0.25))
    facts = json.loads((folder / REAL_ARM).read_text())
    (folder / REAL_ARM).write_text(json.dumps({**facts, "seed_macro_auroc": per_seed}))
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST, 1), UtilityError)
    assert "'seed_macro_auroc' is not 1 AUROC(s), one per training seed (utility.seeds)" in message


def test_dollar_signs_in_names_are_drawn_as_text_in_the_utility_chart(tmp_path):
    """matplotlib reads $...$ as math: a class named `Fluid $\\undefinedmacro$` raised when the chart was saved,
    after every arm had trained. The params refuse such merged names now; the chart draws any name literally."""
    from PIL import Image

    from cxr_diffusion.utility.chart import auroc_bars

    result = {"per_class": {"Fluid $\\undefinedmacro$": {"auroc": 0.7, "ci_low": 0.6, "ci_high": 0.8},
                            "a$^$b": {"auroc": 0.6, "ci_low": 0.5, "ci_high": 0.7}},
              "macro": {"auroc": 0.65, "ci_low": 0.55, "ci_high": 0.75}}
    path = auroc_bars({"real $x$": result}, ["Fluid $\\undefinedmacro$", "a$^$b"], "N = $1$", tmp_path / "a.png")
    assert Image.open(path).size[0] >= 800


# The subgroups read data/filtered/filtered.csv as the filter stage wrote it: each image once, ages whole numbers
# of years within 0-150. An edited table is one line naming the image, not a traceback or a silent band.
SUBGROUP_NAMES = ["00000001_000.png", "00000002_000.png"]


def filtered_table(path: Path, ages, genders=("M", "F"), names=SUBGROUP_NAMES) -> Path:
    import pandas as pd

    pd.DataFrame({"Image Index": list(names), "Patient ID": ["1", "2"][:len(names)], "Patient Age": list(ages),
                  "Patient Gender": list(genders), "split": "test"}).to_csv(path, index=False)
    return path


def subgroup_refusal(path: Path) -> str:
    from cxr_diffusion.utility.subgroups import SubgroupError, subgroups_of_films

    message = one_line_message(lambda: subgroups_of_films(path, SUBGROUP_NAMES, [40, 60]), SubgroupError)
    assert str(path) in message
    return message


@pytest.mark.parametrize("age", ["-5", "200", "1e20", "7.9", "inf", "-inf", "1e400", "NaN", "", "abc"])
def test_an_age_the_filter_never_writes_is_refused_naming_the_image(tmp_path, age):
    """inf and 1e400 ended in an OverflowError; -5, 200 and 7.9 were put in a band without a word."""
    message = subgroup_refusal(filtered_table(tmp_path / "filtered.csv", [age, "50"]))
    assert SUBGROUP_NAMES[0] in message and "not a whole number of years in 0-150" in message


def test_an_image_listed_twice_in_the_filtered_table_is_refused_naming_both_rows(tmp_path):
    """The first of two rows with other ages and sexes was used silently."""
    import pandas as pd

    path = tmp_path / "filtered.csv"
    pd.DataFrame({"Image Index": [SUBGROUP_NAMES[0], SUBGROUP_NAMES[0], SUBGROUP_NAMES[1]],
                  "Patient Age": ["30", "75", "50"], "Patient Gender": ["M", "F", "F"]}).to_csv(path, index=False)
    assert f"image '{SUBGROUP_NAMES[0]}' is on lines 2 and 3" in subgroup_refusal(path)


def test_a_fifo_named_as_the_filtered_table_is_refused_instead_of_blocking(tmp_path):
    import os

    fifo = tmp_path / "filtered.csv"
    os.mkfifo(fifo)
    assert "not a regular file" in subgroup_refusal(fifo)


def test_a_sound_filtered_table_gives_each_film_its_sex_and_age_band(tmp_path):
    from cxr_diffusion.utility.subgroups import subgroups_of_films

    groups = subgroups_of_films(filtered_table(tmp_path / "filtered.csv", ["39", "60"], ["M", "U"]),
                                SUBGROUP_NAMES, [40, 60])
    assert groups == {"sex": ["M", "other"], "age": ["<40", "60+"]}

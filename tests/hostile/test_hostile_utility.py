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


def real_arm(folder: Path, scores: np.ndarray, train_images: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REAL_ARM).write_text(json.dumps({"classes": CLASSES, "train_images": train_images,
                                               "train_image_indices": ["a.png", "b.png"]}))
    write_scores(folder / SCORES, {REAL: scores}, TEST, CLASSES)
    return folder


def test_a_sound_real_arm_is_read(tmp_path):
    facts, scores = read_real_arm(real_arm(tmp_path, np.full((3, 2), 0.25)), CLASSES, TEST)
    assert facts["train_images"] == 2 and scores.shape == (3, 2)


def test_a_train_count_its_list_does_not_hold_is_refused(tmp_path):
    folder = real_arm(tmp_path, np.full((3, 2), 0.25), train_images=999_999)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST), UtilityError)
    assert "'train_images' is 999999 but its list holds 2" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -500.0, 500.0, 1.5])
def test_probabilities_outside_0_1_are_refused_naming_the_image_and_class(tmp_path, bad):
    scores = np.full((3, 2), 0.25)
    scores[2, 1] = bad
    message = one_line_message(lambda: read_real_arm(real_arm(tmp_path, scores), CLASSES, TEST), UtilityError)
    assert f"{SCORES}: 1 probabilities are not in [0, 1]" in message and "00000003_000.png, No Finding" in message


def test_a_store_of_another_branch_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """utility@elixr given the clip_vision store once generated from it and called the result elixr."""
    from cxr_diffusion.conditioning.store import ConditionStoreWriter
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
        params_with({}), "elixr", tmp_path / "no-model", tmp_path / "prepared", store, real, tmp_path / "out",
        tmp_path / "figures", tmp_path / "m.json"), UtilityError)
    assert "holds 'clip_vision' conditions, not elixr's" in message
    assert not (tmp_path / "out").exists()


def test_rows_of_another_arm_or_scores_that_are_not_floats_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = real_arm(tmp_path / "a", np.full((3, 2), 0.25))
    table = pq.read_table(folder / SCORES)
    pq.write_table(table.set_column(0, "arm", pa.array(["real", "synthetic", "real"])), folder / SCORES)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST), UtilityError)
    assert "rows of arms ['real', 'synthetic'], expected only 'real'" in message
    folder = real_arm(tmp_path / "b", np.full((3, 2), 0.25))
    table = pq.read_table(folder / SCORES)
    pq.write_table(table.set_column(2, "Effusion", pa.array([" 0.7 ", "0.1", "0.2"])), folder / SCORES)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST), UtilityError)
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
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST), UtilityError)
    assert f"{SCORES}: 2,000,000 rows, this run's real test split has 3 images" in message


def test_an_extra_class_column_is_named_in_the_reason(tmp_path):
    folder = real_arm(tmp_path, np.full((3, 2), 0.25))
    table = pq.read_table(folder / SCORES)
    pq.write_table(table.append_column("Mass", pa.array([0.1, 0.2, 0.3])), folder / SCORES)
    message = one_line_message(lambda: read_real_arm(folder, CLASSES, TEST), UtilityError)
    assert f"{SCORES}: class columns {CLASSES + ['Mass']}, this run's classes are {CLASSES}" in message

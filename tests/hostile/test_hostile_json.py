"""Hostile JSON: every JSON file the library reads (outside the model folders' own loaders) is read by
`io.read_json`, so nesting deep enough for a RecursionError, an integer past Python's digit limit or bytes
that are not UTF-8 are one line naming the file and the fix, never a traceback.

(The prepared data's manifest.json and the fetch record external/assets.json have their own tests, in
test_hostile_stores.py and test_hostile_assets.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import JsonFileError, read_json

from conftest import one_line_message

DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b'{"images": ' + b"7" * 5000 + b"}"
NOT_UTF8 = b'{"images": "\xff"}'
HOSTILE = [DEEP, HUGE_INT, NOT_UTF8]
HOSTILE_IDS = ["deep", "huge_int", "not_utf8"]
REASONS = {
    DEEP: "nested too deeply",
    HUGE_INT: "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; use "
              "sys.set_int_max_str_digits() to increase the limit",
    NOT_UTF8: "'utf-8' codec can't decode byte 0xff in position 12: invalid start byte",
}


def one_line(call) -> str:
    return one_line_message(call, UserError)


# ----------------------------------------------------------------------------- condition store: store.json

@pytest.mark.parametrize("content", HOSTILE, ids=HOSTILE_IDS)
def test_a_hostile_store_json_is_one_line(tmp_path, content):
    from cxr_diffusion.conditioning.store import ConditionStore, ConditionStoreWriter, StoreError

    with ConditionStoreWriter(tmp_path / "s", 2, 1, 2) as store:
        store.write(0, np.zeros((2, 1, 2), np.float32))
        store.finish(["00000001_000.png", "00000002_000.png"], np.arange(2), {"branch": "test"})
    (tmp_path / "s" / "store.json").write_bytes(content)
    with pytest.raises(StoreError) as error:
        ConditionStore(tmp_path / "s")
    assert str(error.value) == (f"{tmp_path / 's' / 'store.json'}: not valid JSON ({REASONS[content]}); "
                                f"rerun its embed stage")


# ----------------------------------------------------------------------------- ELIXR snapshot: datasets.json

@pytest.mark.parametrize("content", HOSTILE, ids=HOSTILE_IDS)
def test_a_hostile_elixr_datasets_json_is_one_line(tmp_path, content):
    from cxr_diffusion.conditioning.elixr_index import SNAPSHOT_INDEX, read_snapshot_index

    (tmp_path / SNAPSHOT_INDEX).write_bytes(content)
    assert one_line(lambda: read_snapshot_index(tmp_path)) == (
        f"{tmp_path / SNAPSHOT_INDEX}: not valid JSON ({REASONS[content]}); download the ELIXR snapshot's "
        f"datasets.json again (or rerun `dvc repro -f elixr_standin` for the stand-in)")


# ----------------------------------------------------------------------------- saved model: model_index.json

@pytest.mark.parametrize("content", [DEEP, HUGE_INT], ids=["deep", "huge_int"])  # bad bytes were one line already
def test_a_hostile_model_index_json_is_one_line(tmp_path, content):
    from cxr_diffusion.sampling import sample

    (tmp_path / "model_index.json").write_bytes(content)
    with pytest.raises(sample.SamplingError) as error:
        sample._check_model_index(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'model_index.json'}: not valid JSON ({REASONS[content]}); retrain it "
                                f"(`dvc repro`, stage train@<branch>) or re-fetch the folder")


# ----------------------------------------------------------------------------- evaluator: config.json

def saved_evaluator(folder: Path) -> Path:
    from cxr_diffusion.evaluation.evaluator import ClassifierSpec, CXRClassifier, save_classifier

    save_classifier(CXRClassifier(ClassifierSpec(("No Finding", "Effusion"), 4, 8, 16)), folder, {})
    return folder


@pytest.mark.parametrize("content", HOSTILE, ids=HOSTILE_IDS)
def test_a_hostile_evaluator_config_json_is_one_line(tmp_path, content):
    from cxr_diffusion.evaluation.evaluator import load_classifier

    folder = saved_evaluator(tmp_path / "evaluator")
    (folder / "config.json").write_bytes(content)
    assert one_line(lambda: load_classifier(folder)) == (
        f"{folder / 'config.json'}: not valid JSON ({REASONS[content]}); retrain it with `dvc repro -f evaluator`")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c.pop("width"), "'width' is None, expected a whole number from 1 to 1024"),
    (lambda c: c.update(classes="Effusion"), "'classes' is 'Effusion', expected a list of class names"),
    (lambda c: c.update(feature_dim="8"), "'feature_dim' is '8', expected a whole number from 1 to 16384"),
    (lambda c: c.update(image_size=True), "'image_size' is True, expected a whole number from 1 to 4096"),
    (lambda c: c.update(input_size=-4), "'input_size' is -4, expected a whole number from 1 to 4096 or null"),
], ids=["no_width", "classes_text", "feature_dim_text", "image_size_bool", "input_size_negative"])
def test_an_evaluator_config_with_a_missing_or_mistyped_key_is_one_line_naming_it(tmp_path, change, expected):
    from cxr_diffusion.evaluation.evaluator import load_classifier

    folder = saved_evaluator(tmp_path / "evaluator")
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    assert one_line(lambda: load_classifier(folder)) == (
        f"{folder / 'config.json'}: {expected}; retrain it with `dvc repro -f evaluator`")


def test_an_intact_evaluator_config_loads(tmp_path):
    from cxr_diffusion.evaluation.evaluator import load_classifier

    model = load_classifier(saved_evaluator(tmp_path / "evaluator"))
    assert model.spec.classes == ("No Finding", "Effusion") and model.spec.input_size is None


# ----------------------------------------------------------------------------- compare: metrics files

@pytest.mark.parametrize("content", HOSTILE, ids=HOSTILE_IDS)
def test_a_hostile_metrics_file_read_by_compare_is_one_line(tmp_path, content):
    from cxr_diffusion.evaluation.report import read_evaluations

    path = tmp_path / "metrics" / "evaluate" / "clip_text.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert one_line(lambda: read_evaluations(["clip_text"], path.parent)) == (
        f"{path}: not valid JSON ({REASONS[content]}); rerun the stage that writes it (`dvc repro`)")


# ----------------------------------------------------------------------------- stand-in labels

@pytest.mark.parametrize("content", [DEEP], ids=["deep"])  # bad bytes and huge integers were caught already
def test_an_unreadable_standin_marker_still_marks_a_stand_in(tmp_path, content):
    from cxr_diffusion.assets.standin_marker import MARKER_NAME, read_standin

    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / MARKER_NAME).write_bytes(content)
    assert read_standin(tmp_path / "clip") == {"standin": True, "unreadable": True, "complete": True}


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000], ids=["deep"])
def test_an_unreadable_label_in_safetensors_metadata_still_marks_a_stand_in(tmp_path, text):
    from safetensors.torch import save_file

    from cxr_diffusion.assets.standin_marker import METADATA_KEY, read_standin

    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"), metadata={METADATA_KEY: text})
    assert read_standin(tmp_path / "w.safetensors") == {"standin": True, "unreadable": True, "complete": False}


@pytest.mark.parametrize("content", [DEEP, b'{"format": 1, "arguments": {}, "files": [], "ids": []}'],
                         ids=["deep", "files_a_list"])
def test_a_folder_whose_standin_record_is_unreadable_is_left_alone(tmp_path, content):
    from cxr_diffusion.rehearsal.nih_folder import MANIFEST_NAME, build_nih_folder

    root = tmp_path / "nih"
    root.mkdir()
    (root / MANIFEST_NAME).write_bytes(content)
    (tmp_path / "include.csv").write_text("Image Index\n")
    with pytest.raises(FileExistsError) as error:
        build_nih_folder(root, tmp_path / "include.csv", count=1, progress=False)
    assert str(error.value) == (f"{root} exists and has no {MANIFEST_NAME}, so it was not made by build_nih_folder; "
                                f"it is left alone. Pick an empty or new folder for the stand-in.")
    assert (root / MANIFEST_NAME).read_bytes() == content


def test_a_json_file_of_gigabytes_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A sparse 3 GiB file costs no disk; read whole it took the memory of twice its size."""
    path = tmp_path / "config.json"
    with open(path, "wb") as handle:
        handle.truncate(3 << 30)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    with pytest.raises(JsonFileError, match=r"config.json: 3,221,225,472 bytes, more than the 67,108,864"):
        read_json(path, "download it again")


def test_a_standin_marker_of_gigabytes_still_marks_a_standin_without_being_read(tmp_path):
    from cxr_diffusion.assets.standin_marker import MARKER_NAME, read_standin

    with open(tmp_path / MARKER_NAME, "wb") as handle:
        handle.truncate(3 << 30)
    assert read_standin(tmp_path) == {"standin": True, "unreadable": True, "complete": True}


from pathlib import Path

import pytest
import yaml

from cxr_diffusion.config import Params, ParamsError, Section, params_from_dict, to_dict
from cxr_diffusion.params_file import load_params, read_params_file
from cxr_diffusion.profiles import FOLDER, params_with, profile_data, profile_names

from conftest import write_profile

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_exp_run_style_float_string_is_read_as_float(tmp_path):
    # `dvc exp run -S lr=1e-5` writes `lr: 1e-05`, which PyYAML (YAML 1.1) returns as a string.
    path = tmp_path / "params.yaml"
    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    path.write_text(text.replace("\nlr: null ", "\nlr: 1e-05 ", 1))
    assert yaml.safe_load(path.read_text())["lr"] == "1e-05"
    params = load_params(path)
    assert isinstance(params.lr, float) and params.lr == pytest.approx(1e-5)


def test_unknown_top_level_key_is_named():
    with pytest.raises(ParamsError, match="unknown key 'lrr'"):
        params_with({"lrr": 1e-5})


def test_unknown_nested_key_is_named_with_its_section():
    with pytest.raises(ParamsError, match="unknown key 'filter.split.val_fractio'"):
        params_with({"filter": {"split": {"val_fractio": 0.2}}})


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match="'prepare.shard_size' is 'many'"):
        params_with({"prepare": {"shard_size": "many"}})


def test_bool_does_not_pass_as_int():
    with pytest.raises(ParamsError, match="'seed'"):
        params_with({"seed": True})


def test_literal_rejects_unknown_choice():
    with pytest.raises(ParamsError, match="'dataset.source' is 'kaggle'"):
        params_with({"dataset": {"source": "kaggle"}})


def test_class_that_is_not_an_nih_label_needs_a_merge():
    with pytest.raises(ParamsError, match="names 'Lung Opacity'"):
        params_with({"filter": {"classes": ["Lung Opacity"], "merges": {}}})


def test_out_of_range_value_is_named():
    with pytest.raises(ParamsError, match="'filter.split.test_fraction' val_fraction \\+ test_fraction must be < 1"):
        params_with({"filter": {"split": {"val_fraction": 0.5, "test_fraction": 0.5}}})


def test_untrained_baseline_size_is_checked_and_the_old_switch_is_named():
    with pytest.raises(ParamsError, match="evaluate.untrained_images"):
        params_with({"evaluate": {"untrained_images": -1}})
    with pytest.raises(ParamsError, match="unknown key 'evaluate.untrained_baseline'"):
        params_with({"evaluate": {"untrained_baseline": True}})
    assert params_with({"evaluate": {"untrained_images": 0}}).evaluate.untrained_images == 0


def test_nih_source_requires_nih_root():
    with pytest.raises(ParamsError, match="'dataset.nih_root' must point at your NIH ChestX-ray14 download"):
        params_with({"dataset": {"source": "nih"}})


def test_lists_become_tuples_and_merges_cast():
    params = params_with({"filter": {"classes": ["Effusion", "Nodule/Mass"], "merges": {"Nodule/Mass": ["Nodule", "Mass"]}}})
    assert params.filter.class_members() == {"Effusion": ("Effusion",), "Nodule/Mass": ("Nodule", "Mass")}


def _keys(tree, prefix=""):
    if isinstance(tree, dict):
        return {k for key, value in tree.items() for k in _keys(value, f"{prefix}{key}.") } | {prefix.rstrip(".")} - {""}
    return {prefix.rstrip(".")}


def _sections(model=Params):
    yield model
    for info in model.model_fields.values():
        for candidate in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, Section):
                yield from _sections(candidate)


def test_the_typed_layer_holds_no_second_default():
    """Values are written once, in params.yaml and the profiles: every key of every section is required."""
    sections = list(_sections())
    assert len(sections) == 20
    with_default = [f"{model.__name__}.{name}" for model in sections
                    for name, info in model.model_fields.items() if not info.is_required()]
    assert with_default == []


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_merges_to_params_that_load_and_list_every_key(repo, tmp_path, name):
    # DVC tracks only keys present in the file, so every key is written out in the merged params.yaml.
    path = write_profile(name, tmp_path)
    raw = yaml.safe_load(path.read_text())
    assert raw == profile_data(name)
    load_params(path)
    expected = _keys(to_dict(load_params(repo / "params.yaml")))
    assert {k for k in _keys(raw) if not k.startswith("filter.merges.")} == \
        {k for k in expected if not k.startswith("filter.merges.")}


@pytest.mark.parametrize("name", ["tiny", "nih-512", "rehearsal"])
def test_each_overlay_merges_to_the_complete_profile_it_replaced(name):
    # tests/fixtures/full_profiles holds the complete files these overlays were cut from: same keys, same values.
    assert profile_data(name) == read_params_file(FIXTURES / "full_profiles" / f"{name}.yaml")


def test_the_default_profile_is_complete_and_overlays_hold_only_what_they_change():
    default = read_params_file(FOLDER / "default.yaml")
    params_from_dict(default)
    for name in set(profile_names()) - {"default"}:
        overlay = read_params_file(FOLDER / f"{name}.yaml")
        base = profile_data(overlay.pop("extends", "default"))
        assert _unchanged(overlay, base) == [], f"{name}.yaml repeats its base's values"


def _unchanged(overlay: dict, base: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "merges":
            found += _unchanged(value, base[key], f"{prefix}{key}.")
        elif base.get(key, object()) == value:
            found.append(prefix + key)
    return found


def test_params_yaml_is_the_default_profile(repo):
    assert (repo / "params.yaml").read_text() == (FOLDER / "default.yaml").read_text()


def test_nih_512_profile_is_the_reference_subset(repo):
    raw = profile_data("nih-512")
    params = params_from_dict(raw)
    assert params.image_size == 512 and params.dataset.source == "nih"
    assert params.filter.classes == ("Infiltration", "No Finding", "Effusion", "Nodule/Mass", "Atelectasis")
    assert (repo / params.filter.include_list).is_file()


@pytest.mark.parametrize(("override", "key"), [
    ({"train": {"grad_clip": -1}}, "train.grad_clip"),         # flipped the gradient's sign (issue 13)
    ({"train": {"weight_decay": -10}}, "train.weight_decay"),
    ({"train": {"num_workers": -3}}, "train.num_workers"),     # crashed after wiping dvclive/<branch>
    ({"train": {"warmup_steps": -1}}, "train.warmup_steps"),
    ({"train": {"early_stopping_patience": 0}}, "train.early_stopping_patience"),
    ({"clip": {"demo": {"weight_decay": -1}}}, "clip.demo.weight_decay"),
    ({"seed": -1}, "seed"),
    ({"lr": ".inf"}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"train": {"lr": {"elixr": float("inf")}}}, "train.lr.elixr"),
    ({"branches": []}, "branches"),
    ({"sample": {"steps": 100_000_000}}, "sample.steps"),     # grew to 20 GB before the kernel killed it
])
def test_values_that_used_to_pass_and_then_do_damage_are_refused_naming_the_key(override, key):
    with pytest.raises(ParamsError, match=f"'{key}'"):
        params_with(override)


@pytest.mark.parametrize(("override", "message"), [
    ({"study_id": "../pilot"}, "'reader_study.study_id' is '../pilot'"),   # it names the readers' files
    ({"study_id": ""}, "'reader_study.study_id'"),
    ({"calibration": 60}, "'reader_study.calibration' must be below count"),
    ({"count": 1}, "'reader_study.count'"),
    ({"real_fraction": 1.0}, "'reader_study.real_fraction'"),
    ({"display_size": 8}, "'reader_study.display_size'"),
])
def test_reader_study_settings_are_checked_naming_the_key(override, message):
    with pytest.raises(ParamsError, match=message.replace(".", "\\.").replace("(", "\\(")):
        params_with({"reader_study": override})
    assert params_with({"reader_study": {"real_fraction": 0.5}}).reader_study.real_fraction == 0.5


def test_a_utility_arm_too_large_to_hold_in_memory_is_refused_before_it_starts():
    # nih-512's N = 20,000 at 256 px is 1.3 GB per N; 64 x N would be 78 GiB
    large = {"image_size": 512, "utility": {"train_images": 20_000, "classifier": {"max_image_size": 256}}}
    assert params_with({**large, "utility": {**large["utility"], "scaling": [4]}}).utility.scaling == (4,)
    with pytest.raises(ParamsError, match=r"'utility.scaling' holds 1,280,000 images of 256x256 in memory"):
        params_with({**large, "utility": {**large["utility"], "scaling": [2, 64]}})

"""Hostile params: values that used to pass validation and then did damage are refused, naming the key."""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml
from ruamel.yaml import YAML

from cxr_diffusion.config import Params, ParamsError, Section, params_from_dict
from cxr_diffusion.params_file import load_params
from cxr_diffusion.profiles import params_with

REPO = Path(__file__).resolve().parents[2]
DEFAULT = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())


def _numeric_types(annotation: object) -> typing.Iterator[object]:
    """int/float/section types inside ``X``, ``Annotated[X, ...]`` and ``X | None``."""
    if typing.get_origin(annotation) is typing.Annotated:
        yield from _numeric_types(typing.get_args(annotation)[0])
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            yield from _numeric_types(option)
    elif annotation in (int, float) or (isinstance(annotation, type) and issubclass(annotation, Section)):
        yield annotation


def _numeric_keys(cls: type[Section], prefix: str = "") -> typing.Iterator[str]:
    for name, info in cls.model_fields.items():
        for option in _numeric_types(info.annotation):
            if option in (int, float):
                yield f"{prefix}{name}"
            else:
                yield from _numeric_keys(option, f"{prefix}{name}.")


def _with(key: str, value: object) -> dict:
    data = copy.deepcopy(DEFAULT)
    *sections, name = key.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = value
    return data


NUMERIC_KEYS = sorted(_numeric_keys(Params))


def test_the_sweep_covers_every_numeric_param():
    assert len(NUMERIC_KEYS) > 80 and "train.grad_clip" in NUMERIC_KEYS and "evaluate.diversity_pairs" in NUMERIC_KEYS


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_param_refuses_minus_a_billion_naming_its_key(key):
    with pytest.raises(ParamsError) as refused:
        params_from_dict(_with(key, -10**9))
    assert f"'{key}' is -1000000000; must be " in str(refused.value)


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_param_refuses_a_trillion_naming_its_key(key):
    """Upper bounds: `num_train_timesteps: 1e9` used to hang building the schedule, huge batches exhaust memory."""
    with pytest.raises(ParamsError) as refused:
        params_from_dict(_with(key, 10**12))
    assert f"'{key}' " in str(refused.value) and "must be" in str(refused.value)


def test_num_train_timesteps_of_a_billion_is_refused_at_once():
    with pytest.raises(ParamsError, match=r"'train.num_train_timesteps' is 1000000000; must be in \[1, 10000\]"):
        params_from_dict(_with("train.num_train_timesteps", 10**9))


@pytest.mark.parametrize("key, value", [("channels", True), ("image_size", True), ("train.batch_size", False),
                                        ("train.grad_clip", True), ("seed", "3"), ("train.batch_size", 32.5),
                                        ("train.unet.cross_attention", [1, 0, 1]), ("train.zero_terminal_snr", "yes")])
def test_a_value_of_the_wrong_type_is_refused_not_coerced(key, value):
    """`channels: true` used to be read as 1; strict types keep true, "3", 32.5 and 1/0 for what they are."""
    with pytest.raises(ParamsError, match=rf"'{key}(\[0\])?' is .*; expected"):
        params_from_dict(_with(key, value))


def test_a_missing_key_is_an_error_naming_it_not_a_hidden_default():
    data = copy.deepcopy(DEFAULT)
    del data["train"]["max_steps"]
    with pytest.raises(ParamsError, match=r"'train.max_steps' is missing; every key must be set in params.yaml"):
        params_from_dict(data)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """436 bytes of nested aliases used to hang the loader (expanding to ~10**9 items in the error message)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\nseed: *a8\n")
    with pytest.raises(ParamsError, match=r"line 2: YAML aliases \(\*a0\) are not supported"):
        load_params(path)


def test_an_oversized_params_file_is_refused_without_parsing(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 0\n" + b"#" * (2 << 20))
    with pytest.raises(ParamsError, match=r"is 2097160 bytes; a params file is a few KB"):
        load_params(path)


def test_seed_with_a_leading_zero_is_read_as_dvc_records_it(tmp_path):
    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    path.write_text(text.replace("\nseed: 0 ", "\nseed: 010 ", 1))  # YAML 1.1 (PyYAML) reads octal 8; DVC writes 10
    assert "seed: 010 " in path.read_text()
    assert load_params(path).seed == parse_yaml(path.read_text(), str(path))["seed"] == 10


def test_seed_beyond_numpys_range_is_refused():
    with pytest.raises(ParamsError, match=r"'seed' is 4294967296; must be in \[0, 4294967296\)"):
        params_from_dict(_with("seed", 2**32))


def test_learning_rate_above_one_is_refused():
    with pytest.raises(ParamsError, match=r"'train.lr.elixr' is 10.0; must be in \(0, 1\]"):
        params_from_dict(_with("train.lr.elixr", 10.0))


def test_a_duplicated_key_is_refused_not_silently_overwritten(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ParamsError, match=r"is not valid YAML: .*duplicate key") as refused:
        load_params(path)
    assert "\n" not in str(refused.value)


def test_a_python_tag_is_refused_without_running_anything(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ParamsError, match="is not valid YAML"):
        load_params(path)
    assert not Path("pwned").exists()


@pytest.mark.parametrize("value", ["accelerate/one-process.yaml; rm -rf ~", "accelerate/$(id).yaml",
                                   "../etc/accelerate.yaml", "accelerate/../../x.yaml", "accelerate/a b.yaml"])
def test_launch_config_that_could_reach_the_shell_is_refused(value):
    with pytest.raises(ParamsError, match="'train.launch_config' is .*must name an accelerate config file"):
        params_from_dict(_with("train.launch_config", value))


def test_every_profile_launch_config_exists():
    from cxr_diffusion.profiles import params_with, profile_names

    for name in profile_names():
        assert (REPO / params_with(profile=name).train.launch_config).is_file(), name


@pytest.mark.parametrize("name", ["Image Index", "split", "Finding Labels", "Patient ID", "image_index", "arm",
                                  "", "   ", " Fluid", "a\nb", "Fluid $\\undefinedmacro$", "No Finding", "no finding"])
def test_a_merged_class_that_would_clash_with_a_column_or_break_a_figure_is_refused(name):
    """A merged class becomes a column beside the filtered table's own ('Image Index' made the filter stage fail
    with a pandas traceback, 'split' with an assertion), must be visible on one line ('' reached prepare, which
    could only say to rerun the filter), and must not hold $ (matplotlib parses $...$ as math: the utility chart
    raised after every arm had trained); an NIH label as a merge target would silently redefine that label."""
    with pytest.raises(ParamsError) as raised:
        params_with({"filter": {"classes": ["Effusion", name], "merges": {name: ["Mass"]}}})
    message = str(raised.value)
    if "\n" in name:  # refused as a class name first: every params string is visible text on one line
        assert "filter.classes" in message and "visible text on one line" in message, message
        return
    assert "\n" not in message and "filter.merges." in message and "use Latin letters" in message, message


@pytest.mark.parametrize("name", ["No F\u0456nding", "\u0415ffusion", "Effusi\u00f3n", "\u039dodule"])
def test_a_merged_class_that_reads_like_an_nih_label_in_another_script_or_accent_is_refused(name):
    """'No Fіnding' (a Cyrillic і) merging Effusion sat beside the real No Finding: two columns and two report
    rows that read the same (pass 10). Reader ids refuse such look-alikes too."""
    with pytest.raises(ParamsError, match="filter.merges.*use Latin letters"):
        params_with({"filter": {"classes": [name, "Mass"], "merges": {name: ["Effusion", "Nodule"]}}})


def test_a_merged_class_with_a_new_visible_name_is_accepted():
    params = params_with({"filter": {"classes": ["Effusion", "Fluid or mass (merged)"],
                                     "merges": {"Fluid or mass (merged)": ["Mass", "Nodule"]}}})
    assert params.filter.class_members()["Fluid or mass (merged)"] == ("Mass", "Nodule")
    accented = params_with({"filter": {"classes": ["Effusion", "Flüssigkeit"], "merges": {"Flüssigkeit": ["Mass"]}}})
    assert accented.filter.class_members()["Flüssigkeit"] == ("Mass",)


# ----------------------------------------------------------------------------- pass 9: what the YAML parser raises

@pytest.mark.parametrize("text, expected", [
    ((REPO / "params.yaml").read_text().replace("seed: ", "seed: " + "1" * 5000 + "  # ", 1), "cannot be read"),
    ("x: " + "[" * 100_000 + "]" * 100_000 + "\n", "values nested more than 16 deep"),
], ids=["5000-digit int", "nested 100000 deep"])
def test_what_python_cannot_hold_is_one_line_naming_the_file(tmp_path, text, expected):
    """A 5000-digit int (past Python's digit limit) and brackets nested 100,000 deep (a RecursionError), each
    well under the size cap, ended the stage and `cxr-diffusion profile` in a traceback."""
    from typer.testing import CliRunner

    from cxr_diffusion.cli import app

    path = tmp_path / "overlay.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=expected) as refused:
        load_params(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value) and len(str(refused.value)) < 600
    result = CliRunner().invoke(app, ["profile", str(path), "--root", str(tmp_path)])
    assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("section", "key"), [("evaluate", "raddino"), ("elixr", "path"), ("evaluate", "inception_weights"),
                                              ("evaluate", "reference_inception_weights"), ("evaluate", "xrv_weights")])
def test_an_empty_asset_path_is_refused_like_an_empty_clip_model(section, key):
    """'' names the working directory, the repository itself: doctor reported the whole checkout as the asset and
    fetch would have downloaded into it (pass 10; clip.model '' and train.vae '' were already refused)."""
    with pytest.raises(ParamsError, match=f"'{section}.{key}' is ''"):
        params_with({section: {key: ""}})

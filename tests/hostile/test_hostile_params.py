"""Hostile params: values that used to pass validation and then did damage are refused, naming the key."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml
from ruamel.yaml import YAML

from cxr_diffusion.config import Params, ParamsError, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[2]
DEFAULT = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())


def _numeric_keys(cls: type, prefix: str = "") -> typing.Iterator[str]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        annotation, key = hints[field.name], f"{prefix}{field.name}"
        options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
            else (annotation,)
        for option in options:
            if dataclasses.is_dataclass(option):
                yield from _numeric_keys(option, key + ".")
            elif option in (int, float):
                yield key


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
    assert key.split(".")[-1] in str(refused.value)


def test_seed_with_a_leading_zero_is_read_as_dvc_records_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 010\n")  # YAML 1.1 (PyYAML) reads octal 8; DVC writes 10 into dvc.lock
    assert load_params(path).seed == parse_yaml(path.read_text(), str(path))["seed"] == 10


def test_seed_beyond_numpys_range_is_refused():
    with pytest.raises(ParamsError, match=r"'seed' is 4294967296; must be in \[0, 2\*\*32 - 1\]"):
        params_from_dict(_with("seed", 2**32))


def test_learning_rate_above_one_is_refused():
    with pytest.raises(ParamsError, match=r"'train.lr.elixr' must be in \(0, 1\]"):
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
    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        assert (REPO / load_params(profile).train.launch_config).is_file(), profile.name

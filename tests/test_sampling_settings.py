"""The one comparison evaluate and compare make between what generations record and params.yaml."""

from __future__ import annotations

import pytest

from cxr_diffusion.profiles import params_with
from cxr_diffusion.sampling.settings import PARAM_OF_SETTING, changed_setting, sampling_settings


@pytest.fixture(scope="module")
def params():
    return params_with({"seed": 3, "sample": {"steps": 20, "count": 64}})


def test_the_params_own_settings_agree(params):
    assert changed_setting(sampling_settings(params), params) is None
    assert set(sampling_settings(params)) == set(PARAM_OF_SETTING)


@pytest.mark.parametrize("key, recorded", [("steps", 40), ("seed", 4), ("count", 32), ("sampler", "ddpm"),
                                           ("guidance_scale", 7.5)])
def test_each_changed_setting_is_named_with_its_param(params, key, recorded):
    changed = changed_setting({**sampling_settings(params), key: recorded}, params)
    assert (changed.key, changed.recorded) == (key, recorded)
    assert f"sampled with {key} {recorded!r}, but {PARAM_OF_SETTING[key]} is " in changed.describe()


def test_a_missing_setting_is_a_change_unless_left_out_of_the_keys(params):
    recorded = {key: value for key, value in sampling_settings(params).items() if key != "seed"}
    assert changed_setting(recorded, params).key == "seed"
    assert changed_setting(recorded, params, keys=[key for key in PARAM_OF_SETTING if key in recorded]) is None


def test_json_true_is_not_the_number_one():
    params = params_with({"sample": {"guidance_scale": 1.0}})
    changed = changed_setting({**sampling_settings(params), "guidance_scale": True}, params)
    assert changed is not None and changed.key == "guidance_scale"

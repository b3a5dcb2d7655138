"""The branch registry is the one list of branches: params, pipeline, CLI and stages agree with it."""

from __future__ import annotations

import inspect

import pytest

from cxr_diffusion.branches import BRANCH_SPECS, BRANCHES, branch_spec
from cxr_diffusion.config import BranchRates, ParamsError
from cxr_diffusion.profiles import params_with


def test_every_branch_has_its_own_learning_rate_key():
    assert tuple(BranchRates.model_fields) == BRANCHES


def test_params_accept_exactly_the_registered_branches():
    assert params_with({"branches": list(BRANCHES)}).branches == BRANCHES
    with pytest.raises(ParamsError, match="branches"):
        params_with({"branches": ["clip_audio"]})


def test_each_branch_names_a_real_pipeline_input_and_generate_option():
    from cxr_diffusion.cli import generate
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    condition_inputs = set(inspect.signature(CXRDiffusionPipeline.make_condition).parameters) - {"self"}
    options = {f"--{name}" for name in inspect.signature(generate).parameters}
    for spec in BRANCH_SPECS:
        assert spec.pipeline_input in condition_inputs
        assert spec.generate_option in options
    assert len({spec.pipeline_input for spec in BRANCH_SPECS}) == len(BRANCH_SPECS)


def test_an_unknown_branch_names_the_known_ones():
    assert branch_spec("elixr").generate_option == "--embedding"
    with pytest.raises(KeyError, match="clip_text, clip_vision or elixr"):
        branch_spec("clip_audio")

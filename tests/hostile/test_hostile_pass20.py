"""Hostile inputs, pass 20: what the fixes of pass 20's findings must keep allowing, and their edges. The
helpers' failing cases are in test_hostile_pass20_fixes.py and test_hostile_pass20_areas.py.
"""

from __future__ import annotations

import pytest

from cxr_diffusion.assets.catalog import needed_assets, overlapping_paths
from cxr_diffusion.config import ParamsError
from cxr_diffusion.profiles import params_with


def _nih_params(nih_root: str, clip: str):
    return params_with({"dataset": {"source": "nih", "nih_root": nih_root}, "clip": {"model": clip}})


def test_an_asset_inside_the_nih_download_is_allowed_where_the_download_is_only_read(tmp_path):
    """NIH at /data and the repository (with its assets and fetch record) at /data/cxr-diffusion is a usual
    layout: fetch and doctor only read the download, so they must not refuse it."""
    params = _nih_params(str(tmp_path / "nih"), str(tmp_path / "nih" / "clip"))
    assert overlapping_paths(params, needed_assets(params, tmp_path), tmp_path) is None


def test_an_asset_inside_the_nih_folder_is_refused_where_the_stand_in_nih_folder_is_written(tmp_path):
    """standins writes the stand-in NIH folder whole: an asset inside it would go with it."""
    params = _nih_params(str(tmp_path / "nih"), str(tmp_path / "nih" / "clip"))
    problem = overlapping_paths(params, needed_assets(params, tmp_path), tmp_path, writes_nih_root=True)
    assert problem is not None and "clip.model" in problem and "dataset.nih_root" in problem and "nest" in problem


def test_the_nih_download_inside_an_asset_folder_is_refused_everywhere(tmp_path):
    """fetch replaces an asset's folder whole: a download inside it would be deleted."""
    params = _nih_params(str(tmp_path / "clip" / "nih"), str(tmp_path / "clip"))
    problem = overlapping_paths(params, needed_assets(params, tmp_path), tmp_path)
    assert problem is not None and "dataset.nih_root" in problem and "nest" in problem


@pytest.mark.parametrize("name", ["داده\u200cها", "देव\u200dनागरी"])
def test_a_joiner_between_two_letters_is_part_of_a_folder_name(name):
    assert params_with({"clip": {"model": f"/data/{name}/clip"}}).clip.model == f"/data/{name}/clip"


@pytest.mark.parametrize("value", ["\u200cclip", "clip\u200d", "a/\u200d/b", "a\u200b b", "a\u00a0b", "a\tb"])
def test_a_joiner_not_between_letters_or_another_unseen_character_is_refused(value):
    with pytest.raises(ParamsError, match="visible text on one line"):
        params_with({"clip": {"model": value}})

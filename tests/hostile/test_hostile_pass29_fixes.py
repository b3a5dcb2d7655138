"""Hostile tests of pass 28's fixes (commit d3b9fb2), run against the frozen copy /tmp/pass29."""

from __future__ import annotations

import pytest

from cxr_diffusion.data.nih import DataError


def _official(n_train: int, val_fraction: float, seed: int = 0):
    """3 test patients (1-3) and ``n_train`` train_val patients (4...), two films each, all kept; the official split."""
    from test_hostile_pass28_fixes import _official as official_with_missing_images

    return official_with_missing_images(n_train, set(), val_fraction, seed)


@pytest.mark.parametrize(("n_train", "val_fraction"), [(2, 0.8), (3, 0.85)], ids=["2_patients_0.8", "3_patients_0.85"])
def test_official_val_leaves_train_a_patient_as_its_docstring_promises(n_train, val_fraction):
    """`_official_val` ("train keeps one") moves every train_val patient to val when val_fraction rounds up to all."""
    try:
        result = _official(n_train, val_fraction)
    except DataError as error:  # a clean refusal naming the setting is a fix too
        assert "val_fraction" in str(error) and "\n" not in str(error), str(error)
        return
    splits = result.table["split"].value_counts().to_dict()
    assert splits.get("train", 0) > 0 and splits.get("val", 0) > 0, \
        f"val_fraction {val_fraction} with {n_train} train_val patients gave {splits}: no train film, no error"

"""Pass 27: probes of the pass-26 fixes (commit 0a74c97). Each test fails on the code as it stood and asserts the
project's rule (one line naming the file/param and the fix; nothing silently accepted; valid input not refused;
advice that can be followed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cxr_diffusion.config import FilterConfig, SplitConfig
from cxr_diffusion.data.filter import filter_metadata
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.errors import UserError
from cxr_diffusion.profiles import profile_section

from conftest import nih_row


# --- 1. an empty val split: refused at params time for val_fraction 0, silently made by the official split ----------

def _patients(n_patients: int, studies: int = 2) -> list[dict]:
    labels = ["No Finding", "Effusion", "Infiltration|Effusion", "Nodule", "Mass", "Atelectasis"]
    return [nih_row(f"{p:08d}_{f:03d}.png", labels[(p + f) % len(labels)], patient=p, follow_up=f)
            for p in range(1, n_patients + 1) for f in range(studies)]


def test_the_official_split_does_not_silently_leave_a_nonzero_val_fraction_without_val_films():
    """Pass 26 refuses val_fraction 0 (an empty val split: plateau and early stopping silently never act, evaluate
    fails after hours), but _official_split takes round(val_fraction * train patients) with no floor, so 0.03 of 15
    train patients gives 0 val films, silently (_random_split gives a non-zero fraction at least one patient).
    Expected: at least one val patient, or a DataError naming filter.split.val_fraction."""
    rows = _patients(20)
    frame = pd.DataFrame(rows)
    test_names = {r["Image Index"] for r in rows if r["Patient ID"] <= 5}
    train_names = {r["Image Index"] for r in rows if r["Patient ID"] > 5}
    config = profile_section(FilterConfig, split=profile_section(SplitConfig, method="official", val_fraction=0.03))
    try:
        result = filter_metadata(frame, set(frame["Image Index"]), config, 0, None,
                                 {"test": test_names, "train_val": train_names})
    except DataError as error:  # refusing the empty split, naming the param, is as good
        assert "val_fraction" in str(error) and "\n" not in str(error), str(error)
        return
    splits = result.table["split"].value_counts().to_dict()
    assert splits.get("val", 0) > 0, f"val_fraction 0.03 > 0 but the official split made no val film: {splits}"


# --- 2. evaluate's advice for too few test images names a param the official split ignores ---------------------------

class _Images:
    def __init__(self, names, classes=("Effusion", "No Finding")):
        self.image_indices, self.classes = list(names), tuple(classes)

    def __len__(self):
        return len(self.image_indices)


def test_evaluate_does_not_tell_an_official_split_to_raise_test_fraction():
    """Pass 26 changed evaluate's "1 test images to evaluate" advice to "raise filter.split.test_fraction", but with
    filter.split.method official test_fraction is ignored (the test split is NIH's test_list.txt): raising it changes
    nothing. Expected: the advice says test_fraction applies to method random (or names the official lists)."""
    from cxr_diffusion.evaluation.evaluate import BranchImages

    test = _Images(["00000001_000.png"])
    images = BranchImages(test=test, val=_Images(["00000002_000.png", "00000003_000.png"]),
                          train=_Images(["00000004_000.png"] * 4), generated=_Images(["00000001_000.png"] * 2))
    with pytest.raises(UserError) as raised:
        images.check_generated_from_test(Path("samples"))
    line = str(raised.value)
    assert "test images" in line, line
    assert "test_fraction" not in line or "random" in line or "official" in line, line

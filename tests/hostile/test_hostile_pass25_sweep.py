"""Pass 25 final sweep (utility stages, params layer, CLIP embedding side): each test failed on the code at filing."""

from __future__ import annotations

import pytest


def _clip_text_rows(tmp_path, tiny_clip_dir, normal_prompt: str):
    from conftest import make_training_data, stage_line
    from cxr_diffusion.conditioning.embed import embed_clip_text
    from cxr_diffusion.profiles import params_with

    make_training_data(tmp_path / "data", n_images=12)  # Effusion and No Finding films
    clip = params_with({"clip": {"model": str(tiny_clip_dir), "normal_prompt": normal_prompt}}).clip
    return stage_line(lambda: embed_clip_text(tmp_path / "data" / "filtered" / "filtered.csv", clip,
                                              tmp_path / "demo", tmp_path / "store"))


@pytest.mark.parametrize("normal_prompt", [
    "chest x-ray showing effusion",      # the very prompt clip.prompt_template makes for Effusion
    "Chest X-ray showing Effusion",      # CLIP lowercases: the same tokens
    "chest x-ray   showing  effusion",   # CLIP collapses spaces: the same tokens
])
def test_a_normal_prompt_that_encodes_as_a_finding_prompt_is_refused(tmp_path, tiny_clip_dir, normal_prompt):
    """`clip.normal_prompt` is checked only for being non-empty, and `prompts_cut_alike` compares prompts only when
    one is longer than the encoder's tokens. A normal prompt equal to the template's prompt for a finding (or equal
    after CLIP's lowercasing and whitespace folding) is embedded silently: No Finding and Effusion films get one
    condition (the same store row, or two rows with identical tokens), and the clip_text branch cannot tell a
    normal film from an effusion. It must be refused naming clip.normal_prompt."""
    line = _clip_text_rows(tmp_path, tiny_clip_dir, normal_prompt)
    assert "normal_prompt" in line, line
    assert not (tmp_path / "store").exists()


def test_every_arm_of_the_utility_chart_has_its_own_colour(tmp_path, monkeypatch):
    """`utility.scaling` takes up to 8 factors, so a branch has up to 12 arms (real, synthetic, real_plus_synthetic,
    synthetic_then_real and 8 synthetic_xk), but `auroc_bars` cycles 8 colours: with scaling [2, 3, 4, 5, 6] the
    ninth arm (synthetic_x6) is drawn and listed in the legend in the real arm's blue, and the figure reads as if
    two arms were one. Each arm must get a colour of its own."""
    from matplotlib.figure import Figure
    from cxr_diffusion.utility.chart import auroc_bars

    entry = {"auroc": 0.7, "ci_low": 0.6, "ci_high": 0.8}
    result = {"per_class": {"Effusion": entry}, "macro": entry}
    arms = {name: result for name in ["real", "synthetic", "synthetic_then_real", "real_plus_synthetic",
                                      *(f"synthetic_x{k}" for k in (2, 3, 4, 5, 6))]}
    drawn = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), original(self, *a, **k))[1])
    auroc_bars(arms, ["Effusion"], "t", tmp_path / "auroc.png")
    axes = drawn[0].axes[0]
    colours = [tuple(container.patches[0].get_facecolor()) for container in axes.containers
               if hasattr(container, "patches")]
    assert len(colours) == len(arms)
    assert len(set(colours)) == len(arms), "two arms share one colour"

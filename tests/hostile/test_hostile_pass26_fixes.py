"""Pass 26: probes of the pass-25 fixes. Each test fails on the code as it stood and asserts the project's rule
(one line naming the file and key, exit code 2; nothing silently accepted; valid input not refused)."""

from __future__ import annotations

import pandas as pd
import pytest

from cxr_diffusion.config import ClipConfig, DemoClipConfig, ParamsError
from cxr_diffusion.diffusion.model_files import write_model_files
from cxr_diffusion.profiles import profile_section

from conftest import cli_refusal as refusal, stage_line
from test_hostile_models import app, edit_config, edit_index, embedding, generate_args, model, runner, saved_model  # noqa: F401
from test_hostile_stores import write_prepared

TINY_DEMO = dict(image_size=16, patch_size=4, width=16, layers=1, heads=2, projection_dim=8, max_length=16, epochs=1,
                 batch_size=4)
MEMBERS = {"No Finding": ("No Finding",), "Effusion": ("Effusion",)}


# --- scheduler_config.json: a null steps_offset / solver_order skips the range check -------------------------------

@pytest.mark.parametrize("changes", [{"steps_offset": None, "timestep_spacing": "leading"}, {"solver_order": None}],
                         ids=["steps_offset", "solver_order"])
def test_a_null_scheduler_range_key_is_one_line(model, embedding, tmp_path, changes):  # noqa: F811
    """SCHEDULER_RANGES are checked with optional=True, so `"steps_offset": null` (pass 25: "0 as saved") and
    `"solver_order": null` pass check_saved_model, and diffusers builds the scheduler with None: `generate` ends in
    `UFuncTypeError ... dtype('O')` (set_timesteps, leading spacing) or `TypeError: can't multiply sequence by
    non-int of type 'NoneType'` (DPMSolverMultistepScheduler.__init__), tracebacks. Expected: one line naming
    scheduler_config.json and the key, exit code 2."""
    edit_config(model, "scheduler", "scheduler_config.json", **changes)
    write_model_files(model)
    key = next(iter(changes))
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert "scheduler_config.json" in line and key in line, line


# --- model_index.json: a bare null entry is let through to diffusers -------------------------------------------------

@pytest.mark.parametrize("component", ["vae", "text_encoder", "image_encoder", "tokenizer", "image_processor"])
def test_a_null_model_index_entry_is_one_line(model, embedding, tmp_path, component):  # noqa: F811
    """_check_model_index treats a component entry of JSON `null` like `[null, null]` (absent) and skips it when the
    branch does not need it, but diffusers' from_pretrained subscripts it: `TypeError: 'NoneType' object is not
    subscriptable`, a traceback. Expected: refused in one line naming model_index.json and the component (or
    loaded as absent), never a traceback."""
    edit_index(model, **{component: None})
    write_model_files(model)
    result = runner.invoke(app, generate_args(model, embedding, tmp_path / "out"))
    if result.exit_code == 0:
        return  # treated as absent and loaded: fine
    line = refusal(result)
    assert "model_index.json" in line and component in line, line


# --- one prompt per finding: the demo CLIP (train_clip) side ---------------------------------------------------------

def test_train_clip_refuses_a_normal_prompt_that_is_a_findings_prompt(tmp_path):
    """Pass 25 refuses clip.normal_prompt written as a finding's prompt only in embed_clip_text. train_demo_clip
    checks prompts with prompts_cut_alike alone, which skips two equal strings, so with normal_prompt "chest x-ray
    showing effusion" it trains the demo CLIP (whose towers serve clip_vision and the ELIXR stand-in) with No Finding
    and Effusion films as one prompt, and reports a No Finding zero-shot score that is 0 for every image. Expected:
    a ParamsError naming clip.normal_prompt before anything is trained or written."""
    from cxr_diffusion.conditioning.demo_clip import train_demo_clip

    prepared = write_prepared(tmp_path / "prepared", {"train": 4, "val": 2})
    clip = profile_section(ClipConfig, normal_prompt="chest x-ray showing effusion",
                           demo=profile_section(DemoClipConfig, **TINY_DEMO))
    line = stage_line(lambda: train_demo_clip(prepared, clip, ["No Finding", "Effusion"], MEMBERS, 0,
                                              tmp_path / "clip"))
    assert "normal_prompt" in line, line
    assert not (tmp_path / "clip").exists()


def test_train_clip_does_not_blame_max_length_for_prompts_alike_but_for_case(tmp_path):
    """Pass 25 made prompts_cut_alike also report prompts alike as a whole (CLIP lowercases, folds spaces), but
    check_prompts_stay_distinct still says "'clip.demo.max_length' is 16; ... are cut to the same tokens; set it to
    at least 8": advice that cannot work (16 is already above 8). normal_prompt "Chest X-ray showing Effusion"
    must be refused naming clip.normal_prompt (as embed_clip_text does), not max_length."""
    from cxr_diffusion.conditioning.demo_clip import train_demo_clip

    prepared = write_prepared(tmp_path / "prepared", {"train": 4, "val": 2})
    clip = profile_section(ClipConfig, normal_prompt="Chest X-ray showing Effusion",
                           demo=profile_section(DemoClipConfig, **TINY_DEMO))
    line = stage_line(lambda: train_demo_clip(prepared, clip, ["No Finding", "Effusion"], MEMBERS, 0,
                                              tmp_path / "clip"))
    assert "normal_prompt" in line, line


# --- one prompt per finding: a valid table refused -------------------------------------------------------------------

def test_a_repeated_no_finding_label_is_not_refused_as_another_finding(tmp_path, tiny_clip_dir):
    """_check_one_prompt_per_finding compares `tuple(sorted(split_labels(labels)))`, so "No Finding|No Finding"
    (kept by the filter: FilmRules.first_broken returns None for it) counts as a finding set other than "No
    Finding", and embed_clip_text raises "params: films of No Finding and of No Finding|No Finding get the same
    prompt ...; change clip.normal_prompt", which no params change can fix: both are No Finding films. Expected:
    the same finding (embedded), or a data error naming the filtered table's line; never a params error."""
    from cxr_diffusion.conditioning.embed import embed_clip_text
    from cxr_diffusion.data.nih import FilmRules

    rules = FilmRules(members=MEMBERS, views=("PA",), allow_other_labels=False, ages=(0, 120))
    assert rules.first_broken(("No Finding", "No Finding"), "PA") is None  # the filter keeps such a film
    pd.DataFrame({"Image Index": ["a.png", "b.png", "c.png"],
                  "Finding Labels": ["No Finding", "No Finding|No Finding", "Effusion"]}).to_csv(
        tmp_path / "filtered.csv", index=False)
    try:
        embed_clip_text(tmp_path / "filtered.csv", profile_section(ClipConfig, model=str(tiny_clip_dir)), tmp_path,
                        tmp_path / "store")
    except ParamsError as error:
        pytest.fail(f"a params error for one finding set: {error}")
    except Exception as error:  # a data refusal is acceptable if it names the table
        assert "filtered.csv" in str(error), error

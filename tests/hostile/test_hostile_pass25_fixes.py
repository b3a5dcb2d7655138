"""Pass 25: probes of the pass-24 fixes. Each test fails on the code as it stood and asserts the project's rule
(one line naming the file and key, exit code 2; nothing silently accepted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cxr_diffusion.diffusion.model_files import write_model_files
from cxr_diffusion.errors import UserError
from cxr_diffusion.sampling.sample import check_saved_model

from conftest import cli_refusal as refusal
from test_hostile_models import app, edit_config, embedding, generate_args, model, runner, saved_model  # noqa: F401
from test_hostile_pass24_models import vision_model  # noqa: F401


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_steps_offset_1_with_as_many_steps_as_timesteps_is_one_line(model, embedding, tmp_path, sampler):  # noqa: F811
    """Pass 24 limited steps_offset to 0-1 ("1 as SD saves it"), but with timestep_spacing "leading" an offset of 1
    and `--steps` equal to num_train_timesteps (allowed: steps <= timesteps) makes the first timestep
    num_train_timesteps itself: `IndexError: index 20 is out of bounds for dimension 0 with size 20`, a traceback.
    (SD's own config: steps_offset 1, leading, 1000 timesteps; `generate --steps 1000` is within the CLI's max.)"""
    edit_config(model, "scheduler", "scheduler_config.json", steps_offset=1, timestep_spacing="leading",
                num_train_timesteps=20)
    write_model_files(model)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out", "--sampler", sampler,
                                                    "--steps", "20")))
    assert "steps" in line, line


def test_an_image_encoder_named_as_a_full_clip_model_has_its_whole_config_checked(vision_model, tiny_clip_dir,  # noqa: F811
                                                                                    tmp_path):
    """_check_clip_towers always checks image_encoder/ as a CLIPVisionModelWithProjection, but model_index.json may
    name any `CLIP\\w+` class and diffusers builds that one. Naming CLIPModel over a full CLIP folder whose
    text_config asks for 3 layers (the weights hold 1): CLIPVisionConfig.from_pretrained reads only vision_config,
    the check passes, and load_pipeline builds a CLIPModel with 2 random text layers, silently (a text_config
    intermediate_size of 10**9 would likewise ask for tens of GB unchecked)."""
    folder = Path(shutil.copytree(vision_model, tmp_path / "model"))
    shutil.rmtree(folder / "image_encoder")
    (folder / "image_encoder").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip_dir / name, folder / "image_encoder" / name)
    config = json.loads((folder / "image_encoder" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (folder / "image_encoder" / "config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    write_model_files(folder)
    with pytest.raises(UserError, match="image_encoder"):
        check_saved_model(folder)

"""Pass 24, final sweep over crafted model folders: each test fails on the code as it stood and asserts the
project's rule (one line naming the file and key, exit code 2; nothing silently accepted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr_diffusion.diffusion.model_files import write_model_files
from cxr_diffusion.errors import UserError
from cxr_diffusion.sampling.sample import check_saved_model, load_pipeline

from conftest import cli_refusal as refusal
from test_hostile_models import (DIM, UNET_WEIGHTS, app, edit_config, embedding, generate_args, model,  # noqa: F401
                                 runner, saved_model)


def test_an_unrecorded_sharded_index_cannot_replace_the_hashed_unet_weights(model):  # noqa: F811
    """`verify_model_files` checks only the files model_files.sha256.json lists ('the loader reads only the files
    ... those are all recorded'), but diffusers prefers `diffusion_pytorch_model.safetensors.index.json` when one
    exists: two unrecorded files (an index and a shard) added beside the intact, hashed weights are what loads."""
    weights = load_file(model / UNET_WEIGHTS)
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    save_file({k: (torch.full_like(v, 0.5) if k == "conv_in.bias" else v) for k, v in weights.items()},
              str(model / "unet" / shard))
    (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard for k in weights}}))
    try:
        pipeline = load_pipeline(model, "ddim", torch.device("cpu"))
    except UserError:
        return  # refused: fine
    assert torch.equal(pipeline.unet.conv_in.bias.detach(), weights["conv_in.bias"]), \
        "unhashed weights were loaded in place of the recorded ones"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_steps_offset_past_the_training_timesteps_is_one_line(model, embedding, tmp_path, sampler):  # noqa: F811
    """steps_offset is allowed 0-1000 whatever num_train_timesteps is: 1000 over 1000 timesteps ended `generate
    --sampler ddim|ddpm` in `IndexError: index 1500 is out of bounds for dimension 0 with size 1000`, a traceback."""
    edit_config(model, "scheduler", "scheduler_config.json", steps_offset=1000, timestep_spacing="leading")
    write_model_files(model)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out", "--sampler", sampler)))
    assert "scheduler_config.json" in line and "steps_offset" in line, line


def test_rescale_betas_zero_snr_must_be_a_boolean(model, embedding, tmp_path):  # noqa: F811
    """rescale_betas_zero_snr is one of the keys the params set, so it skips the defaults check, and nothing checks
    its type: the string "false" is truthy, and the model samples with a zero-terminal-SNR schedule, silently."""
    edit_config(model, "scheduler", "scheduler_config.json", rescale_betas_zero_snr="false")
    write_model_files(model)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert "scheduler_config.json" in line and "rescale_betas_zero_snr" in line, line


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory, tiny_clip_dir) -> Path:
    """A clip_vision model (untrained) saved by the train stage's own saver, with the demo CLIP's vision tower."""
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.condition import ConditionAdapter
    from cxr_diffusion.diffusion.denoiser import Denoiser
    from cxr_diffusion.diffusion.export import save_pipeline
    from cxr_diffusion.diffusion.noise import training_scheduler
    from cxr_diffusion.diffusion.unet import build_unet

    params = tiny_params()
    torch.manual_seed(0)
    denoiser = Denoiser(build_unet(params.train.unet, params.image_size, params.channels, 8),
                        ConditionAdapter(tokens=1, dim=8, out_tokens=params.train.condition_tokens, out_dim=8))
    root = tmp_path_factory.mktemp("pass24-vision")
    return save_pipeline(params, "clip_vision", denoiser, training_scheduler(params.train), root / "model",
                         tiny_clip_dir)


@pytest.mark.parametrize("key", ["num_hidden_layers", "intermediate_size"])
def test_a_saved_image_encoder_config_its_weights_do_not_fill_is_refused(vision_model, tmp_path, key):
    """A saved model's image_encoder/ (and text_encoder/) config is never checked (model_limits checks the UNet,
    adapter, scheduler and VAE; clip_folder's checks apply to `clip.model` only) and _check_every_weight_loaded
    skips the transformers towers: one layer more than the weights loads with a random layer, silently; one more
    intermediate unit is transformers' `RuntimeError: You set ignore_mismatched_sizes to False`, a traceback (and
    10**9 of them asks to allocate tens of GB from a few bytes)."""
    folder = Path(shutil.copytree(vision_model, tmp_path / "model"))
    config = json.loads((folder / "image_encoder" / "config.json").read_text())
    config[key] += 1
    (folder / "image_encoder" / "config.json").write_text(json.dumps(config))
    write_model_files(folder)
    with pytest.raises(UserError, match="image_encoder"):
        load_pipeline(folder, "ddim", torch.device("cpu"))


def test_a_stray_vae_config_does_not_change_what_a_pixel_model_is_checked_against(model):  # noqa: F811
    """check_model_limits reads vae/config.json whenever the file exists, even when model_index.json names no vae
    (diffusers then loads none): the UNet's in_channels are compared with that file's latent_channels instead of
    the model's image channels, so a 4-channel pixel-space UNet in a 3-channel model passes with an unrecorded,
    unused vae/config.json beside it."""
    from test_trainer import tiny_params

    from cxr_diffusion.diffusion.unet import build_unet

    params = tiny_params()
    shutil.rmtree(model / "unet")
    build_unet(params.train.unet, params.image_size, 4, DIM).save_pretrained(model / "unet")
    write_model_files(model)
    (model / "vae").mkdir()
    (model / "vae" / "config.json").write_text(json.dumps({
        "latent_channels": 4, "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 4,
        "block_out_channels": [8], "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}))
    with pytest.raises(UserError, match="vae/config.json: not a file of the saved model"):
        check_saved_model(model)  # an unrecorded file in a component folder: refused as such (pass 24)
    from cxr_diffusion.diffusion.model_limits import check_model_limits

    index = json.loads((model / "model_index.json").read_text())
    with pytest.raises(UserError, match="in_channels 4 is not the model's image channels 3"):
        check_model_limits(model, index)  # and the limits never read a VAE the index does not name

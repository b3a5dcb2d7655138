"""Pass 28 sweep of the training input side (stores, latents, validation loss, run arithmetic): each test failed on
the code at filing (/tmp/pass28) and passes once the problem it names is fixed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_diffusion.errors import UserError

from conftest import make_training_data

TINY_TRAIN = {
    "unet": {"block_out_channels": [8, 16, 16], "cross_attention": [False, False, True], "norm_num_groups": 4,
             "attention_head_dim": 2},
    "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "val_every_steps": 2, "val_images": 4,
    "sample_every_steps": 4, "sample_grid_images": 0, "checkpoint_every_steps": None, "checkpoints_total_limit": 2,
    "ema_half_life_images": 20, "mixed_precision": "no",
}


def tiny_params(**train):
    from cxr_diffusion.profiles import params_with

    return params_with({"image_size": 16, "filter": {"classes": ["Effusion", "No Finding"], "merges": {}},
                        "train": {**TINY_TRAIN, **train}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("pass28-train-data"))


def paths_in(root: Path, data: dict, store: Path | None = None, latents: Path | None = None):
    from cxr_diffusion.diffusion.trainer import TrainPaths

    return TrainPaths(prepared=data["prepared"], store=store or data["store"], clip=None, model_out=root / "model",
                      checkpoints=root / "checkpoints", live=root / "live", latents=latents)


def poison_row(store_dir: Path, image_index: str, value: float = float("nan")) -> None:
    """Overwrite one image's row in a finished store's embeddings.npy (a damaged or hand-edited store)."""
    from cxr_diffusion.conditioning.store import ConditionStore

    row = ConditionStore(store_dir).row_of[image_index]
    values = np.load(store_dir / "embeddings.npy", mmap_mode="r+")
    values[row] = value
    values.flush()
    del values


def first_of(data: dict, split: str) -> str:
    from cxr_diffusion.data.shards import PreparedImages

    return PreparedImages(data["prepared"], split, channels=3).image_indices[0]


# ----------------------------------------------------------------------------- 1. the store writer's finiteness check

def test_store_writer_refuses_values_that_overflow_its_float16_dtype(tmp_path):
    """ConditionStoreWriter checks np.isfinite before casting to the store's dtype: 1e5 is finite in float32 but inf
    in float16 (clip.dtype and elixr.dtype default to float16), so a store of inf conditions is written and trained
    on (elixr.py checks after the cast; embed_clip_text/vision do not). Expected: a StoreError at write."""
    from cxr_diffusion.conditioning.store import ConditionStoreWriter, StoreError

    with pytest.raises(StoreError):
        with ConditionStoreWriter(tmp_path / "store", 1, 2, 3, dtype="float16") as writer:
            writer.write(0, np.full((1, 2, 3), 1e5, dtype=np.float32))
            writer.finish(["a.png"], [0], {"branch": "elixr"})


# ----------------------------------------------------------------------------- 2. a NaN validation loss

def test_a_nan_validation_loss_is_not_kept_as_the_best():
    """record_validation keeps a NaN val/loss as best_val_loss (None -> NaN), after which no loss is ever `<` it: every
    later validation counts as bad, plateau cuts the rate and early stopping ends a run that improves. Expected: a
    non-finite validation loss stops the run with a TrainingError, or is never recorded as the best."""
    from cxr_diffusion.diffusion.checkpoints import TrainingState
    from cxr_diffusion.diffusion.run_plan import TrainingError, record_validation

    train = tiny_params(lr_schedule="plateau", plateau_patience=1, early_stopping_patience=1).train
    state = TrainingState(config_hash="x")
    try:
        record_validation(state, float("nan"), train)
    except TrainingError:
        return
    stop = record_validation(state, 1.0, train)
    assert not stop and state.best_val_loss == 1.0 and state.bad_validations == 0 and state.plateau_scale == 1.0, state


# ----------------------------------------------------------------------------- 3. non-finite conditions reach training

@pytest.mark.parametrize("split, checkpoint_every_steps", [("val", None), ("val", 2), ("train", None)])
def test_a_non_finite_condition_in_the_store_is_refused_before_training(tmp_path, data, split, checkpoint_every_steps):
    """One image's condition row in the store is NaN (the store reader never checks values). In the val split the
    run ends early by early stopping on val/loss NaN, saves a pipeline and writes best_val_loss NaN into metrics.json
    (or, with checkpoints, dies with a CheckpointError blaming the TrainingState's `extra`); in the train split every
    step whose batch holds that image is silently skipped. Expected: one UserError naming the store (and image) as
    non-finite, before a step is taken."""
    from cxr_diffusion.diffusion.trainer import train_branch

    store = tmp_path / "store"
    shutil.copytree(data["store"], store)
    poison_row(store, first_of(data, split))
    params = tiny_params(max_steps=8, early_stopping_patience=1, checkpoint_every_steps=checkpoint_every_steps)
    with pytest.raises(UserError) as raised:
        train_branch(params, "elixr", paths_in(tmp_path / "run", data, store=store))
    message = str(raised.value)
    assert "JSON" not in message and ("store" in message or str(store) in message), message
    assert not (tmp_path / "run" / "model").exists()


def test_non_finite_latents_are_refused_before_training(tmp_path, data):
    """A latent store (encode_latents' output) holding NaN for one training image is read whole into memory by
    LatentImages without a finiteness check: every step whose batch holds that image is skipped (fewer than
    train.max_nonfinite in a row) and the run finishes as if nothing happened. Expected: one UserError naming the
    latent store, rerun encode_latents."""
    from diffusers import AutoencoderKL

    from cxr_diffusion.diffusion.latents import encode_latents
    from cxr_diffusion.diffusion.trainer import train_branch

    vae_dir = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(vae_dir)
    params = tiny_params(space="latent", vae=str(vae_dir), max_steps=8)
    encode_latents(params, data["prepared"], tmp_path / "latents")
    poison_row(tmp_path / "latents", first_of(data, "train"))
    with pytest.raises(UserError) as raised:
        train_branch(params, "elixr", paths_in(tmp_path / "run", data, latents=tmp_path / "latents"))
    assert "latents" in str(raised.value), str(raised.value)


# ----------------------------------------------------------------------------- 4. accumulation beyond an epoch

def test_epochs_are_honoured_when_an_optimizer_step_needs_more_images_than_an_epoch_holds(tmp_path, data):
    """The size check is against one micro-batch (batch_size x processes), but an optimizer step takes
    gradient_accumulation of them: 33 train images, batch 4, accumulation 16 pass it, plan_run gives max(1, 8 // 16)
    = 1 step per epoch, and that step consumes 16 micro-batches, two epochs. `epochs: 1, max_steps: null` trains on
    each image twice (and each step mixes epochs). Expected: refused naming gradient_accumulation (fewer images than
    one optimizer step), or at most the one epoch asked for."""
    from cxr_diffusion.diffusion.trainer import train_branch

    params = tiny_params(gradient_accumulation=16, epochs=1, max_steps=None, checkpoint_every_steps=1,
                         val_every_steps=1)
    try:
        train_branch(params, "elixr", paths_in(tmp_path / "run", data))
    except UserError as error:
        assert "gradient_accumulation" in str(error), str(error)
        return
    state_file = sorted((tmp_path / "run" / "checkpoints").glob("*/state.json"))[-1]
    state = json.loads(state_file.read_text())["state"]
    assert state["epoch"] == 0 or (state["epoch"] == 1 and state["batch_in_epoch"] == 0), state


# ----------------------------------------------------------------------------- 5. a warm-up longer than the run

def test_a_run_shorter_than_its_warmup_reports_the_highest_rate_it_used(tmp_path, data):
    """warmup_steps 50 (the default) with max_steps 4: the run never reaches the `lr` it logs as a param, so a
    `dvc exp run -S lr=...` sweep would compare rates no step used. A warm-up longer than the run stays allowed (the
    rehearsal takes one step of the full UNet), but the summary says the highest rate a step used
    (peak_lr_this_run: lr x 4/50), beside train/lr per step."""
    from cxr_diffusion.diffusion.trainer import train_branch

    params = tiny_params(warmup_steps=50, max_steps=4)
    result = train_branch(params, "elixr", paths_in(tmp_path / "run", data))
    assert result["peak_lr_this_run"] == pytest.approx(result["lr"] * 4 / 50)

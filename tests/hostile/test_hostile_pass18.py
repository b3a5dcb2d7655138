"""Hostile inputs, pass 18: the fixes of passes 15-17 (stage_paths.check_stage_paths, clip_folder.check_clip_tower,
load_vae's revision) probed as a user or a broken environment would. Each case builds its input and runs the real
entry point or the library function a stage calls, asserting the project's rule: one line naming the file or key
and what to do, exit 2, no traceback; nothing of the user's lost; a valid input accepted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import stage_line, write_profile
from test_hostile_pass17 import _one_line, _snapshot, _stage

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- the CLIP tower check: a valid CLIP


def test_a_clip_saved_by_the_pipeline_itself_passes_the_tower_check(tiny_clip_dir):
    """Pass 17's check_clip_tower lists the tensors of a tower built from the config on the meta device and requires
    each name in model.safetensors. With the installed transformers (5.x, which pyproject allows: `>=5.0,<6`), a
    bare CLIPTextModel's state_dict names its tensors `embeddings.token_embedding.weight`, ... while every CLIP
    checkpoint (CLIPModel.save_pretrained, the demo CLIP train_clip writes, openai/clip-vit-*) stores them as
    `text_model.embeddings.token_embedding.weight` (transformers maps the prefix when it loads). So every CLIP is
    refused: 'clip.model: ... could not be loaded as a saved CLIP (the weights lack 20 of the 20 tensors the config
    describes, e.g. embeddings.token_embedding.weight, ...)'. embed_clip_text, and so the clip_text branch, fails on
    the pipeline's own models/clip (tests/test_conditioning.py::test_text_store_encodes_each_distinct_prompt_once
    fails the same way). The check should compare names as transformers loads them (the base-model prefix)."""
    from cxr_diffusion.conditioning.clip import load_text_encoder

    try:
        encoder = load_text_encoder(str(tiny_clip_dir))
    except Exception as error:
        pytest.fail(f"a CLIP saved by save_pretrained was refused: {' '.join(str(error).split())[:300]}")
    assert encoder.model is not None


# ---------------------------------------------------------------------------- an output that is a param-named input


def test_train_clip_keeps_a_pretrained_clip_that_clip_model_names_at_its_out(tmp_path):
    """`clip.model` naming a local pretrained CLIP placed at models/clip (where the pipeline's CLIP lives: the
    natural place for one) and dvc.yaml's `train_clip --out models/clip`: train_demo_clip sees a pretrained CLIP and
    writes its note through atomic_directory(out), which replaces the whole folder: the stage prints `{'trained':
    False, 'clip_model': '.../models/clip'}`, exits 0, and the folder then holds only not_used.json (config, weights,
    tokenizer gone). run_stage's check never sees clip.model: train_clip (and embed_clip_text/vision, train, sample)
    pass no param_reads. Params-named inputs (clip.model, train.vae, evaluate.raddino, evaluate.*_weights,
    filter.include_list) should join the check, naming the param and the option."""
    text = write_profile("tiny", tmp_path / "profile").read_text()
    clip = tmp_path / "models" / "clip"
    clip.mkdir(parents=True)
    (clip / "config.json").write_text('{"model_type": "clip"}')
    (clip / "model.safetensors").write_bytes(b"weights the user downloaded")
    assert "  model: demo " in text
    (tmp_path / "params.yaml").write_text(text.replace("  model: demo ", f"  model: {clip} #", 1))
    before = _snapshot(clip)
    result = _stage("train_clip", "--params", tmp_path / "params.yaml", "--prepared", tmp_path / "prepared",
                    "--out", clip, "--metrics", tmp_path / "clip.json")
    after = _snapshot(clip) if clip.is_dir() else {}
    assert after == before, f"exit {result.returncode}: the pretrained CLIP now holds {sorted(after)}"
    line = _one_line(result, "train_clip")
    assert "clip.model" in line, line


# ---------------------------------------------------------------------------- the stage path check itself


@pytest.mark.parametrize("where", ["output", "input"])
def test_a_symlink_loop_at_a_stage_path_is_one_line(tmp_path, monkeypatch, where):
    """check_stage_paths calls Path.resolve() on every output and input: a path that is a symlink loop (`ln -s out
    out`, a link left pointing at itself) raises 'RuntimeError: Symlink loop from ...' on Python 3.11, which is no
    UserError nor OSError, so run_stage ends in a traceback before the stage starts. It should be one line naming
    the option and the path."""
    from cxr_diffusion.stage_paths import check_stage_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "prepared").mkdir()
    reads = {"--prepared": Path("loop" if where == "input" else "prepared")}
    folders = {"--out": Path("loop" if where == "output" else "out")}
    line = stage_line(lambda: check_stage_paths(reads, folders))
    assert "loop" in line, line


# ---------------------------------------------------------------------------- a hub-id VAE in the cache


@pytest.mark.parametrize("edit", [{"norm_num_groups": 0}, {"layers_per_block": 10 ** 6}], ids=["zero_groups", "huge"])
def test_a_cached_hub_vae_config_is_checked_before_it_is_built(tmp_path, edit):
    """load_vae runs check_vae_folder only when train.vae is a folder; a hub id (the default,
    stabilityai/sd-vae-ft-mse) is built by diffusers from the cached snapshot's config.json unchecked. A snapshot
    config (at the fetched revision) with `norm_num_groups: 0` ends encode_latents / train in 'ZeroDivisionError:
    integer modulo by zero' (a traceback); `layers_per_block: 1000000` builds a million ResNet blocks (here it ran
    past 120 s). The snapshot folder should go through check_vae_folder as a local folder does, naming its
    config.json."""
    from diffusers import AutoencoderKL

    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hf" / "hub" / "models--stabilityai--sd-vae-ft-mse" / "snapshots" / revision
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, **edit}))
    code = ("import sys\nfrom cxr_diffusion.diffusion.latents import load_vae\nfrom cxr_diffusion.errors import "
            "user_error_line\ntry:\n    load_vae('stabilityai/sd-vae-ft-mse', sys.argv[1])\nexcept Exception as e:\n"
            "    line = user_error_line(e)\n    print('LINE' if line else 'BUG', line or f'{type(e).__name__}: {e}')\n"
            "    sys.exit(2 if line else 1)\nprint('LOADED')\n")
    try:
        result = subprocess.run([sys.executable, "-c", code, revision], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HOME": str(tmp_path / "hf"),
                                     "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_vae was still building the cached config {edit} after 30 s")
    assert result.returncode == 2 and "config.json" in result.stdout, (
        f"exit {result.returncode}: {result.stdout.strip()[-300:]}")

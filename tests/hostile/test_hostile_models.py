"""Hostile models, weights and embeddings: each ends as one `error: <where>: <what>` line, exit code 2.

A tiny elixr model is saved once per module by the train stage's own saver; each test corrupts a copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cxr_diffusion.cli import app
from cxr_diffusion.diffusion.condition import ConditionAdapter
from cxr_diffusion.diffusion.model_files import MODEL_FILES, write_model_files
from cxr_diffusion.diffusion.noise import training_scheduler
from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline
from cxr_diffusion.diffusion.denoiser import Denoiser
from cxr_diffusion.diffusion.export import save_pipeline
from cxr_diffusion.diffusion.trainer import TrainPaths
from cxr_diffusion.diffusion.unet import build_unet
from cxr_diffusion.errors import UserError
from cxr_diffusion.evaluation.inception import InceptionSpec, InceptionV3
from cxr_diffusion.sampling.sample import SamplingError, check_generated, generate, load_pipeline

from conftest import cli_refusal as refusal, gradient_image
from test_trainer import tiny_params

runner = CliRunner()
TOKENS, DIM = 4, 8
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """An elixr model (untrained weights) saved by `save_pipeline`, exactly as the train stage saves one."""
    params = tiny_params()
    torch.manual_seed(0)
    unet = build_unet(params.train.unet, params.image_size, params.channels, DIM)
    model = Denoiser(unet, ConditionAdapter(tokens=TOKENS, dim=DIM, out_tokens=TOKENS, out_dim=DIM))
    root = tmp_path_factory.mktemp("hostile-model")
    paths = TrainPaths(prepared=root, store=root, clip=None, model_out=root / "model", checkpoints=root / "checkpoints",
                       live=root / "live")
    return save_pipeline(params, "elixr", model, training_scheduler(params.train), paths.model_out, paths.clip)


@pytest.fixture
def model(saved_model, tmp_path) -> Path:
    """A copy of the saved model for one test to damage."""
    return Path(shutil.copytree(saved_model, tmp_path / "model"))


@pytest.fixture
def embedding(tmp_path) -> Path:
    path = tmp_path / "embedding.npy"
    np.save(path, np.random.default_rng(0).normal(size=(TOKENS, DIM)).astype(np.float32))
    return path


def generate_args(model: Path, embedding: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", str(model), "--embedding", str(embedding), "--num-images", "2", "--steps", "2",
            "--out", str(out), "--device", "cpu", *extra]


def edit_index(model: Path, **changes) -> None:
    index = json.loads((model / "model_index.json").read_text())
    index.update(changes)
    (model / "model_index.json").write_text(json.dumps(index))


# --- weights are checked against the hashes written when the model was saved ---------------------------------


def test_a_saved_model_records_the_size_and_sha256_of_every_file(saved_model):
    recorded = json.loads((saved_model / MODEL_FILES).read_text())["files"]
    on_disk = {p.relative_to(saved_model).as_posix() for p in saved_model.rglob("*") if p.is_file()} - {MODEL_FILES}
    assert set(recorded) == on_disk and UNET_WEIGHTS.as_posix() in recorded
    assert recorded["model_index.json"]["bytes"] == (saved_model / "model_index.json").stat().st_size


def test_generate_works_on_an_untouched_copy_of_the_saved_model(model, embedding, tmp_path):
    result = runner.invoke(app, generate_args(model, embedding, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert len(settings["files"]) == 2 and not list((tmp_path / "out").glob(".*.tmp"))


def flip_4_kb(path: Path) -> Path:
    """Invert 4 KB in the middle of a file, in place (the size stays)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    path.write_bytes(bytes(data))
    return path


def test_generate_refuses_unet_weights_with_4_kb_flipped_since_saving(model, embedding, tmp_path):
    weights = flip_4_kb(model / UNET_WEIGHTS)
    load_file(weights)  # the header is intact: safetensors alone would load these weights
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert f"{weights}: changed since the model was saved" in line and "retrain it (`dvc repro`" in line
    assert not (tmp_path / "out").exists()


def test_generate_refuses_a_truncated_weights_file_naming_its_sizes(model, embedding, tmp_path):
    weights = model / UNET_WEIGHTS
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert f"{weights}: {size // 2} bytes, but {size} were saved (truncated or replaced)" in line


def test_generate_refuses_a_model_folder_without_its_hashes(model, embedding, tmp_path):
    (model / MODEL_FILES).unlink()
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert f"{model}: no {MODEL_FILES}" in line and "weights cannot be checked" in line


def test_generate_refuses_a_model_missing_a_recorded_file(model, embedding, tmp_path):
    (model / "scheduler" / "scheduler_config.json").unlink()
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert f"{model / 'scheduler' / 'scheduler_config.json'}: missing from the saved model" in line


def test_generate_refuses_a_model_folder_too_large_to_be_ours_before_hashing_it(model, embedding, tmp_path,
                                                                               monkeypatch):
    huge = model / "unet" / "more_weights.safetensors"
    with open(huge, "wb") as handle:
        handle.truncate(41 << 30)  # sparse: 41 GiB to read, no disk used
    manifest = json.loads((model / MODEL_FILES).read_text())
    manifest["files"]["unet/more_weights.safetensors"] = {"bytes": 41 << 30, "sha256": "0" * 64}
    (model / MODEL_FILES).write_text(json.dumps(manifest))
    monkeypatch.setattr("cxr_diffusion.diffusion.model_files.sha256_file", lambda path: pytest.fail(f"hashed {path}"))
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert f"error: {model}: its files hold 41.0 GiB, more than the 40 GiB of any model" in line, line


@pytest.mark.parametrize("content, fragment", [
    ("{\"files\": ", "not valid JSON"),
    (json.dumps({"algorithm": "md5", "files": {"model_index.json": {"bytes": 1, "sha256": "0" * 64}}}),
     "expected {\"algorithm\": \"sha256\""),
    (json.dumps({"algorithm": "sha256", "files": {"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}}),
     "lists '../../etc/passwd', which is not a path inside the model folder"),
    (json.dumps({"algorithm": "sha256", "files": {"\u3164/../x": {"bytes": 1, "sha256": "0" * 64}}}),
     "lists '\\u3164/../x', which is not a path"),  # a letter that renders blank is shown escaped
])
def test_a_broken_hash_manifest_is_refused_naming_it(model, embedding, tmp_path, content, fragment):
    (model / MODEL_FILES).write_text(content)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert f"{model / MODEL_FILES}: " in line and fragment in line


def test_the_sample_stage_loader_refuses_changed_weights_as_a_user_error(model):
    flip_4_kb(model / UNET_WEIGHTS)
    with pytest.raises(UserError, match="changed since the model was saved"):
        load_pipeline(model, "dpm++", torch.device("cpu"))


# --- non-finite or saturated generations are refused --------------------------------------------------------


def test_generate_refuses_an_embedding_too_large_for_half_precision(model, tmp_path):
    np.save(tmp_path / "huge.npy", np.full((TOKENS, DIM), 1e30, dtype=np.float32))
    line = refusal(runner.invoke(app, generate_args(model, tmp_path / "huge.npy", tmp_path / "out")))
    assert f"--embedding {tmp_path / 'huge.npy'}: embedding has values up to 1e+30" in line
    assert "overflow the model's half precision" in line and not (tmp_path / "out").exists()


def test_generate_bounds_the_guidance_scale(model, embedding, tmp_path):
    result = runner.invoke(app, generate_args(model, embedding, tmp_path / "out", "--guidance-scale", "1e30"))
    words = " ".join(result.output.replace("│", " ").split())  # typer's error box wraps the line
    assert result.exit_code == 2 and "Invalid value for '--guidance-scale'" in words
    assert "less than or equal to 30" in words and not (tmp_path / "out").exists()


def blown_up(model: Path) -> Path:
    """A model that was saved (hashes match) with output weights scaled far out: its samples collapse."""
    weights = model / UNET_WEIGHTS
    tensors = load_file(weights)
    save_file({n: t * 1e6 if n.startswith("conv_out") else t for n, t in tensors.items()}, weights)
    write_model_files(model)
    return model


def test_generate_refuses_collapsed_generations_naming_the_count_and_causes(model, embedding, tmp_path):
    line = refusal(runner.invoke(app, generate_args(blown_up(model), embedding, tmp_path / "out")))
    assert f"{model}: 2 of 2 generated images are unusable" in line and "with --guidance-scale 3" in line
    assert "a guidance scale too high" in line and "corrupted model weights" in line
    assert not (tmp_path / "out").exists()


def test_the_sample_stage_refuses_collapsed_generations(model):
    pipeline = load_pipeline(blown_up(model), "dpm++", torch.device("cpu"))
    params = tiny_params(sample={"steps": 2, "batch_size": 3})
    expected = rf"^{re.escape(str(model))}: 3 of 3 generated images are unusable .*sample.guidance_scale"
    with pytest.raises(SamplingError, match=expected):
        generate(pipeline, torch.randn(3, TOKENS, DIM), params, seed=0)


def test_nan_and_saturated_images_are_counted_apart():
    images = torch.full((4, 3, 16, 16), 0.5)
    images[0, :, 0, 0] = float("nan")  # one NaN pixel is enough
    images[1] = 0.0  # black
    images[2] = (torch.rand(3, 16, 16) > 0.5).float()  # clamped to both ends
    expected = (r"models/elixr: 3 of 4 generated images are unusable \(1 with NaN/infinite values, "
                r"2 saturated: >= 95% of pixels black or white\)")
    with pytest.raises(SamplingError, match=expected):
        check_generated(images, "models/elixr", "guidance scale 3")


def test_a_chest_xray_with_wide_black_borders_is_not_saturated():
    pixels = gradient_image((64, 64)).astype(np.float32) / 255
    pixels[:, :24] = 0.0  # collimation: over a third of the image black
    pixels[:4] = 1.0  # a burnt-in white label
    check_generated(torch.from_numpy(pixels)[None, None].repeat(2, 3, 1, 1), "models/elixr", "guidance scale 3")


# --- files that used to end in tracebacks -------------------------------------------------------------------


def truncated_safetensors(path: Path) -> Path:
    save_numpy({"embedding": np.zeros((TOKENS, DIM), dtype=np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])
    return path


def test_convert_weights_refuses_a_truncated_safetensors_file(tmp_path):
    source = truncated_safetensors(tmp_path / "inception.safetensors")
    line = refusal(runner.invoke(app, ["convert-weights", str(source), str(tmp_path / "out.safetensors"),
                                       "--flavour", "fid"]))
    assert f"{source}: not a readable safetensors file" in line and "download it again" in line
    assert not (tmp_path / "out.safetensors").exists()


def test_generate_refuses_a_truncated_safetensors_embedding(model, tmp_path):
    source = truncated_safetensors(tmp_path / "embedding.safetensors")
    line = refusal(runner.invoke(app, generate_args(model, source, tmp_path / "out")))
    assert f"--embedding {source}: not a readable safetensors file" in line


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad header", "npz archive", "strings"])
def test_generate_refuses_a_broken_npy_embedding(model, tmp_path, damage):
    path = tmp_path / "embedding.npy"
    np.save(path, np.zeros((TOKENS, DIM), dtype=np.float32))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "bad header":
        path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    elif damage == "npz archive":
        np.savez(tmp_path / "archive.npz", embedding=np.zeros((TOKENS, DIM)))
        (tmp_path / "archive.npz").replace(path)
    else:
        np.save(path, np.array([["a"] * DIM] * TOKENS))
    line = refusal(runner.invoke(app, generate_args(model, path, tmp_path / "out")))
    assert f"--embedding {path}: not a plain numeric .npy array" in line


@pytest.mark.parametrize("content, fragment", [
    ('{"written": 3', "not valid JSON"),
    ("[1, 2]", "expected a JSON dict, found list"),  # checked as every stage checks it (shards.read_manifest)
    ('{"written": 3}', "no 'classes' key"),
    (json.dumps({"written": 3, "image_size": 16, "classes": [], "per_split": [], "rejected": 0,
                 "rejected_by_reason": {}, "shards": []}), "'written' is 3 but its shards hold 0 rows"),
])
def test_inspect_refuses_a_broken_data_manifest_naming_it(tmp_path, content, fragment):
    (tmp_path / "manifest.json").write_text(content)
    line = refusal(runner.invoke(app, ["inspect", str(tmp_path)]))
    assert f"{tmp_path / 'manifest.json'}: {fragment}" in line


@pytest.mark.parametrize("file, content, fragment", [  # checked as the loader checks it: hashes first
    ("model_index.json", "{", "1 bytes, but"),
    ("unet/config.json", '{"sample_size"', "14 bytes, but"),
    ("unet/config.json", '{"sample_size": 16}', "19 bytes, but"),
    ("condition_adapter/config.json", None, "missing"),
])
def test_inspect_refuses_a_broken_model_config_naming_it(model, file, content, fragment):
    if content is None:
        (model / file).unlink()
    else:
        (model / file).write_text(content)
    line = refusal(runner.invoke(app, ["inspect", str(model)]))
    assert f"{model / file}: {fragment}" in line


def test_inspect_refuses_a_fifo_config_instead_of_blocking(model):
    (model / "unet" / "config.json").unlink()
    os.mkfifo(model / "unet" / "config.json")  # reading it would wait forever for a writer
    line = refusal(runner.invoke(app, ["inspect", str(model)]))
    assert f"{model / 'unet' / 'config.json'}: not a regular file" in line


def test_inspect_shows_strings_from_the_folder_without_terminal_sequences(model):
    index = json.loads((model / "model_index.json").read_text())
    index["branch"] = "elixr\x1b]0;pwned\x07\x1b[2J\u202e"
    (model / "model_index.json").write_text(json.dumps(index))
    write_model_files(model)  # a hand-made folder: its record matches, the loader's checks still refuse the branch
    result = runner.invoke(app, ["inspect", str(model)])
    assert "\x1b" not in result.output and "\u202e" not in result.output and "\x07" not in result.output
    assert "branch 'elixr\\x1b]0;pw" in refusal(result)  # refused as generate refuses it, shown escaped


# --- unsafe or broken model folders (hashes rewritten to match, as a hand-made folder would be) ----------------


def pickle_only_unet(model: Path) -> None:
    weights = model / UNET_WEIGHTS
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()


@pytest.mark.parametrize("damage, where, fragment", [
    (lambda m: (m / "model_index.json").write_text("[1]"), "model_index.json", "expected a JSON object, got list"),
    (lambda m: edit_index(m, _class_name="StableDiffusionPipeline"), "model_index.json",
     "a 'StableDiffusionPipeline' pipeline, not a CXRDiffusionPipeline"),
    (lambda m: edit_index(m, unet=["os", "system"]), "model_index.json",
     "component 'unet' is ['os', 'system']; expected ['diffusers', 'UNet2DConditionModel']"),
    (lambda m: edit_index(m, unet="x"), "model_index.json", "component 'unet' is 'x'"),
    (lambda m: edit_index(m, safety_checker=["evil_lib", "Checker"]), "model_index.json",
     "names a component 'safety_checker' that a elixr model does not have"),
    (lambda m: edit_index(m, branch="foo"), "model_index.json", "branch 'foo' is not one of clip_text, clip_vision"),
    (lambda m: edit_index(m, branch="clip_text"), "model_index.json",
     "a clip_text model needs the component 'tokenizer'"),
    (lambda m: shutil.rmtree(m / "unet"), "unet", "missing (model_index.json names the component 'unet')"),
    (pickle_only_unet, "unet", "weights only as pickle (diffusion_pytorch_model.bin); this loader reads"),
    (lambda m: (m / "unet" / "config.json").write_text('{"sample_size"'), "unet/config.json", "not valid JSON"),
    (lambda m: (m / "condition_adapter" / "config.json").write_text(json.dumps(
        {**json.loads((m / "condition_adapter" / "config.json").read_text()), "dim": DIM + 1})), "",
     "not a loadable saved model (Cannot load"),
])
def test_an_unsafe_or_broken_model_folder_is_refused_in_one_line(model, embedding, tmp_path, damage, where, fragment):
    damage(model)
    write_model_files(model)  # past the hash check: what diffusers itself would be handed
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert line.startswith(f"error: {model / where if where else model}: ") and fragment in line


# --- generate: every input and --out checked before sampling --------------------------------------------------


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling fails the test: a refusal must come before it."""
    def sampled(*args, **kwargs):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(CXRDiffusionPipeline, "denoise", sampled)


def edit_config(model: Path, component: str, file: str = "config.json", **changes) -> None:
    path = model / component / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rewrite_header(model: Path, change) -> None:
    """Rewrite the UNet weights' safetensors header as ``change(header)`` returns it; the data stays."""
    import struct

    path = model / UNET_WEIGHTS
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = json.dumps(change(json.loads(data[8:8 + length]))).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def relabel_first_tensor(model: Path, dtype: str) -> None:
    """The UNet weights' first tensor claims another dtype of the same byte size."""
    def relabel(header: dict) -> dict:
        first = next(name for name in header if name != "__metadata__")
        return {**header, first: {**header[first], "dtype": dtype}}

    rewrite_header(model, relabel)


def fill_output_layer(model: Path, value: float, dtype: torch.dtype = torch.float32) -> None:
    """The output layer's weights all ``value`` (-0.0: zero with the sign bit set; 1e-40: a denormal), its bias 0."""
    weights = load_file(model / UNET_WEIGHTS)
    weights["conv_out.weight"] = torch.full_like(weights["conv_out.weight"], value, dtype=dtype)
    weights["conv_out.bias"] = torch.zeros_like(weights["conv_out.bias"])
    save_file(weights, str(model / UNET_WEIGHTS))


def zero_output_layer(model: Path) -> None:
    weights = load_file(model / UNET_WEIGHTS)
    weights["conv_out.weight"] = torch.zeros_like(weights["conv_out.weight"])
    save_file(weights, str(model / UNET_WEIGHTS))


@pytest.mark.parametrize("damage, where, fragment", [
    (lambda m: edit_config(m, "unet", sample_size=10**6), "unet/config.json", "sample_size 1000000 is not a whole number 1-1024"),
    (lambda m: edit_config(m, "unet", sample_size=0), "unet/config.json", "sample_size 0 is not a whole number 1-1024"),
    (lambda m: edit_config(m, "unet", sample_size=-8), "unet/config.json", "sample_size -8 is not a whole number 1-1024"),
    (lambda m: edit_config(m, "unet", block_out_channels=[10**6, 10**6]), "unet/config.json",
     "block_out_channels [1000000, 1000000] is not 1-8 sizes"),
    (lambda m: edit_config(m, "unet", in_channels=True), "unet/config.json", "in_channels True is not a whole number"),
    (lambda m: edit_config(m, "condition_adapter", dim=10**7), "condition_adapter/config.json",
     "dim 10000000 is not a whole number 1-8192"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", num_train_timesteps=10**9),
     "scheduler/scheduler_config.json", "num_train_timesteps 1000000000 is not a whole number 1-100000"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", trained_betas=[2.0] * 1000),
     "scheduler/scheduler_config.json", "trained_betas must be 1000 values inside (0, 1)"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", beta_end=1.5),
     "scheduler/scheduler_config.json", "beta_end 1.5 is not inside (0, 1)"),
    (lambda m: edit_config(m, "unet", transformer_layers_per_block=10**6), "unet/config.json",
     "transformer_layers_per_block 1000000 is not 1-16"),
    (lambda m: edit_config(m, "unet", attention_head_dim=0), "unet/config.json", "attention_head_dim 0 is not 1-512"),
    (lambda m: edit_config(m, "unet", norm_num_groups=0), "unet/config.json", "norm_num_groups 0 is not"),
    (lambda m: edit_config(m, "unet", class_embed_type="identity"), "unet/config.json",
     "class_embed_type is 'identity'; this project builds none or 'projection'"),
    (lambda m: edit_config(m, "unet", class_embed_type="projection", projection_class_embeddings_input_dim=10**9),
     "unet/config.json", "projection_class_embeddings_input_dim 1000000000 is not the condition adapter's output width"),
    (lambda m: edit_config(m, "unet", projection_class_embeddings_input_dim=8), "unet/config.json",
     "class_embed_type is None; this project builds none or 'projection'"),
    (lambda m: edit_config(m, "unet", num_class_embeds=10**9), "unet/config.json",
     "num_class_embeds is 1000000000, not diffusers' default None"),
    (lambda m: edit_config(m, "unet", time_embedding_dim=10**9), "unet/config.json",
     "time_embedding_dim is 1000000000, not diffusers' default None"),
    (lambda m: edit_config(m, "unet", encoder_hid_dim=10**9, encoder_hid_dim_type="text_proj"), "unet/config.json",
     "encoder_hid_dim is 1000000000, not diffusers' default None"),
    (lambda m: edit_config(m, "unet", time_cond_proj_dim=10**9), "unet/config.json",
     "time_cond_proj_dim is 1000000000, not diffusers' default None"),
    (lambda m: edit_config(m, "unet", conv_in_kernel=10**5), "unet/config.json",
     "conv_in_kernel is 100000, not diffusers' default 3"),
    (lambda m: edit_config(m, "unet", conv_out_kernel=4), "unet/config.json", "conv_out_kernel is 4, not diffusers'"),
    (lambda m: edit_config(m, "unet", norm_eps=1e30), "unet/config.json", "norm_eps is 1e+30, not diffusers' default"),
    (lambda m: edit_config(m, "unet", sample_size=[16, 16]), "unet/config.json",
     "sample_size [16, 16] is not a whole number 1-1024"),
    (lambda m: edit_config(m, "unet", out_channels=1), "unet/config.json", "in_channels 3 and out_channels 1 differ"),
    (lambda m: edit_config(m, "unet", in_channels=1, out_channels=1), "unet/config.json",
     "in_channels 1 is not the model's image channels 3 (model_index.json)"),
    (lambda m: edit_config(m, "unet", cross_attention_dim=16), "unet/config.json",
     f"cross_attention_dim 16 is not the condition adapter's output width {DIM}"),
    (lambda m: edit_config(m, "unet", down_block_types=["DownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
     "unet/config.json", "down_block_types ['DownBlock2D', 'SimpleCrossAttnDownBlock2D', 'DownBlock2D'] is not 3 of"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", solver_type="bogus"),
     "scheduler/scheduler_config.json", "solver_type 'bogus' is not one of"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", beta_start=0.9, beta_end=0.0001),
     "scheduler/scheduler_config.json", "beta_start 0.9 is not below beta_end 0.0001"),
    (lambda m: edit_config(m, "unet", cross_attention_dim=None), "unet/config.json",
     "cross_attention_dim None is not a whole number 1-8192"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", use_flow_sigmas=True, flow_shift=1e9),
     "scheduler/scheduler_config.json", "flow_shift is 1000000000.0, not 1.0 as this project saves it"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", lambda_min_clipped=float("nan")),
     "scheduler/scheduler_config.json", "lambda_min_clipped is nan, not -inf as this project saves it"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", use_exponential_sigmas=True),
     "scheduler/scheduler_config.json", "use_exponential_sigmas is True, not False as this project saves it"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", _class_name="LMSDiscreteScheduler"),
     "scheduler/scheduler_config.json", "_class_name 'LMSDiscreteScheduler' is not one of"),
    (lambda m: fill_output_layer(m, -0.0), UNET_WEIGHTS, "output layer (conv_out.weight) is all zeros"),
    (lambda m: fill_output_layer(m, 1e-40), UNET_WEIGHTS, "output layer (conv_out.weight) is all zeros"),
    (lambda m: fill_output_layer(m, -0.0, torch.bfloat16), UNET_WEIGHTS, "output layer (conv_out.weight) is all zeros"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", beta_schedule="bogus"),
     "scheduler/scheduler_config.json", "beta_schedule 'bogus' is not one of"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", timestep_spacing="bogus"),
     "scheduler/scheduler_config.json", "timestep_spacing 'bogus' is not one of"),
    (lambda m: edit_config(m, "scheduler", "scheduler_config.json", solver_order=0),
     "scheduler/scheduler_config.json", "solver_order 0 is not a whole number 1-3"),
    (lambda m: relabel_first_tensor(m, "I32"), UNET_WEIGHTS, "is 'I32', not floating point"),
    (lambda m: rewrite_header(m, lambda header: []), UNET_WEIGHTS, "not a safetensors file (unreadable header)"),
    (lambda m: rewrite_header(m, lambda header: {**header, "conv_out.weight": {
        **header["conv_out.weight"], "data_offsets": ["a", "b"]}}), UNET_WEIGHTS, "has data_offsets ['a', 'b']"),
    (lambda m: rewrite_header(m, lambda header: {**header, "conv_out.weight": {
        **header["conv_out.weight"], "data_offsets": [0, 1, 2]}}), UNET_WEIGHTS, "has data_offsets [0, 1, 2]"),
    (zero_output_layer, UNET_WEIGHTS, "output layer (conv_out.weight) is all zeros"),
])
def test_a_model_config_out_of_range_is_refused_before_anything_is_allocated(model, embedding, tmp_path, no_sampling,
                                                                             damage, where, fragment):
    damage(model)
    write_model_files(model)  # a hand-made folder carries its own hashes
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert line.startswith(f"error: {model / where}: ") and fragment in line, line


def add_vae(model: Path, **changes) -> None:
    """A tiny AutoencoderKL (latent channels = the UNet's) saved as the model's vae/ component, then ``changes``."""
    from diffusers import AutoencoderKL

    config = {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4, "layers_per_block": 1,
              "latent_channels": 3}
    AutoencoderKL(**config).save_pretrained(model / "vae")
    edit_index(model, vae=["diffusers", "AutoencoderKL"])
    edit_config(model, "vae", **changes)


@pytest.mark.parametrize("changes, fragment", [
    ({"norm_num_groups": 0}, "norm_num_groups 0 is not a whole number 1-128"),
    ({"block_out_channels": [10**8, 10**8]}, "block_out_channels [100000000, 100000000] is not 1-8 sizes"),
    ({"layers_per_block": 10**5}, "layers_per_block 100000 is not a whole number 1-16"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"scaling_factor": float("nan")}, "scaling_factor nan is not a finite number"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention is False, not diffusers' default True"),
])
def test_a_vae_config_out_of_range_is_refused_before_it_is_built(model, embedding, tmp_path, no_sampling, changes,
                                                                  fragment):
    add_vae(model, **changes)
    write_model_files(model)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert line.startswith(f"error: {model / 'vae' / 'config.json'}: ") and fragment in line, line


def test_generate_refuses_more_steps_than_the_model_has_timesteps(model, embedding, tmp_path, no_sampling):
    edit_config(model, "scheduler", "scheduler_config.json", num_train_timesteps=4, trained_betas=None)
    write_model_files(model)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out", "--steps", "5")))
    assert line == f"error: --steps 5: more than the 4 timesteps {model} was trained with; give at most 4"


def saved_embedding(path: Path, array: np.ndarray) -> Path:
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        save_numpy({"embedding": array}, str(path))
    return path


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_generate_refuses_an_embedding_with_no_conditions(model, tmp_path, no_sampling, suffix):
    path = saved_embedding(tmp_path / f"empty{suffix}", np.zeros((0, TOKENS, DIM), dtype=np.float32))
    line = refusal(runner.invoke(app, generate_args(model, path, tmp_path / "out")))
    assert line == (f"error: --embedding {path}: embedding holds no conditions (shape (0, {TOKENS}, {DIM})); give at "
                    f"least one ({TOKENS}, {DIM}) (tokens, dim) embedding")


@pytest.mark.parametrize("rows, per_row", [(300, 1), (129, 2)])
def test_generate_caps_the_images_of_a_batched_embedding(model, tmp_path, no_sampling, rows, per_row):
    path = saved_embedding(tmp_path / "many.npy", np.zeros((rows, TOKENS, DIM), dtype=np.float32))
    args = generate_args(model, path, tmp_path / "out")
    args[args.index("--num-images") + 1] = str(per_row)
    line = refusal(runner.invoke(app, args))
    assert line == (f"error: --embedding {path}: {rows} embeddings x --num-images {per_row} = {rows * per_row} "
                    f"images, more than the 256 of one run; split the file or lower --num-images")


def test_generate_samples_every_row_of_a_batched_embedding(model, tmp_path):
    path = saved_embedding(tmp_path / "three.npy", np.random.default_rng(0).normal(size=(3, TOKENS, DIM)).astype(np.float32))
    result = runner.invoke(app, generate_args(model, path, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "out" / "settings.json").read_text())["files"]) == 6


@pytest.mark.parametrize("suffix, dtype", [(".npy", np.bool_), (".npy", np.int32), (".safetensors", np.bool_),
                                           (".safetensors", np.int64)])
def test_generate_refuses_an_embedding_that_is_not_floating_point(model, tmp_path, no_sampling, suffix, dtype):
    path = saved_embedding(tmp_path / f"embedding{suffix}", np.ones((TOKENS, DIM), dtype=dtype))
    line = refusal(runner.invoke(app, generate_args(model, path, tmp_path / "out")))
    name = np.dtype(dtype).name
    if suffix == ".npy":
        assert line == (f"error: --embedding {path}: not a plain numeric .npy array of floats (dtype {name}); save a "
                        f"float array with numpy.save")
    else:
        assert line == (f"error: --embedding {path}: tensor 'embedding' is {name}; an embedding is floating point "
                        f"(save it as float32)")


@pytest.mark.parametrize("embedding", [torch.ones(TOKENS, DIM, dtype=torch.bool), np.ones((1, TOKENS, DIM), dtype=np.int64)],
                         ids=["bool tensor", "int64 array"])
def test_the_pipeline_refuses_an_embedding_that_is_not_floating_point(saved_model, embedding):
    pipeline = load_pipeline(saved_model, "dpm++", torch.device("cpu"))
    name = "bool" if isinstance(embedding, torch.Tensor) else "int64"
    with pytest.raises(ValueError, match=f"^embedding has dtype {name}; embeddings are floating point$"):
        pipeline.make_condition(embedding=embedding)


def out_that_is(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A bad --out of one ``kind`` and the start of the refusal that names it."""
    if kind == "a file":
        (tmp_path / "taken").write_text("x")
        return tmp_path / "taken", f"--out {tmp_path / 'taken'} is a file, not a folder"
    if kind == "below a file":
        (tmp_path / "taken").write_text("x")
        return tmp_path / "taken" / "out", f"--out {tmp_path / 'taken' / 'out'}: {tmp_path / 'taken'} is a file"
    if kind == "not empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "elixr_0_000.png").write_bytes(b"an earlier run's image")
        return tmp_path / "out", f"--out {tmp_path / 'out'} already holds files"
    if kind == "a broken link":
        (tmp_path / "link").symlink_to(tmp_path / "gone")
        return tmp_path / "link", f"--out {tmp_path / 'link'} is a broken link"
    if kind == "a name too long":
        return tmp_path / ("x" * 300), f"--out {tmp_path / ('x' * 300)}: cannot write there (File name too long)"
    return Path("/sys/cxr-out"), "--out /sys/cxr-out: cannot write there (Permission denied)"


@pytest.mark.parametrize("kind", ["a file", "below a file", "not empty", "a broken link", "a name too long",
                                  pytest.param("where no one may write", marks=pytest.mark.skipif(
                                      not Path("/sys/kernel").is_dir(), reason="sysfs refuses new files, even root's"))])
def test_generate_refuses_a_bad_out_before_sampling(model, embedding, tmp_path, no_sampling, kind):
    out, start = out_that_is(kind, tmp_path)
    line = refusal(runner.invoke(app, generate_args(model, embedding, out)))
    assert line.startswith(f"error: {start}")
    if kind == "not empty":
        assert (out / "elixr_0_000.png").read_bytes() == b"an earlier run's image"


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_generate_bounds_the_seed_as_the_params_do(model, embedding, tmp_path, no_sampling, seed):
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out", "--seed", str(seed))))
    assert line == f"error: --seed {seed}: must be at least 0 and below 2**32 (4294967296), as the params' seed"


@pytest.mark.parametrize("device", ["meta", "cuda:99", "gpu", "cpu:0"])
def test_generate_refuses_a_device_this_machine_lacks(model, embedding, tmp_path, no_sampling, device):
    args = generate_args(model, embedding, tmp_path / "out")
    args[args.index("--device") + 1] = device
    line = refusal(runner.invoke(app, args))
    assert line.startswith(f"error: --device {device!r} is not a device of this machine; use one of: auto, cpu")


# --- convert-weights: finite weights only ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """Random Inception-v3 weights of the torchvision flavour, as the converter expects them."""
    torch.manual_seed(0)
    return {k: v.float() for k, v in InceptionV3(InceptionSpec("torchvision", "pool")).state_dict().items()}


@pytest.mark.parametrize("tensor, value", [("fc.weight", float("nan")), ("Conv2d_1a_3x3.conv.weight", float("inf")),
                                           ("Mixed_7c.branch_pool.bn.running_var", float("-inf"))])
def test_convert_weights_refuses_non_finite_weights_naming_the_tensor(inception_state, tmp_path, tensor, value):
    state = dict(inception_state)
    state[tensor] = state[tensor].clone()
    state[tensor].view(-1)[:3] = value
    source = tmp_path / "inception.safetensors"
    save_file(state, str(source))
    target = tmp_path / "converted.safetensors"
    line = refusal(runner.invoke(app, ["convert-weights", str(source), str(target), "--flavour", "torchvision"]))
    assert line == (f"error: {source}: tensor '{tensor}' has 3 NaN or infinite values; a published checkpoint has "
                    f"none: download it again")
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["inception.safetensors"]


# --- safetensors files get the mode of a plain write ------------------------------------------------------------


def plain_mode(folder: Path) -> int:
    """The mode ``open(path, "w")`` gives a new file in ``folder``."""
    probe = folder / "plain-write"
    probe.write_text("")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def test_every_file_of_a_saved_model_has_the_mode_of_a_plain_write(saved_model):
    modes = {p.relative_to(saved_model).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in saved_model.rglob("*") if p.is_file()}
    assert UNET_WEIGHTS.as_posix() in modes
    assert modes == dict.fromkeys(modes, plain_mode(saved_model))


def test_convert_weights_writes_a_file_with_the_mode_of_a_plain_write(inception_state, tmp_path):
    source = tmp_path / "inception.safetensors"
    save_file(inception_state, str(source))
    target = tmp_path / "converted.safetensors"
    result = runner.invoke(app, ["convert-weights", str(source), str(target), "--flavour", "torchvision"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(target.stat().st_mode) == plain_mode(tmp_path)


def test_a_training_checkpoint_has_the_mode_of_a_plain_write(tmp_path):
    from cxr_diffusion.diffusion.checkpoints import TrainingState, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = save_checkpoint(tmp_path, TrainingState(step=1, config_hash="x"), {"model": model}, optimizer,
                            {"torch": torch.get_rng_state()}, 1, {"ema": {"0": torch.zeros(2)}}, log=lambda line: None)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in saved.iterdir()}
    assert "optimizer.safetensors" in modes and "ema.safetensors" in modes
    assert modes == dict.fromkeys(modes, plain_mode(tmp_path))


def test_the_evaluator_is_saved_with_the_mode_of_a_plain_write(tmp_path):
    from cxr_diffusion.evaluation.evaluator import ClassifierSpec, CXRClassifier, save_classifier

    save_classifier(CXRClassifier(ClassifierSpec(("Effusion",), 4, 8, 16)), tmp_path / "evaluator", {})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "evaluator").iterdir()}
    assert modes == dict.fromkeys(modes, plain_mode(tmp_path))


@pytest.mark.parametrize("damage, fragment", [
    (lambda state: {k: torch.zeros_like(v) for k, v in state.items()}, "convolution weights are all zeros"),
    (lambda state: {**state, "fc.weight": state["fc.weight"].to(torch.int8)}, "not floating point"),
    (lambda state: {**state, "fc.weight": state["fc.weight"].to(torch.complex64)}, "not floating point"),
])
def test_convert_weights_refuses_emptied_or_non_float_weights(inception_state, tmp_path, damage, fragment):
    """All-zero, int8 and complex weights were once written as "checked"."""
    source = tmp_path / "inception.safetensors"
    save_file(damage(dict(inception_state)), str(source))
    target = tmp_path / "converted.safetensors"
    line = refusal(runner.invoke(app, ["convert-weights", str(source), str(target), "--flavour", "torchvision"]))
    assert line.startswith(f"error: {source}: ") and fragment in line, line
    assert not target.exists()


def test_convert_weights_keeps_the_standin_label(inception_state, tmp_path):
    """A stand-in converted once lost its label and passed for the published weights."""
    from cxr_diffusion.assets.standin_marker import METADATA_KEY, read_standin

    source = tmp_path / "inception.safetensors"
    save_file(dict(inception_state), str(source), metadata={METADATA_KEY: json.dumps({"standin": True, "build": "b"})})
    target = tmp_path / "converted.safetensors"
    assert runner.invoke(app, ["convert-weights", str(source), str(target), "--flavour", "torchvision"]).exit_code == 0
    assert read_standin(target)["standin"] is True


def test_a_scheduler_class_this_project_never_saves_is_refused(model, embedding, tmp_path, no_sampling):
    edit_index(model, scheduler=["diffusers", "VQDiffusionScheduler"])
    write_model_files(model)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert "component 'scheduler' is ['diffusers', 'VQDiffusionScheduler']" in line, line


def test_a_unet_missing_a_tensor_is_refused_in_one_line(model, embedding, tmp_path, no_sampling):
    weights = load_file(model / UNET_WEIGHTS)
    del weights["conv_out.bias"]
    save_file(weights, str(model / UNET_WEIGHTS))
    write_model_files(model)
    line = refusal(runner.invoke(app, generate_args(model, embedding, tmp_path / "out")))
    assert line.startswith(f"error: {model}: not a loadable saved model") and "conv_out.bias" in line, line


# ----------------------------------------------------------------------------- pass 9: a timestep-conditioned model

@pytest.fixture(scope="module")
def saved_timestep_model(tmp_path_factory) -> Path:
    """An elixr model built with train.unet.timestep_condition: true (a projection class embedding)."""
    from test_trainer import TINY_TRAIN

    params = tiny_params(train={"unet": {**TINY_TRAIN["unet"], "timestep_condition": True}})
    torch.manual_seed(0)
    unet = build_unet(params.train.unet, params.image_size, params.channels, DIM)
    denoiser = Denoiser(unet, ConditionAdapter(tokens=TOKENS, dim=DIM, out_tokens=TOKENS, out_dim=DIM))
    return save_pipeline(params, "elixr", denoiser, training_scheduler(params.train),
                         tmp_path_factory.mktemp("timestep-model") / "model", None)


@pytest.fixture
def timestep_model(saved_timestep_model, tmp_path) -> Path:
    return Path(shutil.copytree(saved_timestep_model, tmp_path / "timestep_model"))


def hashed_refusal(model_dir: Path, embedding: Path, tmp_path: Path) -> str:
    write_model_files(model_dir)  # past the hash check: what diffusers itself would be handed
    return refusal(runner.invoke(app, generate_args(model_dir, embedding, tmp_path / "out")))


def test_a_projection_width_written_as_a_float_is_refused(timestep_model, embedding, tmp_path, no_sampling):
    """8.0 == 8 in Python, but diffusers builds nn.Linear(8.0, ...) and generate ended in a TypeError."""
    edit_config(timestep_model, "unet", projection_class_embeddings_input_dim=float(DIM))
    line = hashed_refusal(timestep_model, embedding, tmp_path)
    assert f"projection_class_embeddings_input_dim {float(DIM)} is not the condition adapter's output width" in line


def test_a_timestep_model_whose_config_lost_its_class_embedding_is_refused(timestep_model, embedding, tmp_path,
                                                                           no_sampling):
    """diffusers dropped the class embedding's tensors with a warning, and the model sampled without the
    condition it was trained with."""
    edit_config(timestep_model, "unet", class_embed_type=None, projection_class_embeddings_input_dim=None)
    line = hashed_refusal(timestep_model, embedding, tmp_path)
    assert "unet weights hold 4 tensors its config has no place for, e.g. 'class_embedding." in line


def test_a_plain_model_given_extra_tensors_is_refused(model, embedding, tmp_path, no_sampling):
    weights = load_file(model / UNET_WEIGHTS)
    weights["class_embedding.linear_1.weight"] = torch.randn(32, DIM)
    save_file(weights, str(model / UNET_WEIGHTS))
    assert "tensors its config has no place for, e.g. 'class_embedding.linear_1.weight'" in hashed_refusal(
        model, embedding, tmp_path)


def test_an_untouched_timestep_model_generates(timestep_model, embedding, tmp_path):
    result = runner.invoke(app, generate_args(timestep_model, embedding, tmp_path / "out"))
    assert result.exit_code == 0, result.output

"""The shared trainer on a tiny dataset: resume, corrupt checkpoints, non-finite losses, lr override."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion import denoiser as denoiser_module
from cxr_diffusion.diffusion import live_log
from cxr_diffusion.diffusion import loss as loss_module
from cxr_diffusion.diffusion import trainer as trainer_module
from cxr_diffusion.diffusion.checkpoints import TrainingState, list_checkpoints
from cxr_diffusion.diffusion.resume import maths_settings
from cxr_diffusion.diffusion.run_plan import TrainingError
from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

from conftest import REPO, make_training_data

TINY_TRAIN = {
    "unet": {"block_out_channels": [8, 16, 16], "cross_attention": [False, False, True], "norm_num_groups": 4,
             "attention_head_dim": 2},
    "batch_size": 4, "max_steps": 6, "warmup_steps": 1, "val_every_steps": 3, "val_images": 4,
    "sample_every_steps": 6, "checkpoint_every_steps": 3, "checkpoints_total_limit": 2,
    "ema_half_life_images": 20, "mixed_precision": "no",
}


def tiny_params(**overrides):
    train = {**TINY_TRAIN, **overrides.pop("train", {})}
    return params_with({"image_size": 16, "filter": {"classes": ["Effusion", "No Finding"], "merges": {}},
                             "train": train, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("train-data"))


def paths_in(root: Path, data: dict) -> TrainPaths:
    return TrainPaths(prepared=data["prepared"], store=data["store"], clip=None, model_out=root / "model",
                      checkpoints=root / "checkpoints", live=root / "live")


def final_unet(root: Path) -> dict:
    return load_file(root / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("uninterrupted")
    result = train_branch(tiny_params(), "elixr", paths_in(root, data))
    return root, result


def test_training_saves_a_pipeline_and_logs(uninterrupted):
    root, result = uninterrupted
    assert result["steps"] == 6
    assert (root / "model" / "model_index.json").is_file()
    metrics = json.loads((root / "live" / "metrics.json").read_text())
    assert {"loss", "conditioning_gap", "loss_shuffled_condition"} <= set(metrics["val"])
    assert metrics["final"]["steps"] == 6 and "loss" in metrics["train"]
    assert (root / "live" / "plots" / "images" / "samples.png").is_file()


def test_saved_pipeline_loads_in_a_new_process_and_generates(uninterrupted):
    root, _ = uninterrupted
    code = (
        "import sys, torch; from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline;"
        "p = CXRDiffusionPipeline.from_pretrained(sys.argv[1]);"
        "out = p(embedding=torch.randn(4, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(0), progress=False);"
        "print(out.images[0].size)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(root / "model")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(16, 16)")


def test_pipeline_rejects_the_wrong_kind_of_condition(uninterrupted):
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    pipeline = CXRDiffusionPipeline.from_pretrained(uninterrupted[0] / "model")
    with pytest.raises(ValueError, match="elixr model: pass `embedding="):
        pipeline(prompt="chest x-ray showing effusion")
    with pytest.raises(ValueError, match=r"embedding must be \(4, 8\)"):
        pipeline(embedding=torch.randn(32, 768))


def test_killed_run_resumes_to_the_same_weights(tmp_path, data, uninterrupted):
    # Run in a child process, SIGKILL it right after its first checkpoint, rerun: same final weights.
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"image_size": 16, "filter": {"classes": ["Effusion", "No Finding"], "merges": {}},
                                       "train": TINY_TRAIN}))
    code = (
        "import json, sys; from pathlib import Path; from cxr_diffusion.profiles import params_with;"
        "from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch;"
        "root, prepared, store = map(Path, sys.argv[1:4]);"
        "p = params_with(json.loads((root / 'params.json').read_text()));"
        "train_branch(p, 'elixr', TrainPaths(prepared, store, None, root / 'model', root / 'checkpoints', root / 'live'))"
    )
    args = [sys.executable, "-c", code, str(tmp_path), str(data["prepared"]), str(data["store"])]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if list_checkpoints(tmp_path / "checkpoints"):
            break
        time.sleep(0.01)
    assert process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "model").exists()
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert_same_weights(final_unet(tmp_path), final_unet(uninterrupted[0]))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, data, uninterrupted, capsys):
    paths = paths_in(tmp_path, data)
    train_branch(tiny_params(), "elixr", paths)
    newest = list_checkpoints(paths.checkpoints)[-1]
    target = newest / "denoiser.safetensors"
    target.write_bytes(target.read_bytes()[:100])  # truncated
    result = train_branch(tiny_params(), "elixr", paths)
    out = capsys.readouterr().out
    assert newest.name in out and "resuming from" in out and "step-00000003" in out
    assert result["steps"] == 6
    assert_same_weights(final_unet(tmp_path), final_unet(uninterrupted[0]))


def test_checkpoint_from_another_config_is_not_resumed(tmp_path, data, capsys):
    paths = paths_in(tmp_path, data)
    train_branch(tiny_params(train={"max_steps": 3}), "elixr", paths)
    capsys.readouterr()
    train_branch(tiny_params(train={"max_steps": 3, "offset_noise": 0.1}), "elixr", paths)
    out = capsys.readouterr().out
    assert "starting from scratch" in out and "resuming from" not in out


@pytest.mark.parametrize("change", [{"num_workers": 1}, {"sample_every_steps": 3}, {"checkpoint_every_steps": 2},
                                    {"val_every_steps": 2}, {"mixed_precision": "auto"}, {"compile": "never"}])
def test_settings_that_do_not_change_the_weights_keep_the_resume_hash(change):
    assert maths_settings(tiny_params(train=change), "elixr") == maths_settings(tiny_params(), "elixr")


@pytest.mark.parametrize("change", [{"batch_size": 2}, {"ema_half_life_images": 40}, {"max_steps": 7},
                                    {"offset_noise": 0.1}])
def test_settings_that_change_the_weights_change_the_resume_hash(change):
    assert maths_settings(tiny_params(train=change), "elixr") != maths_settings(tiny_params(), "elixr")


def test_validation_settings_count_when_the_validation_loss_steers_the_run():
    plateau = {"lr_schedule": "plateau"}
    assert (maths_settings(tiny_params(train={**plateau, "val_every_steps": 2}), "elixr")
            != maths_settings(tiny_params(train=plateau), "elixr"))


def test_a_run_resumes_across_a_change_that_leaves_the_weights_alone(tmp_path, data, uninterrupted, capsys):
    paths = paths_in(tmp_path, data)
    train_branch(tiny_params(), "elixr", paths)
    shutil.rmtree(list_checkpoints(paths.checkpoints)[-1])  # as if killed after the step-3 checkpoint
    capsys.readouterr()
    train_branch(tiny_params(train={"sample_every_steps": 3, "num_workers": 1}), "elixr", paths)
    assert "resuming from" in capsys.readouterr().out
    assert_same_weights(final_unet(tmp_path), final_unet(uninterrupted[0]))


def test_a_run_that_fails_before_its_first_step_leaves_the_last_logs_as_they_were(tmp_path, data, uninterrupted,
                                                                                monkeypatch):
    live = tmp_path / "live"
    shutil.copytree(uninterrupted[0] / "live", live)
    before = {p.relative_to(live): p.read_bytes() for p in live.rglob("*") if p.is_file()}

    def out_of_memory(*args, **kwargs):
        raise TrainingError("out of memory (simulated)")

    monkeypatch.setattr(trainer_module, "training_loss", out_of_memory)
    with pytest.raises(TrainingError, match="simulated"):
        train_branch(tiny_params(), "elixr", paths_in(tmp_path, data))
    assert {p.relative_to(live): p.read_bytes() for p in live.rglob("*") if p.is_file()} == before


def test_non_finite_losses_stop_with_a_clear_error_and_keep_the_last_checkpoint(tmp_path, data, monkeypatch):
    real_loss = loss_module.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 and kwargs.get("drop") is not None else loss

    monkeypatch.setattr(loss_module, "diffusion_loss", poisoned)
    paths = paths_in(tmp_path, data)
    with pytest.raises(TrainingError, match="consecutive non-finite losses.*last good checkpoint"):
        train_branch(tiny_params(train={"max_steps": 20, "max_nonfinite": 3}), "elixr", paths)
    checkpoints = list_checkpoints(paths.checkpoints)
    assert [c.name for c in checkpoints] == ["step-00000003"]


def test_top_level_lr_overrides_every_branch(tmp_path, data):
    result = train_branch(tiny_params(lr=1e-05, train={"max_steps": 2, "lr_schedule": "constant"}), "elixr",
                          paths_in(tmp_path, data))
    assert result["lr"] == pytest.approx(1e-5)
    logged = (tmp_path / "live" / "plots" / "metrics" / "train" / "lr.tsv").read_text().splitlines()[1:]
    assert [float(line.split("\t")[-1]) for line in logged] == pytest.approx([1e-5, 1e-5])


def test_branch_rate_is_used_without_override():
    params = tiny_params(train={"lr": {"clip_text": 1e-4, "clip_vision": 2e-4, "elixr": 1e-5}})
    assert [params.learning_rate(b) for b in ("clip_text", "clip_vision", "elixr")] == [1e-4, 2e-4, 1e-5]


DRIVER = """
import json, sys
from pathlib import Path
from cxr_diffusion.profiles import params_with
from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch
root, prepared, store = map(Path, sys.argv[1:4])
params = params_with(json.loads((root / "params.json").read_text()))
result = train_branch(params, "elixr", TrainPaths(prepared, store, None, root / "model", root / "checkpoints", root / "live"))
print("RESULT " + json.dumps(result))
"""


def run_driver(root: Path, data: dict, train: dict, processes: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.json").write_text(json.dumps({"image_size": 16, "filter": {"classes": ["Effusion", "No Finding"],
                                                  "merges": {}}, "train": {**TINY_TRAIN, **train}}))
    (root / "driver.py").write_text(DRIVER)
    # The project's own accelerate config, as the train stage uses it: two processes, gloo on a CPU machine.
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                str(REPO / "accelerate" / "two-processes.yaml"), "--main_process_port", str(29500 + os.getpid() % 1000),
                ] if processes == 2 else [sys.executable]
    completed = subprocess.run(launcher + [str(root / "driver.py"), str(root), str(data["prepared"]), str(data["store"])],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = [json.loads(line[7:]) for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == processes
    return results[0]


def test_cpu_threads_are_an_equal_share_of_the_available_cores(monkeypatch):
    from cxr_diffusion.diffusion import cpu_threads

    monkeypatch.setattr(cpu_threads, "available_cores", lambda: 8)
    assert [cpu_threads.cpu_threads_per_process(n) for n in (1, 2, 3, 16, 0)] == [8, 4, 2, 1, 8]


def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tmp_path, data):
    single = run_driver(tmp_path / "one", data, {"batch_size": 8}, processes=1)
    double = run_driver(tmp_path / "two", data, {"batch_size": 4}, processes=2)
    assert double["images_seen"] == single["images_seen"] == 6 * 8
    assert double["best_val_loss"] == pytest.approx(single["best_val_loss"], rel=0.1)
    assert (tmp_path / "two" / "model" / "model_index.json").is_file()


def test_latent_space_trains_on_precomputed_vae_latents_and_decodes(tmp_path, data):
    from diffusers import AutoencoderKL

    from cxr_diffusion.conditioning.store import ConditionStore
    from cxr_diffusion.diffusion.latents import encode_latents
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline

    vae_dir = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(vae_dir)
    params = tiny_params(train={"space": "latent", "vae": str(vae_dir), "max_steps": 2})
    encoded = encode_latents(params, data["prepared"], tmp_path / "latents")
    assert encoded["latent_shape"] == [4, 8, 8]
    assert ConditionStore(tmp_path / "latents").shape[1:] == (4, 64)
    paths = TrainPaths(data["prepared"], data["store"], None, tmp_path / "model", tmp_path / "checkpoints",
                       tmp_path / "live", latents=tmp_path / "latents")
    train_branch(params, "elixr", paths)
    pipeline = CXRDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert pipeline.unet.config.sample_size == 8 and pipeline.unet.config.in_channels == 4
    image = pipeline(embedding=torch.randn(4, 8), num_inference_steps=2, progress=False).images[0]
    assert image.size == (16, 16)


def test_pixel_space_needs_no_latents(tmp_path, data):
    from cxr_diffusion.diffusion.latents import encode_latents

    assert encode_latents(tiny_params(), data["prepared"], tmp_path / "latents") == {"latents": False}
    assert (tmp_path / "latents" / "not_used.json").is_file()


def test_gradient_checkpointing_recomputes_in_backward_and_trains_the_same_weights(tmp_path, data, uninterrupted,
                                                                                 monkeypatch):
    import torch.utils.checkpoint

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or real_checkpoint(*args, **kwargs))
    train_branch(tiny_params(train={"gradient_checkpointing": True}), "elixr", paths_in(tmp_path, data))

    assert calls, "gradient_checkpointing: true never recomputed a block"
    assert_same_weights(final_unet(tmp_path), final_unet(uninterrupted[0]))


def test_no_checkpoints_when_checkpoint_every_steps_is_null(tmp_path, data, uninterrupted):
    train_branch(tiny_params(train={"checkpoint_every_steps": None}), "elixr", paths_in(tmp_path, data))

    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert_same_weights(final_unet(tmp_path), final_unet(uninterrupted[0]))


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("auto", "cuda", True), ("auto", "cpu", False), ("always", "cpu", True), ("never", "cuda", False)])
def test_unet_is_compiled_on_cuda_by_default_and_never_on_a_cpu_unless_asked(setting, device, expected):
    assert denoiser_module.compiles(setting, torch.device(device)) is expected


@pytest.mark.parametrize("name, cut_short", [("metrics.json", '{"step": 3, "train": {"lo'),
                                             ("params.yaml", "lr: [0.001\n")])
def test_resume_drops_a_live_summary_cut_short_by_a_kill(tmp_path, name, cut_short):
    # DVCLive rewrites these in place: a SIGKILL mid-write leaves them cut short (seen in CI), and Live(resume=True)
    # then failed with a JSON traceback instead of resuming.
    live_dir = tmp_path / "live"
    (live_dir / "plots" / "metrics" / "train").mkdir(parents=True)
    (live_dir / "plots" / "metrics" / "train" / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t0.5\n1\t1\t0.4\n")
    (live_dir / name).write_text(cut_short)
    live = live_log.open_live(live_dir, TrainingState(step=1), {"lr": 0.001})
    live.step = 2
    live.log_metric("train/loss", 0.3)
    live.make_summary()
    assert json.loads((live_dir / "metrics.json").read_text())["train"]["loss"] == 0.3
    rows = (live_dir / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    assert rows[:2] == ["1\t0\t0.5", "1\t1\t0.4"] and rows[-1].endswith("0.3")  # kept, then appended


def test_resume_keeps_a_readable_live_summary(tmp_path):
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    (live_dir / "metrics.json").write_text('{"step": 1, "val": {"loss": 0.2}}')
    live = live_log.open_live(live_dir, TrainingState(step=1), {"lr": 0.001})
    live.make_summary()
    assert json.loads((live_dir / "metrics.json").read_text())["val"]["loss"] == 0.2


def test_the_precision_probe_leaves_the_models_initial_weights_alone(tmp_path, data, monkeypatch):
    """The CPU probe builds a layer from the global generator; a run's weights must not depend on whether it ran."""
    from cxr_diffusion.diffusion import machine

    monkeypatch.setattr(machine, "choose_mixed_precision", lambda requested, device, cpu_speedup=None: "no")
    drawn = {}
    for setting in ("auto", "no"):
        params = tiny_params(train={"mixed_precision": setting})
        machine.set_up_machine(params, data["prepared"], data["store"], None)
        drawn[setting] = torch.rand(4)
    torch.testing.assert_close(drawn["auto"], drawn["no"], rtol=0, atol=0)


def test_timestep_condition_trains_saves_and_generates_through_the_checked_loader(tmp_path, data):
    """train.unet.timestep_condition: the pooled condition reaches every ResNet block through diffusers'
    projection class embedding; the saved model passes the model checks and generates in a new process."""
    unet = {**TINY_TRAIN["unet"], "timestep_condition": True, "cross_attention": [False, False, False]}
    train_branch(tiny_params(train={"unet": unet}), "elixr", paths_in(tmp_path, data))
    weights = final_unet(tmp_path)
    assert weights["class_embedding.linear_1.weight"].shape == (weights["time_embedding.linear_2.weight"].shape[0], 8)
    code = (
        "import sys, torch; from cxr_diffusion.sampling.sample import load_pipeline;"
        "p = load_pipeline(sys.argv[1], 'ddpm', torch.device('cpu'));"
        "g = lambda e: p(embedding=e, num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False,"
        " output_type='np').images;"
        "e = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1));"
        "a, b = g(e[0]), g(e[1]);"
        "print(p.unet.config.class_embed_type, a.shape, float(abs(a - b).max()) > 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["projection", "(1,", "16,", "16)", "True"], result.stdout


def test_condition_inputs_add_the_pooled_tokens_only_for_a_timestep_conditioned_unet():
    from cxr_diffusion.config import changed
    from cxr_diffusion.diffusion.condition import condition_inputs
    from cxr_diffusion.diffusion.unet import build_unet

    base = tiny_params().train.unet
    hidden = torch.randn(2, 4, 8)
    plain = condition_inputs(build_unet(base, 16, 3, 8), hidden)
    assert set(plain) == {"encoder_hidden_states"}
    pooled = condition_inputs(build_unet(changed(base, timestep_condition=True), 16, 3, 8), hidden)
    torch.testing.assert_close(pooled["class_labels"], hidden.mean(1))

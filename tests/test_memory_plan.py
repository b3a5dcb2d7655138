"""The training memory plan: its prediction against measured peaks on the CPU and against the H200 figures for the
SD-1.5 UNet, the plans it makes for 80 / 48 / 24 GB cards, and the trainer following a plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from cxr_diffusion.cli import app
from cxr_diffusion.config import UNetConfig
from cxr_diffusion.diffusion import machine as machine_module
from cxr_diffusion.diffusion.memory_plan import (
    BUDGET_HEADROOM, GIB, MemoryPlanError, measure_activations, plan_memory, predict_parts, unet_parameters,
)
from cxr_diffusion.diffusion.trainer import train_branch
from cxr_diffusion.diffusion.unet import build_unet, sd15_unet_config

from conftest import make_training_data
from test_trainer import assert_same_weights, final_unet, paths_in, tiny_params
from cxr_diffusion.profiles import params_with

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SMALL = UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention=(False, True, True),
                   attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32,
                   timestep_condition=False)
SD_VAE_PARAMETERS = 83_653_863
H200_PEAK_GIB = {"bf16": 89.7, "no": 126.3}  # benchmarks/results/gpu_nih512_h200_memory.txt: batch 64, no EMA, no VAE


def measured_training_peak(config: UNetConfig, size: int, batch: int, precision: str, checkpointing: bool) -> int:
    """Peak allocated bytes of two real optimizer steps of two micro-batches each (fused AdamW), from the
    profiler's allocation events: what torch.cuda.max_memory_allocated reports on a GPU."""
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        unet = build_unet(config, size, 4, config.cross_attention_dim).train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
        images, condition = torch.randn(batch, 4, size, size), torch.randn(batch, 8, config.cross_attention_dim)
        for _ in range(2):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = F.mse_loss(unet(images, torch.randint(0, 1000, (batch,)), condition).sample.float(), images)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    allocated = peak = 0
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


@pytest.mark.parametrize("precision, checkpointing", [("no", False), ("bf16", True)])
def test_the_predicted_peak_matches_a_measured_training_run(precision, checkpointing):
    predicted = sum(predict_parts(unet_parameters(SMALL, 16, 4, 32),
                                  measure_activations(SMALL, 16, 4, 32, 8, precision, checkpointing, "cpu"),
                                  micro_batch=4, ema_on_device=False).values())
    measured = measured_training_peak(SMALL, 16, 4, precision, checkpointing)
    assert 0.9 < predicted / measured < 1.1, (predicted, measured)


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_the_sd15_prediction_matches_the_h200_measurement(precision):
    activations = measure_activations(sd15_unet_config(), 64, 4, 768, 77, precision, False, "cuda")
    predicted = sum(predict_parts(unet_parameters(sd15_unet_config(), 64, 4, 768), activations, 64,
                                  ema_on_device=False).values())
    assert predicted / GIB == pytest.approx(H200_PEAK_GIB[precision], rel=0.02)


@pytest.fixture(scope="module")
def nih512():

    return params_with(profile="nih-512")


@pytest.mark.parametrize("card_gib", [79.6, 47.5, 23.6])  # what torch reports for 80, 48 and 24 GB cards
def test_nih512_gets_a_plan_that_fits_80_48_and_24_gb_and_keeps_256_images_per_step(nih512, card_gib):
    budget = int(card_gib * GIB * BUDGET_HEADROOM)
    plan = plan_memory(nih512.train, 64, 4, 768, 77, "bf16", budget, SD_VAE_PARAMETERS)
    assert plan.fits and plan.predicted_peak_bytes <= budget
    assert plan.images_per_step == 256 == nih512.train.batch_size * nih512.train.gradient_accumulation
    assert plan.changed, "batch 64 does not fit these cards as configured"
    if card_gib > 70:  # 80 GB: halving the micro-batch is enough; nothing slower is chosen
        assert (plan.micro_batch, plan.gradient_checkpointing, plan.ema_on_device) == (32, False, True)


def test_the_configured_plan_is_kept_when_it_fits(nih512):
    plan = plan_memory(nih512.train, 64, 4, 768, 77, "bf16", 200 * GIB, SD_VAE_PARAMETERS)
    assert (plan.micro_batch, plan.accumulation, plan.changed) == (64, 4, ())
    assert plan.vae_on_device and plan.ema_on_device


def test_a_card_too_small_for_any_plan_is_refused_naming_the_key(nih512):
    with pytest.raises(MemoryPlanError, match=r"^train\.batch_size: no training plan fits"):
        plan_memory(nih512.train, 64, 4, 768, 77, "bf16", 8 * GIB, SD_VAE_PARAMETERS)


def test_relaxations_come_cheapest_first():
    params = tiny_params(train={"batch_size": 4, "gradient_accumulation": 2})
    configured = plan_memory(params.train, 16, 1, 8, 4, "no", None, device_type="cpu")
    ema_bytes = configured.parts["ema"]
    # a little short: the EMA goes to the host before activations are recomputed
    plan = plan_memory(params.train, 16, 1, 8, 4, "no", configured.predicted_peak_bytes - ema_bytes // 2,
                       device_type="cpu")
    assert (plan.ema_on_device, plan.gradient_checkpointing, plan.micro_batch) == (False, False, 4)
    assert plan.changed == ("EMA in host memory",)
    # shorter still: gradient checkpointing, then micro-batches below the floor, still 8 images per step
    smallest = plan_memory(params.train.model_copy(update={"batch_size": 1, "gradient_accumulation": 8,
                                                           "gradient_checkpointing": True}),
                           16, 1, 8, 4, "no", None, device_type="cpu")
    budget = smallest.predicted_peak_bytes - smallest.parts["ema"]
    plan = plan_memory(params.train, 16, 1, 8, 4, "no", budget, device_type="cpu")
    assert plan.fits and plan.gradient_checkpointing and not plan.ema_on_device
    assert plan.images_per_step == 8 and plan.micro_batch < 4
    assert plan.predicted_peak_bytes < configured.predicted_peak_bytes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("memory-plan-data"))


def test_the_trainer_follows_a_plan_with_the_ema_in_host_memory(tmp_path, data, monkeypatch):
    params = tiny_params()
    configured = plan_memory(params.train, 16, 1, 8, 4, "no", None, device_type="cpu")
    budget = configured.predicted_peak_bytes - configured.parts["ema"] // 2  # fits once the EMA leaves the device
    monkeypatch.setattr(machine_module, "device_memory_budget", lambda device: budget)

    planned = train_branch(params, "elixr", paths_in(tmp_path / "planned", data))
    monkeypatch.setattr(machine_module, "device_memory_budget", lambda device: None)
    plain = train_branch(params, "elixr", paths_in(tmp_path / "plain", data))

    assert planned["memory_plan"]["memory/ema_on_device"] is False and plain["memory_plan"] is None
    live_params = (tmp_path / "planned" / "live" / "params.yaml").read_text()
    assert "memory/ema_on_device: false" in live_params and "memory/predicted_peak_gib" in live_params
    # the average kept on the host is the same average: the saved EMA weights are identical
    assert_same_weights(final_unet(tmp_path / "planned"), final_unet(tmp_path / "plain"))


def test_the_trainer_trains_the_planned_micro_batch_with_the_same_images_per_step(tmp_path, data, monkeypatch):
    params = tiny_params(train={"batch_size": 8, "max_steps": 2, "checkpoint_every_steps": None})
    smallest = plan_memory(params.train.model_copy(update={"batch_size": 2, "gradient_accumulation": 4,
                                                           "gradient_checkpointing": True}),
                           16, 1, 8, 4, "no", None, device_type="cpu")
    budget = smallest.predicted_peak_bytes - smallest.parts["ema"]
    monkeypatch.setattr(machine_module, "device_memory_budget", lambda device: budget)

    result = train_branch(params, "elixr", paths_in(tmp_path, data))

    plan = result["memory_plan"]
    assert plan["memory/micro_batch"] * plan["memory/accumulation"] == 8
    assert plan["memory/micro_batch"] < 8 and plan["memory/gradient_checkpointing"] is True
    assert result["steps"] == 2 and result["images_seen"] == 16


def test_memory_plan_command_shows_each_branch_for_a_card(tiny_params_file):
    result = CliRunner().invoke(app, ["memory-plan", "--params", str(tiny_params_file), "--memory-gib", "24"])
    assert result.exit_code == 0, result.output
    for branch in ("clip_text", "clip_vision", "elixr"):
        assert f"\n{branch}: condition " in result.output
    assert "images per optimizer step" in result.output and "predicted (budget 22.1 GiB)" in result.output


def test_memory_plan_command_without_a_gpu_or_card_size_says_what_to_pass(tiny_params_file):
    result = CliRunner().invoke(app, ["memory-plan", "--params", str(tiny_params_file)])
    assert result.exit_code == 2
    assert "pass --memory-gib" in result.output

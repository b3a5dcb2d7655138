"""What a first GPU run needs of the trainer, checked on a CPU: fp16 overflow reaches the loss scaler, the
compiled UNet compiles once, latent-space training decodes no image, and one step leaves no host sync."""

from __future__ import annotations

import functools

import pytest
import torch
from accelerate import Accelerator

from cxr_diffusion.data import shards
from cxr_diffusion.diffusion.denoiser import Denoiser
from cxr_diffusion.diffusion.step import LaggedReadings, StepTensors, backward, optimizer_step
from cxr_diffusion.diffusion.trainer import TrainPaths, train_branch

from conftest import make_training_data
from test_trainer import paths_in, tiny_params

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("gpu-readiness-data"))


def fp16_accelerator(init_scale: float) -> Accelerator:
    """accelerate as it is on a CUDA card under fp16, on a CPU: a real torch GradScaler in its place."""
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator.native_amp = True
    return accelerator


def tiny_model_and_optimizer(accelerator: Accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    return accelerator.prepare(model, optimizer)


def one_step(accelerator, model, optimizer, overflow: bool) -> StepTensors:
    loss = model(torch.ones(3, 4)).square().mean()
    if overflow:  # an fp16 overflow as the scaled backward leaves it: an inf in one gradient
        model.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    backward(accelerator, loss)
    step = optimizer_step(accelerator, model, optimizer, lr=0.1, grad_clip=1.0, loss=loss)
    model.weight._backward_hooks.clear()
    return step


def test_fp16_overflow_skips_the_step_and_lowers_the_loss_scale():
    accelerator = fp16_accelerator(init_scale=1024.0)
    model, optimizer = tiny_model_and_optimizer(accelerator)
    before = [p.detach().clone() for p in model.parameters()]

    step = one_step(accelerator, model, optimizer, overflow=True)

    assert step.skipped.item() == 1.0
    assert accelerator.scaler.get_scale() == 512.0, "the scaler never saw the overflow"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_after_an_overflow_the_next_finite_step_updates_at_the_lowered_scale():
    accelerator = fp16_accelerator(init_scale=1024.0)
    model, optimizer = tiny_model_and_optimizer(accelerator)
    one_step(accelerator, model, optimizer, overflow=True)
    before = model.weight.detach().clone()

    step = one_step(accelerator, model, optimizer, overflow=False)

    assert step.skipped.item() == 0.0
    assert accelerator.scaler.get_scale() == 512.0
    assert not torch.equal(before, model.weight)
    assert torch.isfinite(model.weight).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_without_a_scaler_a_non_finite_gradient_skips_the_step_on_the_device(bad):
    accelerator = Accelerator(cpu=True)
    model, optimizer = tiny_model_and_optimizer(accelerator)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(3, 4)).square().mean() * bad

    backward(accelerator, loss)
    step = optimizer_step(accelerator, model, optimizer, lr=0.1, grad_clip=1.0, loss=loss)

    assert step.skipped.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert int(optimizer.state[model.weight]["step"]) == 0, "a skipped step still advanced AdamW"


def test_readings_on_a_cpu_are_ready_the_step_they_are_pushed():
    readings = LaggedReadings(torch.device("cpu"))
    ready = readings.push(7, StepTensors(torch.tensor(0.5), torch.tensor(2.0), torch.tensor(1.0)))
    assert [(r.step, r.loss, r.grad_norm, r.skipped) for r in ready] == [(7, 0.5, 2.0, True)]
    assert readings.flush() == []


def test_a_training_step_makes_no_host_sync(monkeypatch):
    # .item(), bool() and float() of a tensor block the host until the device is done: none may run per step
    accelerator = Accelerator(cpu=True)
    model, optimizer = tiny_model_and_optimizer(accelerator)
    synced = []
    for name in ("item", "__bool__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, functools.partialmethod(
            lambda self, *a, _real=real, _name=name, **k: synced.append(_name) or _real(self, *a, **k)))
    loss = model(torch.ones(3, 4)).square().mean()
    backward(accelerator, loss)
    optimizer_step(accelerator, model, optimizer, lr=0.1, grad_clip=1.0, loss=loss)
    assert synced == []


def tiny_vae(directory):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(directory)
    return directory


def test_latent_space_training_decodes_no_image(tmp_path, data, monkeypatch):
    from cxr_diffusion.diffusion.latents import encode_latents

    params = tiny_params(train={"space": "latent", "vae": str(tiny_vae(tmp_path / "vae")), "max_steps": 4,
                                "val_every_steps": 2, "sample_every_steps": 2, "sample_grid_images": 2})
    encode_latents(params, data["prepared"], tmp_path / "latents")  # the one stage that reads the images

    def no_decoding(*args, **kwargs):
        raise AssertionError("a PNG was decoded during latent-space training")

    monkeypatch.setattr(shards, "decode_grayscale", no_decoding)
    paths = TrainPaths(data["prepared"], data["store"], None, tmp_path / "model", tmp_path / "checkpoints",
                       tmp_path / "live", latents=tmp_path / "latents")
    result = train_branch(params, "elixr", paths)

    assert result["steps"] == 4
    assert (tmp_path / "live" / "plots" / "images" / "samples.png").is_file()


def test_the_png_guard_of_the_latent_test_does_catch_a_decode(tmp_path, data, monkeypatch):
    # the test above would pass vacuously if decode_grayscale were not the decoder the images go through
    monkeypatch.setattr(shards, "decode_grayscale", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(AssertionError, match="decoded"):
        shards.PreparedImages(data["prepared"], "train")[0]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_the_compiled_unet_compiles_once_through_validation_and_the_sample_grid(tmp_path, data, monkeypatch,
                                                                               gradient_checkpointing):
    import torch._dynamo

    torch._dynamo.reset()
    # Dynamo's graph capture and its guards decide recompiles, not the backend: "eager" keeps the test fast
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    params = tiny_params(train={"compile": "always", "max_steps": 6, "val_every_steps": 2, "sample_every_steps": 3,
                                "sample_grid_images": 2, "gradient_checkpointing": gradient_checkpointing})
    result = train_branch(params, "elixr", paths_in(tmp_path, data))

    assert result["compilations"] >= 1, "the UNet was never compiled"
    assert result["recompilations"] == 0
    assert result["first_step_seconds"] is not None and result["img_per_s"] > 0


def test_the_recompile_count_sees_a_recompile(tmp_path, data, monkeypatch):
    # compiled in place, validation (no grad) and the grid (fp32, other batch) would recompile: the count must say so
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(Denoiser, "compile_for_training", lambda self: self.unet.compile(backend="eager"))
    params = tiny_params(train={"compile": "always", "max_steps": 4, "val_every_steps": 2, "sample_every_steps": 2,
                                "sample_grid_images": 2})
    result = train_branch(params, "elixr", paths_in(tmp_path, data))
    assert result["recompilations"] > 0

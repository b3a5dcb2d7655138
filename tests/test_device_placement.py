"""Every input reaches the model's device: the training step, validation, sampling and the inference loops.

CPU-only tests cannot see a tensor left on the CPU while the model sits on a GPU. PyTorch's ``meta``
device can: a model moved there holds no values, and most ops refuse a CPU operand next to a meta
one. Convolutions do not refuse it, so ``on_meta`` also installs a pre-hook on every submodule that
fails on any non-scalar input that is not on ``meta`` (0-dim tensors mix with any device in PyTorch,
and diffusers moves timesteps itself). Each loop is then run with its model on ``meta``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from cxr_diffusion.conditioning.clip import encode_images, encode_prompts, load_text_encoder, load_vision_encoder
from cxr_diffusion.conditioning.embed import standin_tokens
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.config import EvaluatorConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.diffusion.condition import ConditionAdapter
from cxr_diffusion.diffusion.data import ConditionedImages, collate
from cxr_diffusion.diffusion.latents import encode_batch
from cxr_diffusion.diffusion.noise import sampling_scheduler, training_scheduler
from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline
from cxr_diffusion.diffusion.denoiser import build_denoiser
from cxr_diffusion.diffusion.loss import Validator, diffusion_loss, training_loss
from cxr_diffusion.evaluation.evaluator import ClassifierSpec, CXRClassifier, evaluator_loss, predict_batch
from cxr_diffusion.sampling.sample import place_pipeline

from conftest import gradient_image, make_training_data
from test_trainer import tiny_params

META = torch.device("meta")


class LeftOnAnotherDevice(AssertionError):
    pass


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def on_meta(module: nn.Module) -> nn.Module:
    """``module`` on the meta device, failing loudly on any input that was not moved there."""
    def check(submodule, args, kwargs):
        for tensor in _tensors((args, kwargs)):
            if tensor.ndim > 0 and tensor.device != META:
                raise LeftOnAnotherDevice(f"{type(submodule).__name__} got a {tuple(tensor.shape)} tensor on "
                                          f"{tensor.device}; it should have been moved to the model's device")

    module.to(META)
    for submodule in module.modules():
        submodule.register_forward_pre_hook(check, with_kwargs=True)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("device-data"))


@pytest.fixture(scope="module")
def params():
    return tiny_params()


def denoiser_and_batch(params, data):
    store = ConditionStore(data["store"])
    images = ConditionedImages(data["prepared"], "train", store, params.channels)
    return build_denoiser(params, store), collate([images[i] for i in range(4)]), images


def test_the_seam_sees_an_input_left_on_the_cpu(params, data):
    """The control: the same loss with the batch left on the CPU is caught, convolution first layer included."""
    model, batch, _ = denoiser_and_batch(params, data)
    on_meta(model)
    scheduler = training_scheduler(params.train)
    n = len(batch["pixel_values"])
    with pytest.raises((LeftOnAnotherDevice, RuntimeError)):
        diffusion_loss(model, scheduler, batch["pixel_values"], batch["condition"], torch.zeros(n, dtype=torch.long),
                       torch.randn_like(batch["pixel_values"]), None)


def test_training_step_moves_pixels_conditions_noise_timesteps_and_dropout(params, data):
    model, batch, _ = denoiser_and_batch(params, data)
    on_meta(model)
    loss = training_loss(model, training_scheduler(params.train), batch, params.train,
                         torch.Generator().manual_seed(0), META)
    assert loss.device == META and loss.ndim == 0
    loss.backward()  # the backward pass runs on the model's device too
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters() if p.requires_grad)


def test_training_draws_are_made_on_the_cpu_and_do_not_depend_on_the_device(params, data):
    """Same generator state after a step on meta as after one on the CPU: exact resume across devices."""
    _, batch, _ = denoiser_and_batch(params, data)
    states = []
    for device in (torch.device("cpu"), META):
        model, _, _ = denoiser_and_batch(params, data)
        model.to(device)
        generator = torch.Generator().manual_seed(3)
        training_loss(model, training_scheduler(params.train), batch, params.train, generator, device)
        states.append(generator.get_state())
    assert torch.equal(states[0], states[1])


def test_validation_runs_on_the_model_device(params, data):
    model, _, images = denoiser_and_batch(params, data)
    validator = Validator(images, training_scheduler(params.train), None, seed=0, batch_size=3)
    true_losses, shuffled = validator.losses(on_meta(model))
    assert true_losses.device == META and shuffled.device == META and len(true_losses) == len(images)


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         sample_size=16)


@pytest.mark.parametrize("latent", [False, True], ids=["pixel", "latent"])
@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "ddpm"])
def test_sampling_moves_conditions_and_noise_and_decodes_on_the_model_device(params, data, latent, sampler):
    model, batch, _ = denoiser_and_batch(params, data)
    vae = tiny_vae() if latent else None
    if latent:  # the UNet sees 4-channel 8x8 latents of 16px images
        from cxr_diffusion.diffusion.unet import build_unet

        model.unet = build_unet(params.train.unet, 8, 4, model.adapter.config.out_dim)
    pipeline = CXRDiffusionPipeline(unet=model.unet, scheduler=sampling_scheduler(training_scheduler(params.train), sampler),
                                    condition_adapter=model.adapter, vae=vae)
    place_pipeline(pipeline, META)
    for module in (pipeline.unet, pipeline.condition_adapter) + ((pipeline.vae,) if latent else ()):
        on_meta(module)
    images = pipeline.denoise(batch["condition"], guidance_scale=3.0, num_inference_steps=3,
                              generator=torch.Generator().manual_seed(0))
    assert images.device == META
    assert images.shape[-1] == 16


def test_vae_encoding_moves_the_batch(params, data):
    vae = on_meta(tiny_vae())
    latents = encode_batch(vae, torch.rand(2, 3, 16, 16) * 2 - 1)
    assert latents.device == META and latents.shape == (2, 4, 8, 8)


def test_clip_encoders_move_tokens_and_pixels(tiny_clip_dir):
    from PIL import Image

    text = load_text_encoder(str(tiny_clip_dir))
    on_meta(text.model)
    # transformers' text attention reads its padding mask's values (no values on meta), so the tower's
    # own forward is replaced; the pre-hook still checks what encode_prompts hands it.
    tokens, width = text.shape
    text.model.forward = lambda input_ids, attention_mask: type("Out", (), {
        "last_hidden_state": torch.zeros(len(input_ids), tokens, width, device=META)})()
    hidden, mask, _ = encode_prompts(text, ["chest x-ray showing effusion", "chest x-ray with no findings"])
    assert hidden.device == META and hidden.shape[0] == 2
    vision = load_vision_encoder(str(tiny_clip_dir))
    on_meta(vision.model)
    pictures = [Image.fromarray(gradient_image(seed=i)) for i in range(3)]
    assert encode_images(vision, pictures).device == META
    assert standin_tokens(vision, pictures, tokens=2).device == META


def test_evaluator_training_and_prediction_move_their_batches():
    config = profile_section(EvaluatorConfig, width=4, feature_dim=8)
    model = on_meta(CXRClassifier(ClassifierSpec(("Effusion", "No Finding"), config.width, config.feature_dim, 16)))
    batch = {"pixel_values": torch.rand(3, 1, 16, 16) * 2 - 1, "labels": torch.tensor([[1.0, 0], [0, 1], [1, 0]])}
    loss = evaluator_loss(model, batch, torch.Generator().manual_seed(0), torch.ones(2), META)
    assert loss.device == META
    features, probabilities = predict_batch(model, batch["pixel_values"].to(META))
    assert features.device == META and probabilities.shape == (3, 2)


def test_the_condition_adapter_null_condition_follows_the_model():
    adapter = on_meta(ConditionAdapter(tokens=2, dim=4, out_tokens=2, out_dim=4))
    assert adapter.null(3).device == META


def test_demo_clip_training_step_moves_images_tokens_and_targets(tiny_clip_dir):
    from transformers import CLIPModel

    from cxr_diffusion.conditioning.demo_clip import demo_clip_loss

    model = on_meta(CLIPModel.from_pretrained(str(tiny_clip_dir)))
    # as for the text encoder: the text tower's attention reads mask values, so only its inputs are checked here
    model.text_model.forward = lambda input_ids, attention_mask, **_: type("Out", (), {
        "pooler_output": torch.zeros(len(input_ids), model.config.text_config.hidden_size, device=META)})()
    tokens = {"input_ids": torch.ones(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    loss = demo_clip_loss(model, torch.rand(3, 3, 16, 16), tokens, torch.tensor([0, 1, 0]), META)
    assert loss.device == META

"""Bounded memory in the inference stages: each loop holds one batch of images (its param), and the
batch size changes nothing but the memory (results equal up to float rounding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.config import EvaluatorConfig
from cxr_diffusion.profiles import params_with, profile_section
from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.diffusion import latents as latents_module
from cxr_diffusion.diffusion.latents import encode_latents
from cxr_diffusion.evaluation import evaluate as evaluate_module
from cxr_diffusion.evaluation.diversity import pairwise_ms_ssim
from cxr_diffusion.evaluation.evaluate import EvaluatePaths, evaluate_branch
from cxr_diffusion.evaluation.evaluator import (
    ClassifierSpec, CXRClassifier, embed_and_predict, load_classifier, train_evaluator,
)
from cxr_diffusion.sampling import sample as sample_module

from conftest import make_training_data

CLASSES = ["Effusion", "No Finding"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_data(tmp_path_factory.mktemp("memory-data"))


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("evaluator") / "evaluator"
    train_evaluator(data["prepared"], profile_section(EvaluatorConfig, width=4, feature_dim=8, epochs=1, batch_size=8), 0, out)
    return out


def batch_sizes_seen(module: torch.nn.Module) -> list[int]:
    """Leading sizes of every input ``module`` gets from now on."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    return seen


# --- encode_latents -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(directory)
    return directory


def latent_params(vae_dir, batch_size: int):
    return params_with({"image_size": 16, "filter": {"classes": CLASSES, "merges": {}},
                             "train": {"space": "latent", "vae": str(vae_dir)},
                             "encode_latents": {"batch_size": batch_size}})


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_encoding_in_batches_gives_the_same_latents_and_never_more_than_a_batch(tmp_path, data, vae_dir,
                                                                                 monkeypatch, batch_size):
    seen: list[int] = []
    original = latents_module.encode_batch
    monkeypatch.setattr(latents_module, "encode_batch", lambda vae, x: seen.append(len(x)) or original(vae, x))
    metrics = encode_latents(latent_params(vae_dir, batch_size), data["prepared"], tmp_path / "latents")
    reference_dir = tmp_path / "reference"
    monkeypatch.setattr(latents_module, "encode_batch", original)
    encode_latents(latent_params(vae_dir, 48), data["prepared"], reference_dir)  # every split in one batch
    store, reference = ConditionStore(tmp_path / "latents"), ConditionStore(reference_dir)
    assert max(seen) == batch_size and sum(seen) == metrics["images"] == 48
    assert metrics["batch_size"] == batch_size
    assert store.row_of.keys() == reference.row_of.keys()
    for name in reference.row_of:
        torch.testing.assert_close(store[name].embeddings, reference[name].embeddings, rtol=1e-5, atol=1e-6)


# --- evaluator --------------------------------------------------------------------------------------------------

def test_the_classifier_sees_large_images_area_averaged_to_max_image_size():
    torch.manual_seed(0)
    model = CXRClassifier(ClassifierSpec(tuple(CLASSES), width=4, feature_dim=8, image_size=64, input_size=16)).eval()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    assert model.inputs(images).shape == (3, 1, 16, 16)
    downsampled = F.avg_pool2d(images.mean(1, keepdim=True), 4)
    with torch.no_grad():
        torch.testing.assert_close(model.features(images), model.features(downsampled), rtol=1e-5, atol=1e-6)


def test_the_classifier_never_upsamples_small_images():
    model = CXRClassifier(ClassifierSpec(tuple(CLASSES), width=4, feature_dim=8, image_size=16, input_size=256))
    images = torch.rand(2, 1, 16, 16)
    assert torch.equal(model.inputs(images), images)


def test_a_saved_evaluator_keeps_its_input_size(tmp_path, data):
    out = tmp_path / "evaluator"
    train_evaluator(data["prepared"], profile_section(EvaluatorConfig, width=4, feature_dim=8, epochs=1, batch_size=8,
                                                      max_image_size=8), 0, out)
    model = load_classifier(out)
    assert model.spec.network_size == 8 and model.inputs(torch.zeros(1, 1, 16, 16)).shape[-1] == 8


def test_a_retrained_evaluator_is_byte_identical(tmp_path, data):
    """No wall-clock time in the saved model (issue 13: models/evaluator changed md5 on every rerun)."""
    config = profile_section(EvaluatorConfig, width=4, feature_dim=8, epochs=1, batch_size=8, max_image_size=8)
    for name in ("a", "b"):
        train_evaluator(data["prepared"], config, 0, tmp_path / name)
    for file in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_evaluator_trains_on_a_train_split_smaller_than_its_batch(tmp_path, data, monkeypatch):
    """drop_last with a batch larger than the split yields no batch at all: training never advanced."""
    calls = []
    original = PreparedImages.row_group_order

    def counted(self, generator, window=4):
        calls.append(1)
        if len(calls) > 10:
            raise AssertionError("the training loop makes no progress: no batch per pass over the split")
        return original(self, generator, window)

    monkeypatch.setattr(PreparedImages, "row_group_order", counted)
    train_size = len(PreparedImages(data["prepared"], "train"))
    metrics = train_evaluator(data["prepared"], profile_section(EvaluatorConfig, width=4, feature_dim=8, epochs=2, batch_size=1000),
                              0, tmp_path / "evaluator")
    assert metrics["train_images"] == train_size < 1000 and len(calls) == 2


def test_embedding_reads_one_batch_at_a_time_and_the_batch_does_not_change_results(data, evaluator_dir):
    images = PreparedImages(data["prepared"], "train")
    results = {}
    for batch_size in (1, 5, 128):
        model = load_classifier(evaluator_dir)
        seen = batch_sizes_seen(model.body)
        results[batch_size] = embed_and_predict(model, images, batch_size)
        assert max(seen) == min(batch_size, len(images)) and sum(seen) == len(images)
    for batch_size in (1, 5):
        for key in ("features", "probabilities", "pixels"):
            np.testing.assert_allclose(results[batch_size][key], results[128][key], rtol=1e-5, atol=1e-6)
        assert list(results[batch_size]["image_index"]) == list(results[128]["image_index"])


# --- evaluate ---------------------------------------------------------------------------------------------------

def evaluate_params(batch_size: int):
    return params_with({"image_size": 16, "device": "cpu", "filter": {"classes": CLASSES, "merges": {}},
                             "evaluate": {"bootstrap": 10, "kid_subset": 4, "prdc_k": 2, "train_reference": 64,
                                          "diversity_pairs": 16, "untrained_images": 0, "batch_size": batch_size}})


def flat(tree, prefix: str = "") -> dict:
    """Leaves of nested metrics by path, timing left out."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() if key != "seconds" for k, v in flat(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in flat(value, f"{prefix}{i}.").items()}
    return {prefix: tree}


def test_evaluate_gives_the_same_metrics_with_any_batch_size(tmp_path, data, evaluator_dir, monkeypatch):
    seen: list[int] = []
    original = evaluate_module.embed_and_predict

    def spied(model, images, batch_size):
        seen.append(batch_size)
        return original(model, images, batch_size)

    monkeypatch.setattr(evaluate_module, "embed_and_predict", spied)
    runs = {}
    # the generated set is the real test split itself: the metrics are then known to be well defined
    samples = Path(shutil.copytree(data["prepared"], tmp_path / "samples"))
    manifest = json.loads((samples / "manifest.json").read_text())
    sampled = evaluate_params(2)  # generated as the params say: evaluate compares the settings
    generated = {"branch": "elixr", "sampler": sampled.sample.sampler, "steps": sampled.sample.steps,
                 "guidance_scale": sampled.sample.guidance_scale, "seed": sampled.seed,
                 "count": sampled.sample.count}
    (samples / "manifest.json").write_text(json.dumps({**manifest, "generated": generated}))
    for batch_size in (2, 128):
        paths = EvaluatePaths(evaluator=evaluator_dir, prepared=data["prepared"], samples=samples,
                              model=tmp_path / "unused", store=tmp_path / "unused",
                              figures=tmp_path / f"figures{batch_size}", metrics=tmp_path / f"metrics{batch_size}.json")
        runs[batch_size] = evaluate_branch(evaluate_params(batch_size), "elixr", paths)
    assert set(seen) == {2, 128}
    small, large = flat(runs[2]), flat(runs[128])
    assert small.keys() == large.keys()
    # Features agree to float32 rounding (see the embedding test); this barely trained evaluator's features
    # lie ~1e-3 apart, so distances between them keep ~1e-5 of that rounding: hence rel=1e-3.
    for key, value in large.items():
        if isinstance(value, float):
            assert small[key] == pytest.approx(value, rel=1e-3, abs=1e-9), key
        else:
            assert small[key] == value, key


def test_untrained_baseline_features_are_computed_one_batch_at_a_time(evaluator_dir):
    model = load_classifier(evaluator_dir)
    pictures = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)) for i in range(5)]
    whole = evaluate_module._features_of_images(model, pictures, batch_size=5)
    seen = batch_sizes_seen(model.body)
    batched = evaluate_module._features_of_images(model, pictures, batch_size=2)
    assert seen == [2, 2, 1]
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)


def test_ms_ssim_scores_at_most_pairs_per_batch_pairs_at_once_and_the_mean_does_not_depend_on_it(monkeypatch):
    from cxr_diffusion.evaluation import diversity

    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5)]
    seen: list[int] = []
    original = diversity.multiscale_structural_similarity_index_measure
    monkeypatch.setattr(diversity, "multiscale_structural_similarity_index_measure",
                        lambda a, b, **kwargs: seen.append(len(a)) or original(a, b, **kwargs))
    batched = pairwise_ms_ssim(images, pairs, pairs_per_batch=2)
    assert seen == [2, 2, 1]
    assert batched == pytest.approx(pairwise_ms_ssim(images, pairs, pairs_per_batch=64), rel=1e-12)


# --- sample -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data):
    from cxr_diffusion.diffusion.noise import sampling_scheduler, training_scheduler
    from cxr_diffusion.diffusion.pipeline import CXRDiffusionPipeline
    from cxr_diffusion.diffusion.denoiser import build_denoiser

    params = sample_params(3)
    torch.manual_seed(0)
    model = build_denoiser(params, ConditionStore(data["store"]))
    pipeline = CXRDiffusionPipeline(unet=model.unet, scheduler=sampling_scheduler(training_scheduler(params.train)),
                                    condition_adapter=model.adapter, branch="elixr", channels=params.channels)
    directory = tmp_path_factory.mktemp("model") / "model"
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def sample_params(batch_size: int):
    return params_with({
        "image_size": 16, "device": "cpu", "filter": {"classes": CLASSES, "merges": {}},
        "train": {"unet": {"block_out_channels": [8, 16], "cross_attention": [False, True], "norm_num_groups": 4,
                           "attention_head_dim": 2}},
        "sample": {"count": 5, "steps": 2, "batch_size": batch_size, "per_finding": 1},
    })


def test_sampling_writes_each_batch_as_it_is_generated_and_keeps_only_the_figure_images(tmp_path, data, model_dir,
                                                                                          monkeypatch):
    generated_batches: list[list] = []
    events: list[str] = []
    original = sample_module.generate

    def spied(pipeline, conditions, params, seed, batch_size=None):
        assert len(conditions) <= params.sample.batch_size
        images = original(pipeline, conditions, params, seed, batch_size)
        generated_batches.append(images)
        events.append("generate")
        return images

    original_write = sample_module.SplitShardWriter.write
    monkeypatch.setattr(sample_module, "generate", spied)
    monkeypatch.setattr(sample_module.SplitShardWriter, "write",
                        lambda writer, record: events.append("write") or original_write(writer, record))
    monkeypatch.setattr(sample_module, "FIGURE_PAIRS", 4)
    kept = []
    original_grid = sample_module.originals_vs_generated
    monkeypatch.setattr(sample_module, "originals_vs_generated",
                        lambda originals, generated, findings, per_row=6: kept.append(len(generated)) or original_grid(
                            originals, generated, findings, per_row))
    metrics = sample_module.sample_branch(sample_params(2), "elixr", model_dir, data["prepared"], data["store"],
                                          tmp_path / "samples", tmp_path / "figures")
    written = PreparedImages(tmp_path / "samples", "test", channels=1)
    expected = [np.asarray(image) for batch in generated_batches for image in batch]
    assert [len(batch) for batch in generated_batches] == [2, 2, 1] and metrics["images"] == len(written) == 5
    assert events == ["generate", "write", "write"] * 2 + ["generate", "write"]  # written before the next batch
    for index, image in enumerate(expected):
        pixels = np.rint((written[index]["pixel_values"][0].numpy() + 1) * 127.5).astype(np.uint8)
        np.testing.assert_array_equal(pixels, image)
    assert max(kept) == 4

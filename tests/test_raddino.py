"""RadDINO distances as CheXGenBench computes them: its bytes, its extractor, torchmetrics' FID and KID.

The checkpoint here is a tiny DINOv2 saved the way microsoft/rad-dino is (config.json, preprocessor_config.json,
model.safetensors); the real architecture is checked on the meta device.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_diffusion.config import EvaluateConfig, changed
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.evaluation.raddino import (
    KID_SUBSETS, RESIZE, chexgenbench_bytes, load_raddino, raddino_distances, raddino_features, raddino_metrics,
)
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.rehearsal import standin_models
from test_inception import _Images

TINY = {**standin_models.RADDINO, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rad-dino")
    standin_models.write_raddino(folder, seed=3, config=TINY)
    return folder


def test_the_standin_config_is_rad_dino_a_dinov2_vit_b14_on_518_px_inputs():
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**standin_models.RADDINO))
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters * 4 - 346e6) < 1.5e6  # microsoft/rad-dino's model.safetensors: 346 MB of fp32
    assert (model.config.hidden_size, model.config.patch_size, model.config.image_size) == (768, 14, 518)
    assert 518 // 14 == 37  # the model card's 37 x 37 patch grid
    assert standin_models.RADDINO_PREPROCESSOR["crop_size"] == {"height": 518, "width": 518}


def test_bytes_are_chexgenbenchs_rgb_bilinear_299_then_truncated_uint8():
    images = _Images(3, seed=5)
    batch = chexgenbench_bytes(torch.stack([images[i]["pixel_values"] for i in range(3)]))
    assert batch.shape == (3, 3, RESIZE, RESIZE) and batch.dtype == torch.uint8
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 0], batch[:, 2])
    gray = ((images[1]["pixel_values"][0] + 1) * 127.5).round().to(torch.uint8).numpy()
    resized = np.asarray(Image.fromarray(gray).convert("RGB").resize((RESIZE, RESIZE), Image.BILINEAR))
    expected = (resized.astype(np.float32) / np.float32(255) * np.float32(255)).astype(np.uint8)  # truncation
    assert np.array_equal(batch[1].permute(1, 2, 0).numpy(), expected)


def test_features_are_the_cls_token_after_the_layer_norm_of_the_processed_bytes(checkpoint):
    raddino = load_raddino(str(checkpoint), CPU)
    images = _Images(5, seed=1)
    features = raddino_features(raddino, images, batch_size=2, description="test")
    assert features.shape == (5, 32) and features.dtype == np.float64
    pixels = torch.stack([images[i]["pixel_values"] for i in range(5)])
    inputs = raddino.processor(images=chexgenbench_bytes(pixels), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (5, 3, 28, 28)  # the checkpoint's own crop size
    with torch.no_grad():
        normed = raddino.model(**inputs).last_hidden_state  # Dinov2Model applies its final layer norm here
    np.testing.assert_allclose(features, normed[:, 0].numpy(), rtol=1e-5, atol=1e-6)  # the CLS row


class _Extractor(torch.nn.Module):
    """CheXGenBench's RadDinoFeatureExtractor, written from its description: processor, model, pooler_output."""

    def __init__(self, raddino):
        super().__init__()
        self.raddino = raddino

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.raddino.processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            return self.raddino.model(**inputs).pooler_output


def test_fd_and_kid_equal_torchmetrics_with_chexgenbenchs_extractor(checkpoint):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    raddino = load_raddino(str(checkpoint), CPU)
    real, generated = _Images(8, seed=0), _Images(8, seed=7, brightness=0.2)
    ours = raddino_distances(raddino_features(raddino, generated, 4, "g"), raddino_features(raddino, real, 4, "r"),
                             seed=0)
    extractor = _Extractor(raddino)
    fid = FrechetInceptionDistance(feature=extractor)
    kid = KernelInceptionDistance(feature=extractor, subset_size=8)  # min(n_generated, n_real), as CheXGenBench
    for images, is_real in ((real, True), (generated, False)):
        batch = chexgenbench_bytes(torch.stack([images[i]["pixel_values"] for i in range(len(images))]))
        fid.update(batch, real=is_real)
        kid.update(batch, real=is_real)
    assert ours["fd"] == pytest.approx(float(fid.compute()), rel=1e-3)
    assert ours["kid"] == pytest.approx(float(kid.compute()[0]), rel=1e-3, abs=1e-6)
    assert ours["fd"] > 0 and ours["kid_subset"] == 8 and ours["prdc_k"] == 5


def test_offline_every_raddino_value_is_null_with_how_to_enable_it():
    result = raddino_metrics(profile_section(EvaluateConfig), _Images(2, 0), _Images(2, 1), 0, CPU)
    assert {key: result[key] for key in ("fd", "kid", "precision", "recall", "density", "coverage")} == dict.fromkeys(
        ("fd", "kid", "precision", "recall", "density", "coverage"))
    assert "evaluate.raddino" in result["details"]["reason"] and "offline default" in result["details"]["reason"]


def test_configured_raddino_records_its_protocol(checkpoint):
    config = changed(profile_section(EvaluateConfig), raddino=str(checkpoint), inception_batch_size=3)
    result = raddino_metrics(config, _Images(6, 0, brightness=0.3), _Images(7, 1), 0, CPU)
    assert result["fd"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["coverage"] <= 1
    details = result["details"]
    assert (details["n_generated"], details["n_real"], details["kid_subset"], details["kid_subsets"],
            details["prdc_k"]) == (6, 7, 6, KID_SUBSETS, 5)
    assert "pooler_output" in details["features"] and "32-d" in details["features"]


def test_a_standin_is_named_as_one_in_the_details(checkpoint, tmp_path):
    import shutil

    from cxr_diffusion.assets.standin_marker import MARKER_NAME

    folder = tmp_path / "rad-dino"
    shutil.copytree(checkpoint, folder)
    (folder / MARKER_NAME).write_text(json.dumps({"standin": True}))
    config = changed(profile_section(EvaluateConfig), raddino=str(folder))
    assert "NOT RadDINO" in raddino_metrics(config, _Images(3, 0), _Images(3, 1), 0, CPU)["details"]["model"]


def test_a_folder_that_is_not_a_checkpoint_is_one_line_naming_the_param(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match="evaluate.raddino: .* could not be loaded as microsoft/rad-dino"):
        load_raddino(str(tmp_path), CPU)


def test_doctor_takes_a_dinov2_checkpoint_as_raddino_and_refuses_another_model(checkpoint, tmp_path):
    import shutil

    from cxr_diffusion.assets.catalog import RADDINO_PATTERNS, Asset, HubSource
    from cxr_diffusion.assets.content import check_hub_folder
    from cxr_diffusion.assets.download import AssetError

    folder = tmp_path / "external" / "rad-dino"
    shutil.copytree(checkpoint, folder)
    asset = Asset("raddino", "evaluate.raddino", "external/rad-dino",
                  HubSource("microsoft/rad-dino", None, allow_patterns=RADDINO_PATTERNS), ("evaluate@clip_text",))
    check_hub_folder(asset, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(AssetError, match="model_type is 'clip', not 'dinov2'"):
        check_hub_folder(asset, folder)

"""torchxrayvision DenseNet-121 backbone: parity with torchxrayvision 1.5.7, loading, class mapping, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr_diffusion.config import EvaluateConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.evaluation.xrv_densenet import PATHOLOGIES, XRVDenseNet121, class_scores, load_xrv_densenet
from cxr_diffusion.evaluation.xrv_metrics import _auroc, xrv_metrics
from oracle_weights import seeded_state

ORACLE = Path(__file__).parent / "fixtures" / "pretrained_oracle.safetensors"
MEMBERS = {"Infiltration": ("Infiltration",), "No Finding": ("No Finding",), "Nodule/Mass": ("Nodule", "Mass")}


def test_matches_torchxrayvision():
    oracle = load_file(str(ORACLE))
    model = XRVDenseNet121()
    model.load_state_dict(seeded_state(model))
    model = model.double().eval()
    pixel_values = oracle["xrv_images"].double() / 127.5 - 1.0  # our prepared-image range
    with torch.no_grad():
        features, logits = model(pixel_values)
    assert features.shape == (2, 1024) and logits.shape == (2, 18)
    assert (features - oracle["xrv_features"]).abs().max().item() < 1e-9
    assert (logits - oracle["xrv_logits"]).abs().max().item() < 1e-9


def test_rgb_input_is_averaged_to_gray():
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    assert torch.allclose(XRVDenseNet121.preprocess(x.expand(-1, 3, -1, -1)), XRVDenseNet121.preprocess(x), atol=1e-3)
    assert XRVDenseNet121.preprocess(x).shape == (1, 1, 224, 224)


def test_class_scores_take_the_max_over_merged_labels_and_skip_uncovered():
    logits = torch.zeros(2, len(PATHOLOGIES))
    logits[0, PATHOLOGIES.index("Mass")] = 3.0
    logits[1, PATHOLOGIES.index("Nodule")] = 2.0
    scores = class_scores(logits, MEMBERS)
    assert set(scores) == {"Infiltration", "Nodule/Mass"}
    assert scores["Nodule/Mass"].tolist() == [3.0, 2.0]


def test_auroc_perfect_and_random_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(200, 3))
    logits = np.zeros((200, len(PATHOLOGIES)))
    logits[:, PATHOLOGIES.index("Infiltration")] = labels[:, 0] + 0.1 * rng.random(200)
    logits[:, PATHOLOGIES.index("Nodule")] = rng.random(200)  # unrelated to the Nodule/Mass labels
    result = _auroc(labels, logits, MEMBERS)
    assert result["Infiltration"] == 1.0 and abs(result["Nodule/Mass"] - 0.5) < 0.1 and "No Finding" not in result


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xrv") / "xrv.safetensors"
    state = {k: v.float() for k, v in seeded_state(XRVDenseNet121()).items()}
    state["op_threshs"] = torch.full((18,), 0.5)  # present in torchxrayvision's pretrained state dicts
    save_file(state, str(path))
    return path


def test_load_ignores_operating_points_and_rejects_other_networks(weights, tmp_path):
    assert isinstance(load_xrv_densenet(weights, torch.device("cpu")), XRVDenseNet121)
    state = load_file(str(weights))
    state["classifier.weight"] = state["classifier.weight"][:14]
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(ValueError, match=r"wrong\.safetensors.*wrong shape"):
        load_xrv_densenet(wrong, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="torchxrayvision"):
        load_xrv_densenet(tmp_path / "missing.safetensors", torch.device("cpu"))


class _Images(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int):
        self.images = torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index]}


def test_metrics_null_with_reason_offline_and_complete_with_weights(weights):
    labels = np.tile(np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]]), (2, 1))
    args = (MEMBERS, _Images(8, 0), labels, _Images(8, 1), labels, _Images(6, 2), 0)
    offline = xrv_metrics(profile_section(EvaluateConfig), *args, torch.device("cpu"))
    assert offline["fd"] is None and "evaluate.xrv_weights" in offline["reason"]
    config = profile_section(EvaluateConfig, xrv_weights=str(weights), bootstrap=10, inception_batch_size=4)
    result = xrv_metrics(config, *args, torch.device("cpu"))
    assert result["fd"] > 0 and result["matched_size"] == 7 and result["classes_not_covered"] == ["No Finding"]
    assert set(result["auroc_vs_requested_labels"]) == {"Infiltration", "Nodule/Mass"}
    assert result["fd_95ci"][0] <= result["fd_95ci"][1]

"""Inception-v3 for FID: parity with torch-fidelity and torchvision, loading rules, and FID on known cases.

The parity fixture (tests/fixtures/pretrained_oracle.safetensors) holds what torch-fidelity 0.4.0 and
torchvision 0.29.1 computed for fixed images with the deterministic weights of
tests/oracle_weights.py; tests/fixtures/make_pretrained_oracle.py rebuilds it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cxr_diffusion.cli import app
from cxr_diffusion.config import EvaluateConfig, changed
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.evaluation.inception_conversion import convert_inception_weights
from cxr_diffusion.evaluation.inception import (
    InceptionSpec, InceptionV3, load_inception, resize_like_tensorflow1,
)
from cxr_diffusion.evaluation.inception_fid import frechet_inception_distance, reference_compatible_fid, standard_fid
from oracle_weights import seeded_state

ORACLE = Path(__file__).parent / "fixtures" / "pretrained_oracle.safetensors"


def _seeded(spec: InceptionSpec) -> InceptionV3:
    model = InceptionV3(spec)
    model.load_state_dict(seeded_state(model), strict=False)
    return model.double().eval()


@pytest.fixture(scope="module")
def oracle() -> dict[str, torch.Tensor]:
    return load_file(str(ORACLE))


@pytest.mark.parametrize("spec, key, tolerance", [
    # torch-fidelity returns float32 features, hence the looser bound for the FID flavour (relative ~2e-7).
    (InceptionSpec("fid", "pool"), "fid_pool", 1e-5),
    (InceptionSpec("fid", "logits"), "fid_logits", 1e-5),
    (InceptionSpec("torchvision", "pool", transform_input=True), "tv_pool_transform_input", 1e-9),
    (InceptionSpec("torchvision", "logits", transform_input=True), "tv_logits_transform_input", 1e-9),
    (InceptionSpec("torchvision", "logits", transform_input=False), "tv_logits_plain", 1e-9),
])
def test_matches_torch_fidelity_and_torchvision(oracle, spec, key, tolerance):
    with torch.no_grad():
        ours = _seeded(spec)(oracle["images"])
    assert ours.shape == oracle[key].shape
    assert (ours - oracle[key]).abs().max().item() < tolerance


def test_flavours_differ_where_the_tf_graph_does(oracle):
    """The FID flavour's pools really differ from torchvision's (else parity above would prove less)."""
    fid = _seeded(InceptionSpec("fid", "pool"))
    tv = InceptionV3(InceptionSpec("torchvision", "pool"))
    tv.load_state_dict({k: v for k, v in fid.state_dict().items() if not k.startswith("fc.")}, strict=False)
    x = fid.preprocess(oracle["images"])
    with torch.no_grad():
        assert (fid.pool_features(x) - tv.double().eval().pool_features(x)).abs().max() > 1e-3


def test_grayscale_equals_replicated_rgb():
    model = _seeded(InceptionSpec("fid", "pool"))
    gray = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(gray), model(gray.expand(-1, 3, -1, -1)))


def test_rejects_float_and_wrong_channel_inputs():
    model = InceptionV3(InceptionSpec("fid", "pool"))
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="1 or 3"):
        model(torch.zeros(1, 2, 32, 32, dtype=torch.uint8))


def test_tensorflow1_resize_has_no_half_pixel_offset():
    # TF1 samples source = target * in/out: 2 -> 4 gives 0, 0.5, 1, 1 (the last clamps to the edge).
    row = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert resize_like_tensorflow1(row, 4)[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.0]
    same = torch.rand(1, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resize_like_tensorflow1(same, 7), same)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    """Seeded weights of both flavours as safetensors (float32), and the FID flavour as a .pth checkpoint."""
    root = tmp_path_factory.mktemp("inception")
    files = {}
    for flavour in ("fid", "torchvision"):
        state = {k: v.float() for k, v in seeded_state(InceptionV3(InceptionSpec(flavour, "pool"))).items()}
        save_file(state, str(root / f"{flavour}.safetensors"))
        files[flavour] = root / f"{flavour}.safetensors"
        if flavour == "fid":
            torch.save({"state_dict": {**state, "AuxLogits.fc.weight": torch.zeros(2, 2)}}, root / "fid.pth")
            files["fid_pth"] = root / "fid.pth"
    return files


def test_load_errors_name_the_file(weight_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="convert"):
        load_inception(tmp_path / "missing.safetensors", InceptionSpec("fid", "pool"), torch.device("cpu"))
    with pytest.raises(ValueError, match="1000 classes but flavour 'fid' needs 1008"):
        load_inception(weight_files["torchvision"], InceptionSpec("fid", "pool"), torch.device("cpu"))
    state = load_file(str(weight_files["fid"]))
    del state["Mixed_7c.branch_pool.conv.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(ValueError, match=r"broken\.safetensors.*1 missing keys"):
        load_inception(broken, InceptionSpec("fid", "pool"), torch.device("cpu"))


def test_convert_weights_from_pth_round_trips(weight_files, tmp_path):
    target = tmp_path / "out" / "fid.safetensors"
    result = CliRunner().invoke(app, ["convert-weights", str(weight_files["fid_pth"]), str(target), "--flavour", "fid"])
    assert result.exit_code == 0, result.output
    assert "evaluate.inception_weights" in result.output
    converted = load_file(str(target))
    assert "AuxLogits.fc.weight" not in converted
    original = load_file(str(weight_files["fid"]))
    assert all(torch.equal(converted[k], original[k]) for k in original)


def test_convert_weights_refuses_code_and_wrong_flavour(weight_files, tmp_path):
    pickled = tmp_path / "code.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": functools.partial(print, "ran")}, pickled)
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        convert_inception_weights(pickled, tmp_path / "never.safetensors", "fid")
    result = CliRunner().invoke(app, ["convert-weights", str(weight_files["fid"]), str(tmp_path / "x.safetensors"),
                                      "--flavour", "torchvision"])
    assert result.exit_code == 2 and "1008 classes" in result.output
    assert not (tmp_path / "never.safetensors").exists() and not (tmp_path / "x.safetensors").exists()


class _Images(torch.utils.data.Dataset):
    """PreparedImages-like items: pixel_values in [-1, 1], (3, 32, 32)."""

    def __init__(self, count: int, seed: int, brightness: float = 0.0):
        generator = torch.Generator().manual_seed(seed)
        y = torch.linspace(-1, 1, 32)[:, None]
        base = torch.stack([torch.sin(3 * y + torch.rand(1, generator=generator) * 6) * torch.cos(
            torch.linspace(0, 3, 32) * torch.rand(1, generator=generator) * 4) for _ in range(count)])
        self.images = (base * 0.6 + brightness).clamp(-1, 1)[:, None].expand(-1, 3, -1, -1)
        self.images = ((self.images + 1) * 127.5).round() / 127.5 - 1  # exactly representable as uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index]}


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift(weight_files):
    model = load_inception(weight_files["fid"], InceptionSpec("fid", "pool"), torch.device("cpu"))
    real = _Images(12, seed=0)
    same = frechet_inception_distance(model, real, real, 6, torch.device("cpu"), "test")
    shifted = frechet_inception_distance(model, _Images(12, seed=0, brightness=0.4), real, 6,
                                         torch.device("cpu"), "test")
    assert abs(same) < 1e-2 and shifted > 100 * max(abs(same), 1e-3)


def test_fid_results_record_settings_or_the_reason(weight_files):
    offline = profile_section(EvaluateConfig)
    missing = standard_fid(offline, _Images(4, 0), _Images(4, 1), 32, torch.device("cpu"))
    assert missing["value"] is None and "evaluate.inception_weights" in missing["reason"]
    assert "reference_inception_weights" in reference_compatible_fid(offline, _Images(4, 0), _Images(4, 1), 32, torch.device("cpu"))["reason"]

    config = changed(offline, inception_weights=str(weight_files["fid"]),
                                 reference_inception_weights=str(weight_files["torchvision"]),
                                 reference_fid_train_images=5, inception_batch_size=4)
    standard = standard_fid(config, _Images(6, 0), _Images(7, 1), 32, torch.device("cpu"))
    assert standard["value"] > 0 and standard["n_real"] == 7 and standard["n_generated"] == 6
    assert "2048" in standard["features"] and len(standard["weights_sha256"]) == 64
    reference = reference_compatible_fid(config, _Images(6, 0), _Images(9, 2), 32, torch.device("cpu"))
    assert reference["value"] > 0 and reference["n_real"] == 5 and "1000-class logits" in reference["features"]

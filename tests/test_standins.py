"""`cxr-diffusion standins`: random-weight stand-ins of nih-512's assets in their real architectures and formats,
labelled, loaded by the pipeline's loaders, kept when complete, never written over a real asset, reported by
`doctor` and replaced by `fetch`.

The real architectures are checked on the meta device (configs and parameter counts); what is built and loaded
here uses tiny CLIP and VAE towers (the one override the builders take, for tests). The evaluation networks are
small enough to build at their real size. The NIH folder builder has its own tests; here it is a fake that
writes a small NIH layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import make_nih_download, nih_row
from cxr_diffusion.assets import catalog, download
from cxr_diffusion.cli import app
from cxr_diffusion.conditioning.elixr_files import scan_elixr_source
from cxr_diffusion.config import ClipConfig, ElixrConfig
from cxr_diffusion.params_file import load_params
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.evaluation.inception import InceptionSpec, InceptionV3, load_inception
from cxr_diffusion.evaluation.xrv_densenet import XRVDenseNet121, load_xrv_densenet
from cxr_diffusion.rehearsal import nih_folder, standin_elixr, standin_models, standin_weights
from cxr_diffusion.assets.standin_marker import read_standin, sidecar_path
from cxr_diffusion.rehearsal.standins import Overrides, StandinError, make_standins
from test_fetch import ALL, FakeHub, FakeUrl, write_params

runner = CliRunner()
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY = Overrides(clip_config=standin_models.clip_config(text=TINY_TOWER, vision=TINY_TOWER, projection_dim=16),
                 vae_config={**standin_models.SD_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
                 raddino_config={**standin_models.RADDINO, "hidden_size": 32, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "image_size": 28})
FOLDERS = {"clip": "external/clip-vit-large-patch14", "vae": "external/sd-vae-ft-mse",
           "elixr": "external/nih-cxr14-elixr", "raddino": "external/rad-dino"}
FILES = {"inception_fid": "external/weights/pt_inception-2015-12-05.safetensors",
         "inception_torchvision": "external/weights/inception_v3_torchvision.safetensors",
         "xrv_densenet": "external/weights/xrv-densenet121-res224-all.safetensors"}
NIH_IDS = [f"{n:08d}_000.png" for n in range(1, 21)]  # the fake NIH metadata; the first four have images
ONLY_XRV = {"clip.model": "demo", "train.space": "pixel", "elixr.path": None, "evaluate.inception_weights": None,
            "evaluate.reference_inception_weights": None, "evaluate.raddino": None, "dataset.source": "phantom"}


def fake_nih_folder(root, include_list, count=32, seed=0, image_size=1024, progress=True, classes=None) -> dict:
    """build_nih_folder's contract, small: an NIH layout whose first ``count`` metadata ids have images."""
    root = Path(root)
    if (root / "STANDIN.json").is_file():
        return {"root": str(root), "ids": NIH_IDS[:count], "skipped": True}
    rows = [nih_row(name, patient=i + 1) for i, name in enumerate(NIH_IDS)]
    images = {name: b"\x89PNG stand-in" for name in NIH_IDS[:count]}
    make_nih_download(root, rows, images)
    (root / "STANDIN.json").write_text(json.dumps({"format": 1, "ids": NIH_IDS[:count]}))
    return {"root": str(root), "ids": NIH_IDS[:count], "skipped": False}


def rehearsal_root(root: Path, overrides: dict | None = None) -> Path:
    write_params(root, {"dataset.nih_root": "nih", **(overrides or {})})
    return root


def build(root: Path, monkeypatch, **kwargs):
    monkeypatch.setattr(nih_folder, "build_nih_folder", fake_nih_folder)
    params = load_params(root / "params.yaml")
    return make_standins(params, root, **{"images": 4, "progress": False, "echo": lambda line: None,
                                          "overrides": TINY, **kwargs})


@pytest.fixture(scope="module")
def standins_root(tmp_path_factory) -> tuple[Path, list]:
    """A root where every nih-512 stand-in was made once (tiny CLIP and VAE, real-size evaluation networks)."""
    root = rehearsal_root(tmp_path_factory.mktemp("standins"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        results = build(root, monkeypatch)
    return root, results


@pytest.fixture
def fresh_root(standins_root, tmp_path) -> Path:
    """A copy of the module's stand-ins, for tests that change them."""
    shutil.copytree(standins_root[0], tmp_path / "root")
    return tmp_path / "root"


# ----------------------------------------------------------------------------- the real architectures

def test_clip_config_is_vit_l14_with_the_real_token_ids():
    config = standin_models.clip_config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.max_position_embeddings, text.vocab_size, text.hidden_act) == (768, 12, 12, 3072, 77, 49408,
                                                                                "quick_gelu")
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (0, 2, 1)  # as openai's config.json
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size, vision.hidden_act) == (1024, 24, 16, 4096, 224, 14, "quick_gelu")
    assert config.projection_dim == 768
    assert standin_models.clip_parameter_count(config) == 427_616_513  # CLIP ViT-L/14: 427.6M


def test_vae_config_is_sd_vae_ft_mse_and_maps_512_px_to_64_by_64_by_4():
    config = standin_models.SD_VAE
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["latent_channels"] == 4
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4
    assert config["up_block_types"] == ["UpDecoderBlock2D"] * 4
    assert (config["layers_per_block"], config["norm_num_groups"], config["act_fn"], config["sample_size"],
            config["scaling_factor"]) == (2, 32, "silu", 256, 0.18215)
    assert standin_models.vae_parameter_count(config) == 83_653_863  # the SD VAE: 83.7M
    assert 512 // 2 ** (len(config["block_out_channels"]) - 1) == 64


# ----------------------------------------------------------------------------- CLIP

def test_the_tokenizer_pads_every_prompt_to_77_tokens_with_the_end_token_as_clips(tmp_path):
    prompts = standin_models.prompt_corpus(profile_section(ClipConfig))
    tokenizer = standin_models.write_clip_tokenizer(tmp_path, prompts, 49408, 77)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (bos, eos) == (len(vocab) - 2, len(vocab) - 1)  # last, as 49406 / 49407 in the real vocabulary
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    encoded = tokenizer(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert all(len(ids) == 77 and ids[0] == bos and ids[-1] == eos for ids in encoded)
    effusion = tokenizer.convert_ids_to_tokens(tokenizer("chest x-ray showing effusion")["input_ids"])
    assert effusion == ["<|startoftext|>", "chest</w>", "x</w>", "-</w>", "ray</w>", "showing</w>", "effusion</w>",
                        "<|endoftext|>"]


def test_vocab_json_and_merges_txt_alone_tokenize_as_tokenizer_json(tmp_path):
    from transformers import CLIPTokenizer

    prompts = standin_models.prompt_corpus(profile_section(ClipConfig))
    (tmp_path / "full").mkdir()
    (tmp_path / "slow").mkdir()
    standin_models.write_clip_tokenizer(tmp_path / "full", prompts, 49408, 77)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tmp_path / "full" / name, tmp_path / "slow" / name)
    texts = prompts + ["Chest X-Ray showing Pleural_Thickening, 3 masses!"]
    full = CLIPTokenizer.from_pretrained(tmp_path / "full")(texts, padding="max_length", max_length=77)["input_ids"]
    slow = CLIPTokenizer.from_pretrained(tmp_path / "slow")(texts, padding="max_length", max_length=77)["input_ids"]
    assert full == slow


def test_the_clip_standin_loads_with_the_pipeline_loaders_in_its_shapes(standins_root):
    from cxr_diffusion.conditioning.clip import load_text_encoder, load_vision_encoder

    folder = standins_root[0] / FOLDERS["clip"]
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "merges.txt",
                                                   "tokenizer.json", "tokenizer_config.json",
                                                   "preprocessor_config.json", "STANDIN.json"}
    label = json.loads((folder / "STANDIN.json").read_text())
    assert label["check"] == {"text_tokens": [77, 32], "image_embedding": [1, 16], "prompt_tokens": 10}
    assert load_text_encoder(str(folder)).shape == (77, 32) and load_vision_encoder(str(folder)).shape == (1, 16)
    processor = load_vision_encoder(str(folder)).processor  # from the published (older) preprocessor format
    assert processor.size["shortest_edge"] == 224 and (processor.crop_size["height"], processor.crop_size["width"]) \
        == (224, 224)


def test_the_vae_standin_loads_with_load_vae_and_gives_64_by_64_latents(standins_root):
    from cxr_diffusion.diffusion.latents import load_vae

    folder = standins_root[0] / FOLDERS["vae"]
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors", "STANDIN.json"}
    assert json.loads((folder / "STANDIN.json").read_text())["check"]["latent_shape"] == [4, 64, 64]
    vae = load_vae(str(folder))
    assert vae.config.scaling_factor == 0.18215 and vae.config.latent_channels == 4


# ----------------------------------------------------------------------------- ELIXR

def test_elixr_snapshot_is_the_published_layout_read_by_the_pipeline(tmp_path):
    ids = [f"{n:08d}_000.png" for n in range(1, 15)]
    standin_elixr.write_elixr_snapshot(tmp_path, ids, seed=0, what="test", progress=False)
    index = json.loads((tmp_path / "datasets.json").read_text())
    assert index["datasets"]["elixrb"]["img_emb"]["type"] == "dataset" and index["info"]["standin"] is True
    shards = sorted((tmp_path / "elixrb" / "img_emb").iterdir(), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert [p.name for p in shards] == [f"img_emb_{n}.h5" for n in range(1, 13)]
    with h5py.File(shards[0], "r") as handle:
        assert handle["Image Index"][0] == b"00000001_000.png"
        assert handle["img_emb"].dtype == np.float32 and handle["img_emb"].shape[1:] == (32, 768)
    source = scan_elixr_source(profile_section(ElixrConfig, path=str(tmp_path)))
    assert source.layout == "snapshot" and sorted(i for f in source.files for i in f.image_ids) == ids
    assert {f.shape for f in source.files} == {(32, 768)}


def test_an_image_keeps_its_elixr_embedding_whatever_the_other_ids(tmp_path):
    first = standin_elixr.image_embedding("00000001_000.png", seed=0)
    assert np.array_equal(first, standin_elixr.image_embedding("00000001_000", seed=0))  # the id, with or without .png
    assert not np.array_equal(first, standin_elixr.image_embedding("00000001_000.png", seed=1))
    assert not np.array_equal(first, standin_elixr.image_embedding("00000002_000.png", seed=0))


def test_the_elixr_standin_holds_the_nih_folders_images_and_a_few_others(standins_root):
    root, _ = standins_root
    label = json.loads((root / FOLDERS["elixr"] / "STANDIN.json").read_text())
    source = scan_elixr_source(profile_section(ElixrConfig, path=str(root / FOLDERS["elixr"])))
    held = {i for f in source.files for i in f.image_ids}
    assert set(NIH_IDS[:4]) <= held and label["rehearsal_images"] == 4
    others = held - set(NIH_IDS[:4])
    assert len(others) == 8 and others <= set(NIH_IDS[4:]) and sorted(others) == label["other_images"]


# ----------------------------------------------------------------------------- evaluation weights

@pytest.mark.parametrize("flavour, classes", [("fid", 1008), ("torchvision", 1000)])
def test_inception_published_state_is_what_the_published_file_holds(flavour, classes):
    state = standin_weights.published_inception_state(flavour, seed=0)
    assert state["fc.weight"].shape == (classes, 2048)
    aux = [k for k in state if k.startswith("AuxLogits.")]
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    if flavour == "torchvision":  # torchvision's inception_v3 keeps its auxiliary head and BN counters
        assert state["AuxLogits.fc.weight"].shape == (1000, 768) and counters
    else:
        assert aux == [] and counters == []
    model_keys = set(InceptionV3(InceptionSpec(flavour, "pool")).state_dict())
    assert {k for k in state if not k.startswith("AuxLogits.")} - model_keys == set()


@pytest.mark.parametrize("name, flavour", [("inception_fid", "fid"), ("inception_torchvision", "torchvision")])
def test_inception_standins_are_converted_by_convert_weights_and_load(standins_root, name, flavour):
    target = standins_root[0] / FILES[name]
    assert isinstance(load_inception(target, InceptionSpec(flavour, "pool"), torch.device("cpu")), InceptionV3)
    with safe_open(str(target), "pt") as handle:
        metadata = handle.metadata()
        assert not any(key.startswith("AuxLogits.") for key in handle.keys())
    assert metadata["flavour"] == flavour and len(metadata["source_sha256"]) == 64  # written by convert-weights
    assert json.loads(metadata["standin"])["warning"] == "random weights, NOT the real model"
    published = {"fid": catalog.FID_INCEPTION, "torchvision": catalog.TORCHVISION_INCEPTION}[flavour].filename
    assert json.loads(sidecar_path(target).read_text())["published_as"] == published


def test_the_xrv_standin_is_a_torchxrayvision_state_dict_that_loads(standins_root):
    target = standins_root[0] / FILES["xrv_densenet"]
    with safe_open(str(target), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("op_threshs").shape == (18,)
    assert keys >= set(XRVDenseNet121().state_dict())  # with its BN counters, as state_dict() saves them
    assert isinstance(load_xrv_densenet(target, torch.device("cpu")), XRVDenseNet121)


def test_random_weights_are_seeded_and_give_non_degenerate_features():
    model = XRVDenseNet121()
    first, again = standin_weights.random_state(model, 3), standin_weights.random_state(model, 3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    model.load_state_dict(first)
    with torch.no_grad():
        features, _ = model.eval()(torch.rand(2, 1, 64, 64) * 2 - 1)
    assert torch.isfinite(features).all() and features.std() > 0


# ----------------------------------------------------------------------------- labels, reuse, refusal

def test_every_standin_is_labelled_with_what_it_is_and_how_it_was_made(standins_root):
    root, results = standins_root
    assert [r.name for r in results] == ["nih_folder", *ALL] and {r.action for r in results} == {"made"}
    labels = {name: read_standin(root / path) for name, path in {**FOLDERS, **FILES}.items()}
    assert {p.name for p in (root / "external" / "weights").iterdir() if p.name.endswith(".standin.json")} == \
        {Path(path).name + ".standin.json" for path in FILES.values()}
    for name, label in labels.items():
        assert label["complete"] and label["standin"] is True and label["seed"] == 0, name
        assert label["made_by"].startswith("cxr-diffusion standins") and label["architecture"], name
        assert "NOT the real" in label["warning"] and label["asset"] == name
    assert labels["clip"]["parameters"] == 1_645_985 and labels["vae"]["architecture"]["latent_channels"] == 4


def test_a_second_run_keeps_every_complete_standin(fresh_root, monkeypatch):
    before = {path: (fresh_root / path / "STANDIN.json").stat().st_mtime_ns for path in FOLDERS.values()}
    results = build(fresh_root, monkeypatch)
    assert {r.action for r in results} == {"kept"}
    assert before == {path: (fresh_root / path / "STANDIN.json").stat().st_mtime_ns for path in FOLDERS.values()}


def test_another_seed_rebuilds_the_standins(fresh_root, monkeypatch):
    old = hashlib.sha256((fresh_root / FILES["xrv_densenet"]).read_bytes()).hexdigest()
    results = build(fresh_root, monkeypatch, seed=1)
    assert {r.action for r in results if r.name != "nih_folder"} == {"made"}
    assert hashlib.sha256((fresh_root / FILES["xrv_densenet"]).read_bytes()).hexdigest() != old
    assert read_standin(fresh_root / FILES["xrv_densenet"])["seed"] == 1


def test_a_file_standin_killed_before_its_sidecar_is_rebuilt_not_refused(fresh_root, monkeypatch):
    target = fresh_root / FILES["inception_fid"]
    sidecar_path(target).unlink()
    assert read_standin(target)["complete"] is False  # still a stand-in, by its own metadata
    results = {r.name: r.action for r in build(fresh_root, monkeypatch)}
    assert results["inception_fid"] == "made" and results["xrv_densenet"] == "kept"
    assert read_standin(target)["complete"] is True


def test_it_refuses_to_overwrite_a_real_asset_and_makes_nothing(tmp_path, monkeypatch):
    root = rehearsal_root(tmp_path)
    real = root / FOLDERS["vae"]
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    with pytest.raises(StandinError, match=r"external/sd-vae-ft-mse \(train.vae\) holds a real asset"):
        build(root, monkeypatch)
    assert not (root / "nih").exists() and not (root / FOLDERS["clip"]).exists()


def test_a_real_file_placed_over_a_standin_is_a_real_asset(fresh_root, monkeypatch):
    target = fresh_root / FILES["xrv_densenet"]
    save_file({k: v.contiguous() for k, v in XRVDenseNet121().state_dict().items()}, str(target))
    assert read_standin(target) is None  # its stale sidecar names another sha256 and it has no label inside
    with pytest.raises(StandinError, match=r"res224-all.safetensors \(evaluate.xrv_weights\) holds a real asset"):
        build(fresh_root, monkeypatch)


def test_a_param_that_is_the_hub_id_is_refused(tmp_path, monkeypatch):
    root = rehearsal_root(tmp_path, {"clip.model": "openai/clip-vit-large-patch14"})
    with pytest.raises(StandinError, match="clip.model names the hub id itself"):
        build(root, monkeypatch)


def test_the_elixr_standin_needs_the_nih_folder(tmp_path, monkeypatch):
    root = rehearsal_root(tmp_path, {**ONLY_XRV, "elixr.path": "external/nih-cxr14-elixr"})
    with pytest.raises(StandinError, match="needs dataset.source: nih"):
        build(root, monkeypatch)


# ----------------------------------------------------------------------------- the command

def test_the_command_prints_what_it_made_and_keeps_it_on_a_rerun(tmp_path):
    root = rehearsal_root(tmp_path, ONLY_XRV)
    result = runner.invoke(app, ["standins", "--root", str(root), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "xrv_densenet  external/weights/xrv-densenet121-res224-all.safetensors  made" in result.output
    assert "28.2" in result.output and "7.0M parameters" in result.output
    assert read_standin(root / FILES["xrv_densenet"])["made_by"] == "cxr-diffusion standins --images 32 --seed 2"
    again = runner.invoke(app, ["standins", "--root", str(root), "--seed", "2"])
    assert again.exit_code == 0 and "kept" in again.output


def test_the_command_refuses_a_real_asset_in_one_line_with_exit_2(tmp_path):
    root = rehearsal_root(tmp_path, ONLY_XRV)
    target = root / FILES["xrv_densenet"]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"the real weights")
    result = runner.invoke(app, ["standins", "--root", str(root)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: {target} (evaluate.xrv_weights) holds a real asset (files and no "
        "xrv-densenet121-res224-all.safetensors.standin.json): `cxr-diffusion standins` never overwrites one; move it "
        "away or point evaluate.xrv_weights at another path"]
    assert target.read_bytes() == b"the real weights"


# ----------------------------------------------------------------------------- doctor and fetch

def test_doctor_reports_every_standin_with_the_fix(standins_root):
    result = runner.invoke(app, ["doctor", "--root", str(standins_root[0])])
    assert result.exit_code == 2
    assert result.output.count(": stand-in (random weights): ") == 7
    assert "clip (clip.model): stand-in (random weights): external/clip-vit-large-patch14 was made by " \
           "`cxr-diffusion standins --images 4 --seed 0`: random weights, NOT the real model" in result.output
    assert result.output.count("fix: run `cxr-diffusion fetch` for the real one") == 6
    assert "fix: place the real one by hand over it" in result.output  # the DenseNet: fetch cannot download it
    assert "7 of them are stand-ins with random weights" in result.output


def published_files(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """Published-format Inception checkpoints, pinned in the catalog (the real pins are for the real files)."""
    files = {}
    for name, flavour in (("FID_INCEPTION", "fid"), ("TORCHVISION_INCEPTION", "torchvision")):
        source = getattr(catalog, name)
        path = tmp_path / source.filename
        torch.save(standin_weights.published_inception_state(flavour, seed=9), path)
        monkeypatch.setattr(catalog, name, dataclasses.replace(
            source, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
        files[source.url] = path
    return files


def test_fetch_replaces_standins_with_the_real_assets(fresh_root, tmp_path, monkeypatch):
    urls = published_files(tmp_path, monkeypatch)
    monkeypatch.setattr(download, "hub_snapshot", FakeHub(tmp_path / "hf-cache"))
    monkeypatch.setattr(download, "url_download", FakeUrl(urls))
    result = runner.invoke(app, ["fetch", "--root", str(fresh_root)])
    assert result.exit_code == 2  # the DenseNet stand-in can only be replaced by hand
    assert "xrv_densenet: could not place it: external/weights/xrv-densenet121-res224-all.safetensors is a stand-in" \
        in result.output
    for name, path in FOLDERS.items():
        assert read_standin(fresh_root / path) is None and (fresh_root / path / "config.json").is_file(), name
        assert not (fresh_root / path / "STANDIN.json").exists()
        assert f"{name}: fetched into {path}, replacing the stand-in; it was a stand-in (random weights), so rerun " \
               "what read it: dvc repro -f -s" in result.output
    for name in ("inception_fid", "inception_torchvision"):
        target = fresh_root / FILES[name]
        assert read_standin(target) is None and not sidecar_path(target).exists(), name
    assert sorted(p.name for p in (fresh_root / "external").iterdir() if p.name.startswith(".")) == []
    doctor = runner.invoke(app, ["doctor", "--root", str(fresh_root)])
    assert doctor.output.count(": present:") == 6 and "xrv_densenet (evaluate.xrv_weights): stand-in" in doctor.output


def test_offline_fetch_leaves_the_standins_in_place(fresh_root, monkeypatch):
    monkeypatch.setattr(download, "hub_snapshot", FakeHub(fresh_root / "hf-cache", fail=LocalEntryNotFoundError(
        "Got: ConnectError: [Errno -2] Name or service not known")))
    monkeypatch.setattr(download, "url_download", FakeUrl({}, fail=OSError("Name or service not known")))
    result = runner.invoke(app, ["fetch", "--root", str(fresh_root)])
    assert result.exit_code == 2 and "Could not place 7 of 7 assets" in result.output
    for path in [*FOLDERS.values(), *FILES.values()]:
        assert read_standin(fresh_root / path)["complete"], path


def test_record_present_never_records_a_standin(fresh_root):
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(fresh_root)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if ": could not place it: " in line]
    assert len(lines) == 7 and all("NOT the real" in line and "records only real assets" in line for line in lines)
    assert not (fresh_root / "external" / "assets.json").exists()


def test_a_real_densenet_placed_by_hand_over_the_standin_is_recorded_and_its_label_removed(fresh_root):
    write_params(fresh_root, {"dataset.nih_root": "nih", **ONLY_XRV})
    target = fresh_root / FILES["xrv_densenet"]
    save_file({k: v.contiguous() for k, v in XRVDenseNet121().state_dict().items()}, str(target))
    assert "xrv_densenet (evaluate.xrv_weights): unrecorded" in runner.invoke(
        app, ["doctor", "--root", str(fresh_root)]).output
    result = runner.invoke(app, ["fetch", "--root", str(fresh_root)])
    assert result.exit_code == 0, result.output
    assert not sidecar_path(target).exists()
    assert runner.invoke(app, ["doctor", "--root", str(fresh_root)]).exit_code == 0

"""`cxr-diffusion fetch` and `doctor`: assets placed, recorded, skipped, resumed, refused, listed offline, checked.

The hub and URL downloads are replaced by fakes that write small files (no test touches the network); the
published Inception checkpoints are stood in for by full-size state dicts of the right architecture, so the
real conversion to safetensors runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from typer.testing import CliRunner

from cxr_diffusion.assets import catalog, download
from cxr_diffusion.assets.catalog import needed_assets
from cxr_diffusion.assets.download import AssetError, url_download
from cxr_diffusion.cli import app
from cxr_diffusion.params_file import load_params
from cxr_diffusion.evaluation.inception import InceptionSpec, InceptionV3, load_inception
from cxr_diffusion.evaluation.xrv_densenet import XRVDenseNet121
from cxr_diffusion.profiles import profile_data, params_with

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
NO_WEIGHTS = {"evaluate.inception_weights": None, "evaluate.reference_inception_weights": None, "evaluate.raddino": None,
              "evaluate.xrv_weights": None}
HUB_ONLY = {"elixr.path": None, **NO_WEIGHTS}  # clip and vae: cheap to fake
ALL = ["clip", "vae", "elixr", "raddino", "inception_fid", "inception_torchvision", "xrv_densenet"]  # nih-512's assets


def write_params(root: Path, overrides: dict | None = None) -> Path:
    """The nih-512 profile as root/params.yaml, with dotted-key overrides."""
    raw = profile_data("nih-512")
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root / "params.yaml"


class FakeHub:
    """snapshot_download's contract: fills local_dir (or a cache folder), with the hub's hidden bookkeeping."""

    def __init__(self, cache: Path, fail: Exception | None = None, fill: Callable[[Path], None] | None = None):
        self.cache, self.fail, self.fill, self.calls = cache, fail, fill, []

    def __call__(self, repo_id, *, repo_type="model", revision=None, local_dir=None, allow_patterns=None,
                 local_files_only=False):
        self.calls.append({"repo_id": repo_id, "repo_type": repo_type, "revision": revision, "local_dir": local_dir,
                           "allow_patterns": allow_patterns, "local_files_only": local_files_only})
        folder = Path(local_dir) if local_dir is not None else self.cache / repo_id.replace("/", "--")
        if local_files_only:
            if not folder.is_dir():
                raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")
            return folder
        if self.fail is not None:
            raise self.fail
        folder.mkdir(parents=True, exist_ok=True)
        kind = ({"model_type": "clip"} if "clip" in repo_id else {"model_type": "dinov2"} if "rad-dino" in repo_id
                else {"_class_name": "AutoencoderKL"})
        (folder / "config.json").write_text(json.dumps({"repo": repo_id, "revision": revision, **kind}))
        (folder / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        (folder / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
        if repo_type == "dataset":
            (folder / "datasets.json").write_text("{}")
            (folder / "elixrb" / "img_emb").mkdir(parents=True, exist_ok=True)
            (folder / "elixrb" / "img_emb" / "img_emb_0.h5").write_bytes(b"\x89HDF stand-in")
        if self.fill is not None:  # the repository's real files, where a test needs them
            self.fill(folder)
        return folder


class FakeUrl:
    """url_download's contract: the published file at ``target`` when its sha256 is the pinned one."""

    def __init__(self, files: dict[str, Path], fail: Exception | None = None):
        self.files, self.fail, self.calls = files, fail, []

    def __call__(self, url, target, sha256):
        self.calls.append(url)
        if self.fail is not None:
            raise self.fail
        source = self.files[url]
        if hashlib.sha256(source.read_bytes()).hexdigest() != sha256:
            raise AssetError(f"{url}: not the pinned sha256")
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return Path(target)


def refuse(*args, **kwargs):
    raise AssertionError("no download may happen here")


def place_xrv_by_hand(root: Path) -> Path:
    target = root / "external" / "weights" / "xrv-densenet121-res224-all.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in XRVDenseNet121().state_dict().items()}, str(target))
    return target


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Stand-ins for the two published Inception checkpoints (right keys and shapes), by URL."""
    folder = tmp_path_factory.mktemp("published")
    files = {}
    for source in (catalog.FID_INCEPTION, catalog.TORCHVISION_INCEPTION):
        torch.manual_seed(0)
        path = folder / source.filename
        torch.save(InceptionV3(InceptionSpec(source.flavour, "pool")).state_dict(), path)
        files[source.url] = path
    return files


def pin_to(monkeypatch, published: dict[str, Path]) -> None:
    """Pin the catalog to the stand-in checkpoints' sha256 (the real pins are for the real files)."""
    for name in ("FID_INCEPTION", "TORCHVISION_INCEPTION"):
        source = getattr(catalog, name)
        digest = hashlib.sha256(published[source.url].read_bytes()).hexdigest()
        monkeypatch.setattr(catalog, name, dataclasses.replace(source, sha256=digest))


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, published) -> tuple[Path, str]:
    """A root where `fetch` placed all six nih-512 assets (xrv placed by hand first); and fetch's output."""
    root = tmp_path_factory.mktemp("fetched")
    write_params(root)
    place_xrv_by_hand(root)
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_to(monkeypatch, published)
        monkeypatch.setattr(download, "hub_snapshot", FakeHub(root / "hf-cache"))
        monkeypatch.setattr(download, "url_download", FakeUrl(published))
        result = runner.invoke(app, ["fetch", "--root", str(root)])
    assert result.exit_code == 0, result.output
    return root, result.output


# ----------------------------------------------------------------------------- what is needed

def test_the_default_profile_needs_no_asset_and_doctor_says_so(monkeypatch):
    monkeypatch.setattr(download, "hub_snapshot", refuse)
    monkeypatch.setattr(download, "url_download", refuse)
    assert needed_assets(params_with(profile="default"), REPO) == []
    for command in ("doctor", "fetch"):
        result = runner.invoke(app, [command, "--params", str(REPO / "params.yaml"), "--root", str(REPO)])
        assert result.exit_code == 0, result.output
        assert "need no external asset" in result.output


def test_nih_512_names_local_folders_under_external_for_every_asset():
    assets = needed_assets(params_with(profile="nih-512"), "/nonexistent-root")
    assert [a.name for a in assets] == ALL
    assert all(a.target.startswith("external/") for a in assets)
    assert [a.source.repo_id for a in assets[:3]] == ["openai/clip-vit-large-patch14", "stabilityai/sd-vae-ft-mse",
                                                      "Yasintuncer/nih-cxr14-elixr"]
    elixr = assets[2].source
    assert elixr.repo_type == "dataset" and elixr.allow_patterns == ("datasets.json", "elixrb/img_emb/*")


def test_pinned_sha256_are_full_digests_starting_with_the_prefix_in_the_file_name():
    for source in (catalog.FID_INCEPTION, catalog.TORCHVISION_INCEPTION):
        prefix = source.filename.removesuffix(".pth").rsplit("-", 1)[1]  # torch.hub's check_hash convention
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
        assert source.sha256.startswith(prefix) and source.url.endswith("/" + source.filename)


def test_a_param_that_is_the_hub_id_itself_means_the_hugging_face_cache(tmp_path, monkeypatch, tiny_clip_dir):
    write_params(tmp_path, {"clip.model": "openai/clip-vit-large-patch14", **HUB_ONLY})
    hub = FakeHub(tmp_path / "hf-cache", fill=lambda folder: shutil.copytree(tiny_clip_dir, folder, dirs_exist_ok=True))
    monkeypatch.setattr(download, "hub_snapshot", hub)
    clip = needed_assets(load_params(tmp_path / "params.yaml"), tmp_path)[0]
    assert clip.target is None and clip.source.in_cache
    result = runner.invoke(app, ["doctor", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "clip (clip.model): missing: not in the Hugging Face cache" in result.output
    assert runner.invoke(app, ["fetch", "--root", str(tmp_path)]).exit_code == 0
    downloads = [c for c in hub.calls if c["repo_id"] == "openai/clip-vit-large-patch14" and not c["local_files_only"]]
    assert len(downloads) == 1 and downloads[0]["local_dir"] is None  # the cache, not a folder
    (hub.cache / "openai--clip-vit-large-patch14" / "model.safetensors").rename(tmp_path / "weights")
    result = runner.invoke(app, ["doctor", "--root", str(tmp_path)])  # the cached snapshot lost its weights
    assert result.exit_code == 2 and "clip (clip.model): partial: in the Hugging Face cache" in result.output
    (tmp_path / "weights").rename(hub.cache / "openai--clip-vit-large-patch14" / "model.safetensors")
    result = runner.invoke(app, ["doctor", "--root", str(tmp_path)])
    assert result.exit_code == 0 and "in the Hugging Face cache" in result.output


# ----------------------------------------------------------------------------- fetch

def test_fetch_places_every_asset_and_records_it(fetched):
    root, output = fetched
    manifest = json.loads((root / "external" / "assets.json").read_text())["assets"]
    assert sorted(manifest) == sorted(ALL)
    assert set(manifest["clip"]["files"]) == {"config.json"}  # the hub's hidden .cache/ is not part of the asset
    assert set(manifest["elixr"]["files"]) == {"config.json", "datasets.json", "elixrb/img_emb/img_emb_0.h5"}
    assert manifest["vae"]["source"]["repo_id"] == "stabilityai/sd-vae-ft-mse"
    assert manifest["raddino"]["source"]["allow_patterns"] == ["config.json", "preprocessor_config.json",
                                                                 "model.safetensors"]  # not the DINO head
    assert "All 7 assets are in place" in output
    for name, flavour in (("pt_inception-2015-12-05", "fid"), ("inception_v3_torchvision", "torchvision")):
        target = root / "external" / "weights" / f"{name}.safetensors"
        assert isinstance(load_inception(target, InceptionSpec(flavour, "pool"), torch.device("cpu")), InceptionV3)
        recorded = manifest[f"inception_{flavour}"]["files"]["."]["sha256"]
        assert recorded == hashlib.sha256(target.read_bytes()).hexdigest()


def test_a_second_fetch_downloads_nothing(fetched, published, monkeypatch):
    root, _ = fetched
    pin_to(monkeypatch, published)
    monkeypatch.setattr(download, "hub_snapshot", refuse)
    monkeypatch.setattr(download, "url_download", refuse)
    result = runner.invoke(app, ["fetch", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert result.output.count("already in place") == 7


def test_doctor_passes_on_a_fetched_root(fetched, published, monkeypatch):
    root, _ = fetched
    pin_to(monkeypatch, published)
    result = runner.invoke(app, ["doctor", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert result.output.count(": present:") == 7 and "All 7 assets are present" in result.output


def test_weights_converted_from_the_pinned_file_before_are_recorded_without_a_download(fetched, published, tmp_path,
                                                                                       monkeypatch):
    root, _ = fetched
    write_params(tmp_path, {"clip.model": "demo", "train.space": "pixel", "elixr.path": None,
                            "evaluate.reference_inception_weights": None, "evaluate.raddino": None, "evaluate.xrv_weights": None})
    (tmp_path / "external" / "weights").mkdir(parents=True)
    shutil.copyfile(root / "external/weights/pt_inception-2015-12-05.safetensors",  # as `convert-weights` wrote it
                    tmp_path / "external/weights/pt_inception-2015-12-05.safetensors")
    pin_to(monkeypatch, published)
    monkeypatch.setattr(download, "url_download", refuse)
    result = runner.invoke(app, ["fetch", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "converted from the pinned pt_inception-2015-12-05-6726825d.pth before" in result.output


def test_offline_fetch_goes_on_and_lists_how_to_place_each_asset(tmp_path, monkeypatch):
    write_params(tmp_path)
    monkeypatch.setattr(download, "hub_snapshot", FakeHub(tmp_path / "hf-cache", fail=LocalEntryNotFoundError(
        "Got: ConnectError: [Errno -2] Name or service not known\nPlease check your internet connection")))
    monkeypatch.setattr(download, "url_download", FakeUrl({}, fail=urllib.error.URLError("Name or service not known")))
    result = runner.invoke(app, ["fetch", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "Could not place 7 of 7 assets" in result.output
    for expected in (
            ("hf download openai/clip-vit-large-patch14 --include '*.json' --include '*.txt' "
             "--include '*.safetensors' --local-dir external/clip-vit-large-patch14"),
            ("hf download stabilityai/sd-vae-ft-mse --include '*.json' --include '*.safetensors' "
             "--local-dir external/sd-vae-ft-mse"),
            ("hf download Yasintuncer/nih-cxr14-elixr --repo-type dataset --include datasets.json "
             "--include 'elixrb/img_emb/*' --local-dir external/nih-cxr14-elixr"),
            ("curl -L --create-dirs -o external/weights/pt_inception-2015-12-05-6726825d.pth https://github.com/"
             "mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"),
            "to:   external/weights/inception_v3_torchvision.safetensors (evaluate.reference_inception_weights)",
            "0cc3c7bd75056d25e46cba549dc184522069b81e9787eff6df84f397bd52a5ef",
            "xrv.models.DenseNet(weights=\"densenet121-res224-all\")",
            "Name or service not known"):
        assert expected in result.output, expected
    assert not (tmp_path / "external" / "assets.json").exists()


def test_an_interrupted_hub_download_is_never_recorded(tmp_path, monkeypatch):
    write_params(tmp_path, HUB_ONLY)

    def interrupted(repo_id, *, local_dir=None, **kwargs):
        (Path(local_dir) / ".cache" / "huggingface" / "download").mkdir(parents=True)
        (Path(local_dir) / "config.json").write_text("{}")
        (Path(local_dir) / ".cache" / "huggingface" / "download" / "model.safetensors.incomplete").write_bytes(b"12")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(download, "hub_snapshot", interrupted)
    assert runner.invoke(app, ["fetch", "--root", str(tmp_path)]).exit_code == 2
    doctor = runner.invoke(app, ["doctor", "--root", str(tmp_path)])
    assert doctor.exit_code == 2 and "clip (clip.model): partial" in doctor.output
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "records only what is in place" in result.output
    assert not (tmp_path / "external" / "assets.json").exists()


def test_fetch_refuses_weights_that_fail_the_pinned_sha256(tmp_path, monkeypatch):
    write_params(tmp_path, {"clip.model": "demo", "train.space": "pixel", "elixr.path": None,
                            "evaluate.reference_inception_weights": None, "evaluate.raddino": None, "evaluate.xrv_weights": None})
    monkeypatch.setattr(download, "_open", lambda url, offset: (io.BytesIO(b"<html>a login page</html>"), 25, False))
    result = runner.invoke(app, ["fetch", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "not the pinned 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2" in result.output
    assert list((tmp_path / "external" / "weights").iterdir()) == []  # neither the file nor a .part


def test_hand_placed_xrv_weights_are_checked_before_they_are_recorded(tmp_path):
    write_params(tmp_path, {"clip.model": "demo", "train.space": "pixel", "elixr.path": None,
                            "evaluate.inception_weights": None, "evaluate.reference_inception_weights": None,
                            "evaluate.raddino": None})
    target = tmp_path / "external" / "weights" / "xrv-densenet121-res224-all.safetensors"
    target.parent.mkdir(parents=True)
    save_file({"classifier.weight": torch.zeros(18, 1024)}, str(target))
    result = runner.invoke(app, ["fetch", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "not a torchxrayvision DenseNet-121 state dict" in result.output
    assert not (tmp_path / "external" / "assets.json").exists()


# ----------------------------------------------------------------------------- url_download

def serve(data: bytes, log: list, honour_range: bool = True):
    def _open(url, offset):
        log.append(offset)
        if offset and honour_range:
            return io.BytesIO(data[offset:]), len(data) - offset, True
        return io.BytesIO(data), len(data), False
    return _open


def test_url_download_resumes_a_partial_file_with_a_range_request(tmp_path, monkeypatch):
    data, log = bytes(range(256)) * 40, []
    (tmp_path / "w.pth.part").write_bytes(data[:3000])
    monkeypatch.setattr(download, "_open", serve(data, log))
    url_download("https://example.invalid/w.pth", tmp_path / "w.pth", hashlib.sha256(data).hexdigest())
    assert log == [3000] and (tmp_path / "w.pth").read_bytes() == data and not (tmp_path / "w.pth.part").exists()


def test_url_download_restarts_when_the_partial_file_is_corrupt(tmp_path, monkeypatch):
    data, log = bytes(range(256)) * 40, []
    (tmp_path / "w.pth.part").write_bytes(b"\0" * 3000)  # a partial file that is not the start of the real one
    monkeypatch.setattr(download, "_open", serve(data, log))
    url_download("https://example.invalid/w.pth", tmp_path / "w.pth", hashlib.sha256(data).hexdigest())
    assert log == [3000, 0] and (tmp_path / "w.pth").read_bytes() == data


def test_url_download_starts_over_when_the_server_ignores_the_range(tmp_path, monkeypatch):
    data, log = bytes(range(256)) * 40, []
    (tmp_path / "w.pth.part").write_bytes(data[:3000])
    monkeypatch.setattr(download, "_open", serve(data, log, honour_range=False))
    url_download("https://example.invalid/w.pth", tmp_path / "w.pth", hashlib.sha256(data).hexdigest())
    assert log == [3000] and (tmp_path / "w.pth").read_bytes() == data


def test_url_download_refuses_a_wrong_sha256_and_places_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "_open", serve(b"something else", []))
    with pytest.raises(AssetError, match="not the pinned"):
        url_download("https://example.invalid/w.pth", tmp_path / "w.pth", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_url_download_skips_a_file_already_there_with_the_pinned_sha256(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"published")
    monkeypatch.setattr(download, "_open", refuse)
    assert url_download("https://example.invalid/w.pth", tmp_path / "w.pth",
                        hashlib.sha256(b"published").hexdigest()) == tmp_path / "w.pth"


# ----------------------------------------------------------------------------- doctor

@pytest.fixture
def hub_root(tmp_path, monkeypatch) -> Path:
    """A root whose clip and vae folders were fetched (by the fake hub)."""
    write_params(tmp_path, HUB_ONLY)
    monkeypatch.setattr(download, "hub_snapshot", FakeHub(tmp_path / "hf-cache"))
    assert runner.invoke(app, ["fetch", "--root", str(tmp_path)]).exit_code == 0
    return tmp_path


def test_doctor_reports_missing_assets_with_the_fix(tmp_path):
    write_params(tmp_path, HUB_ONLY)
    result = runner.invoke(app, ["doctor", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "clip (clip.model): missing: external/clip-vit-large-patch14 does not exist" in result.output
    assert "fix: run `cxr-diffusion fetch`" in result.output and "2 of 2 assets need attention" in result.output


def test_doctor_reports_an_asset_changed_in_place_and_the_stages_to_rerun(hub_root):
    config = hub_root / "external" / "sd-vae-ft-mse" / "config.json"
    text = config.read_text()
    config.write_text(text.replace("stabilityai", "stabilityAI"))  # same size: only the hash can tell
    result = runner.invoke(app, ["doctor", "--root", str(hub_root)])
    assert result.exit_code == 2
    assert "vae (train.vae): mismatch: external/sd-vae-ft-mse changed since fetch recorded it: changed config.json" \
        in result.output
    assert ("dvc repro -f -s encode_latents train@clip_text train@clip_vision train@elixr sample@clip_text "
            "sample@clip_vision sample@elixr") in result.output
    assert "clip (clip.model): present" in result.output


def test_doctor_reports_added_and_removed_files(hub_root):
    (hub_root / "external" / "clip-vit-large-patch14" / "config.json").unlink()
    (hub_root / "external" / "clip-vit-large-patch14" / "extra.safetensors").write_bytes(b"x")
    result = runner.invoke(app, ["doctor", "--root", str(hub_root)])
    assert result.exit_code == 2
    assert "added extra.safetensors; removed config.json" in result.output
    assert "dvc repro -f -s embed_clip_text embed_clip_vision train@clip_text" in result.output


def test_record_present_keeps_a_change_and_doctor_passes_again(hub_root):
    (hub_root / "external" / "sd-vae-ft-mse" / "config.json").write_text('{"_class_name": "AutoencoderKL", "x": 1}')
    save_file({"w": torch.ones(2)}, str(hub_root / "external" / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"))
    result = runner.invoke(app, ["fetch", "--record-present", "--root", str(hub_root)])
    assert result.exit_code == 0 and "rerun what read it: dvc repro -f -s encode_latents" in result.output
    assert runner.invoke(app, ["doctor", "--root", str(hub_root)]).exit_code == 0


def test_fetch_restores_an_asset_changed_in_place(hub_root, monkeypatch):
    config = hub_root / "external" / "sd-vae-ft-mse" / "config.json"
    original = config.read_text()
    config.write_text('{"edited": true}')
    hub = FakeHub(hub_root / "hf-cache")
    monkeypatch.setattr(download, "hub_snapshot", hub)
    assert runner.invoke(app, ["fetch", "--root", str(hub_root)]).exit_code == 0
    assert [c["repo_id"] for c in hub.calls] == ["stabilityai/sd-vae-ft-mse"] and config.read_text() == original


def test_a_new_revision_pin_makes_a_fetched_asset_stale(hub_root):
    params = yaml.safe_load((hub_root / "params.yaml").read_text())
    params["fetch"]["clip_revision"] = "0123abc"
    (hub_root / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["doctor", "--root", str(hub_root)])
    assert result.exit_code == 2 and "clip (clip.model): stale" in result.output


def test_a_corrupt_manifest_is_one_clear_error(hub_root):
    (hub_root / "external" / "assets.json").write_text("{not json")
    result = runner.invoke(app, ["doctor", "--root", str(hub_root)])
    assert result.exit_code == 2 and "is not a fetch manifest" in result.output and "Traceback" not in result.output

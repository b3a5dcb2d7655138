"""Reading ELIXR exactly as the reference work publishes it (the `Yasintuncer/nih-cxr14-elixr` snapshot).

The snapshot is built here with h5py and json, not with the project's writers: a `datasets.json` at
the root nesting one `"type": "dataset"` entry per folder, and numbered HDF5 shards per folder with
an `Image Index` of byte strings (`b"00000001_000.png"`) and the feature arrays.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REPO
from cxr_diffusion.conditioning import elixr_standin
from cxr_diffusion.conditioning.elixr import build_elixr_store
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.config import ClipConfig, ElixrConfig
from cxr_diffusion.params_file import load_params
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.data.nih import DataError

# Per-row shapes as datasets.json lists them; SMALL keeps every axis's role with tiny sizes.
REAL = {"elixrc": {"Embedding": (1, 8, 8, 1376)},
        "elixrb/img_emb": {"img_emb": (32, 768)},
        "elixrb/txt_emb": {"txt_emb": (128, 768)},
        "elixrb/contrastive": {"all_contrastive_img_emb": (32, 128), "contrastive_img_emb": (128,),
                               "contrastive_txt_emb": (128,)}}
SMALL = {"elixrc": {"Embedding": (1, 2, 2, 6)},
         "elixrb/img_emb": {"img_emb": (4, 8)},
         "elixrb/txt_emb": {"txt_emb": (5, 8)},
         "elixrb/contrastive": {"all_contrastive_img_emb": (4, 3), "contrastive_img_emb": (3,),
                                "contrastive_txt_emb": (3,)}}
# Shard number -> the images it holds; numbers 1, 2, 10 so that numeric and string order differ.
SHARDS = {1: (1, 2), 2: (3, 4), 10: (5, 6, 7)}
FP16 = dict(rtol=1e-3, atol=1e-3)


def ids(*numbers: int) -> list[str]:
    return [f"{n:08d}_000.png" for n in numbers]


def make_snapshot(root: Path, shapes=SMALL, shards=SHARDS, features_as="mapping",
                  overrides: dict | None = None) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Write the published layout at ``root``; return {(dataset, feature): {Image Index: row}}."""
    overrides = overrides or {}
    truth: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    index: dict = {}
    for number_of_dataset, (dataset, features) in enumerate(shapes.items()):
        node = index
        for part in dataset.split("/"):
            node = node.setdefault(part, {})
        listed = [{"name": name, "dtype": "float32", "shape": list(shape)} for name, shape in features.items()]
        listed.append({"name": "Image Index", "dtype": "bytes", "shape": []})
        node.update({"type": "dataset", "description": f"test {dataset}",
                     "features": listed if features_as == "list"
                     else {f["name"]: {"dtype": f["dtype"], "shape": f["shape"]} for f in listed}})
        folder = root / dataset
        folder.mkdir(parents=True)
        for number, images in shards.items():
            names = ids(*images)
            with h5py.File(folder / f"{dataset.split('/')[-1]}_{number}.h5", "w") as handle:
                handle["Image Index"] = np.array([n.encode() for n in names])
                for feature, shape in features.items():
                    rng = np.random.default_rng([number_of_dataset, number, len(feature)])
                    data = rng.normal(size=(len(names), *shape)).astype(np.float32)
                    for (key, image), value in overrides.items():
                        if key == (dataset, feature) and image in names:
                            data[names.index(image)].flat[0] = value
                    handle[feature] = data
                    truth.setdefault((dataset, feature), {}).update(zip(names, data))
    (root / "datasets.json").write_text(json.dumps({"info": {"name": "nih-cxr14-elixr"}, "datasets": index}))
    return truth


def build(tmp_path: Path, names: list[str], folder: str = "snapshot", **config) -> dict:
    pd.DataFrame({"Image Index": names, "Finding Labels": "No Finding"}).to_csv(tmp_path / "filtered.csv", index=False)
    return build_elixr_store(tmp_path / "filtered.csv", profile_section(ElixrConfig, path=str(tmp_path / folder), **config),
                             tmp_path / "store", tmp_path / "rejects.csv", tmp_path / "metrics.json", "elixr")


def rejects(tmp_path: Path) -> list[tuple[str, str]]:
    frame = pd.read_csv(tmp_path / "rejects.csv", dtype=str)
    return list(zip(frame["Image Index"], frame["reason"]))


def test_shipped_params_and_config_defaults_select_elixr_b_img_emb():
    shipped = load_params(REPO / "params.yaml").elixr
    assert (shipped.dataset, shipped.feature) == ("elixrb/img_emb", "img_emb")
    assert (profile_section(ElixrConfig).dataset, profile_section(ElixrConfig).feature) == ("elixrb/img_emb", "img_emb")


def test_default_reads_elixr_b_img_emb_from_the_snapshot_root(tmp_path):
    truth = make_snapshot(tmp_path / "snapshot")
    order = ids(7, 2, 5)
    metrics = build(tmp_path, order)
    store = ConditionStore(tmp_path / "store")
    assert metrics["shape"] == [4, 8] and (metrics["dataset"], metrics["feature"]) == ("elixrb/img_emb", "img_emb")
    assert metrics["layout"] == "snapshot" and metrics["files"] == 3
    assert list(pd.read_csv(tmp_path / "store" / "index.csv")["Image Index"]) == order
    for name in order:
        np.testing.assert_allclose(store[name].embeddings.numpy(), truth["elixrb/img_emb", "img_emb"][name], **FP16)


@pytest.mark.parametrize(("dataset", "feature", "tokens", "dim"), [
    ("elixrb/img_emb", "img_emb", 32, 768),
    ("elixrc", "Embedding", 64, 1376),
])
def test_real_shapes_become_tokens_by_dim(tmp_path, dataset, feature, tokens, dim):
    truth = make_snapshot(tmp_path / "snapshot", shapes=REAL, shards={1: (1,), 2: (2,), 10: (3,)})
    metrics = build(tmp_path, ids(3, 1), dataset=dataset, feature=feature)
    store = ConditionStore(tmp_path / "store")
    assert metrics["shape"] == [tokens, dim] and (store.tokens, store.dim) == (tokens, dim)
    np.testing.assert_allclose(store["00000003_000.png"].embeddings.numpy(),
                               truth[dataset, feature]["00000003_000.png"].reshape(tokens, dim), **FP16)


def test_elixr_c_embedding_flattens_its_8x8_grid_into_tokens_in_row_major_order(tmp_path):
    truth = make_snapshot(tmp_path / "snapshot")
    build(tmp_path, ids(4), dataset="elixrc", feature="Embedding")
    got = ConditionStore(tmp_path / "store")["00000004_000.png"].embeddings.numpy()
    grid = truth["elixrc", "Embedding"]["00000004_000.png"]  # (1, 2, 2, 6)
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got[2], grid[0, 1, 0], **FP16)  # token 2 is grid row 1, column 0


@pytest.mark.parametrize(("feature", "shape"), [("all_contrastive_img_emb", [4, 3]), ("contrastive_img_emb", [1, 3])])
def test_contrastive_image_features_condition_as_tokens_by_dim(tmp_path, feature, shape):
    truth = make_snapshot(tmp_path / "snapshot")
    metrics = build(tmp_path, ids(6), dataset="elixrb/contrastive", feature=feature)
    assert metrics["shape"] == shape
    np.testing.assert_allclose(ConditionStore(tmp_path / "store")["00000006_000.png"].embeddings.numpy(),
                               truth["elixrb/contrastive", feature]["00000006_000.png"].reshape(shape), **FP16)


def test_features_listed_as_a_list_are_read_too(tmp_path):
    make_snapshot(tmp_path / "snapshot", features_as="list")
    assert build(tmp_path, ids(1), dataset="elixrc", feature="Embedding")["shape"] == [4, 6]


def test_shards_are_read_in_numeric_order(tmp_path):
    make_snapshot(tmp_path / "snapshot")
    build(tmp_path, ids(1, 3, 5))
    files = json.loads((tmp_path / "store" / "store.json").read_text())["files"]
    assert [Path(f).name for f in files] == ["img_emb_1.h5", "img_emb_2.h5", "img_emb_10.h5"]


def test_ids_without_embedding_are_dropped_and_embeddings_without_image_are_counted(tmp_path):
    make_snapshot(tmp_path / "snapshot")
    metrics = build(tmp_path, ids(2, 9, 5))
    assert rejects(tmp_path) == [("00000009_000.png", "missing_embedding")]
    assert (metrics["written"], metrics["unused_embeddings"]) == (2, 5)


def test_missing_dataset_is_one_line_listing_every_dataset_and_feature_with_shapes(tmp_path):
    make_snapshot(tmp_path / "snapshot")
    with pytest.raises(DataError) as error:
        build(tmp_path, ids(1), dataset="elixrb/image_emb")
    message = str(error.value)
    assert "\n" not in message and "no dataset 'elixrb/image_emb' (elixr.dataset)" in message
    assert ("elixrc: Embedding [1, 2, 2, 6]; elixrb/img_emb: img_emb [4, 8]; elixrb/txt_emb: txt_emb [5, 8]; "
            "elixrb/contrastive: all_contrastive_img_emb [4, 3], contrastive_img_emb [3], "
            "contrastive_txt_emb [3]") in message


def test_missing_feature_is_an_error_listing_what_the_snapshot_offers(tmp_path):
    make_snapshot(tmp_path / "snapshot")
    with pytest.raises(DataError, match=r"dataset 'elixrc' has no embedding feature 'img_emb' \(elixr\.feature\).*"
                                        r"elixrc: Embedding \[1, 2, 2, 6\].*elixrb/img_emb: img_emb \[4, 8\]"):
        build(tmp_path, ids(1), dataset="elixrc", feature="img_emb")


@pytest.mark.parametrize(("dataset", "feature"), [("elixrb/txt_emb", "txt_emb"),
                                                  ("elixrb/contrastive", "contrastive_txt_emb")])
def test_text_features_are_refused_naming_the_image_features(tmp_path, dataset, feature):
    make_snapshot(tmp_path / "snapshot")
    with pytest.raises(DataError, match=r"is a text embedding.*not an embedding of the image") as error:
        build(tmp_path, ids(1), dataset=dataset, feature=feature)
    offered = str(error.value).split("choose an image feature:")[1]
    assert "img_emb [4, 8]" in offered and "Embedding [1, 2, 2, 6]" in offered and "txt" not in offered
    assert not (tmp_path / "store").exists()


def test_float16_overflow_is_a_listed_non_finite_reject(tmp_path):
    # 70000 is finite in float32 but beyond float16's 65504: stored as float16 it would be inf.
    make_snapshot(tmp_path / "snapshot", overrides={(("elixrb/img_emb", "img_emb"), "00000003_000.png"): 7e4})
    metrics = build(tmp_path, ids(2, 3, 4))
    store = ConditionStore(tmp_path / "store")
    assert rejects(tmp_path) == [("00000003_000.png", "non_finite")]
    assert metrics["dropped_by_reason"]["non_finite"] == 1 and len(store) == 2
    assert all(np.isfinite(store[n].embeddings.numpy()).all() for n in ids(2, 4))


def test_float16_overflow_is_kept_in_a_float32_store(tmp_path):
    make_snapshot(tmp_path / "snapshot", overrides={(("elixrb/img_emb", "img_emb"), "00000003_000.png"): 7e4})
    metrics = build(tmp_path, ids(2, 3, 4), dtype="float32")
    assert metrics["written"] == 3 and ConditionStore(tmp_path / "store")["00000003_000.png"].embeddings[0, 0] == 7e4


def test_shard_disagreeing_with_datasets_json_is_an_error_naming_it(tmp_path):
    make_snapshot(tmp_path / "snapshot")
    with h5py.File(tmp_path / "snapshot" / "elixrb" / "img_emb" / "img_emb_2.h5", "r+") as handle:
        del handle["img_emb"]
        handle["img_emb"] = np.zeros((2, 5, 8), np.float32)
    with pytest.raises(DataError, match=r"img_emb_2\.h5: 'img_emb' holds rows of shape \[5, 8\] but datasets\.json "
                                        r"declares \[4, 8\]"):
        build(tmp_path, ids(1))


def test_a_flat_shard_is_unflattened_with_the_declared_shape(tmp_path):
    truth = make_snapshot(tmp_path / "snapshot")
    with h5py.File(tmp_path / "snapshot" / "elixrb" / "img_emb" / "img_emb_1.h5", "r+") as handle:
        flat = handle["img_emb"][()].reshape(2, -1)
        del handle["img_emb"]
        handle["img_emb"] = flat
    build(tmp_path, ids(2))
    np.testing.assert_allclose(ConditionStore(tmp_path / "store")["00000002_000.png"].embeddings.numpy(),
                               truth["elixrb/img_emb", "img_emb"]["00000002_000.png"], **FP16)


def test_a_snapshot_without_datasets_json_is_read_from_the_dataset_folder(tmp_path):
    truth = make_snapshot(tmp_path / "snapshot")
    (tmp_path / "snapshot" / "datasets.json").unlink()
    metrics = build(tmp_path, ids(7), dataset="elixrb/contrastive", feature="contrastive_img_emb")
    assert metrics["shape"] == [1, 3]
    np.testing.assert_allclose(ConditionStore(tmp_path / "store")["00000007_000.png"].embeddings.numpy()[0],
                               truth["elixrb/contrastive", "contrastive_img_emb"]["00000007_000.png"], **FP16)


def test_embed_elixr_stage_exits_2_with_the_one_line_error(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("embed_elixr_stage", REPO / "stages" / "embed_elixr.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    make_snapshot(tmp_path / "snapshot")
    params = yaml_params(tmp_path, path=str(tmp_path / "snapshot"), dataset="elixrd")
    pd.DataFrame({"Image Index": ids(1), "Finding Labels": "No Finding"}).to_csv(tmp_path / "filtered.csv", index=False)
    with pytest.raises(SystemExit) as exit_info:
        stage.main(params=params, filtered=tmp_path / "filtered.csv", standin=tmp_path / "none", out=tmp_path / "store",
                   rejects=tmp_path / "rejects.csv", metrics=tmp_path / "metrics.json")
    assert exit_info.value.code == 2
    assert "no dataset 'elixrd'" in capsys.readouterr().err


def yaml_params(tmp_path: Path, **elixr) -> Path:
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["elixr"].update(elixr)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


# ----------------------------------------------------------------------------- the stand-in's layout

@pytest.fixture
def fake_clip(monkeypatch):
    """The stand-in stage without a CLIP: five prepared images whose 'tokens' are known numbers."""
    names = ids(11, 12, 13, 14, 15)
    tokens = torch.arange(5 * 3 * 2, dtype=torch.float32).reshape(5, 3, 2)

    class Encoder:
        def to(self, device, dtype):
            return self

    def batches(prepared_dir, batch_size):
        for start in range(0, 5, 2):
            yield names[start:start + 2], [Image.new("L", (4, 4))] * len(names[start:start + 2])

    def fake_tokens(encoder, images, count):
        done = fake_tokens.rows
        fake_tokens.rows += len(images)
        return tokens[done:done + len(images)]

    fake_tokens.rows = 0
    monkeypatch.setattr(elixr_standin, "load_vision_encoder", lambda source, revision: Encoder())
    monkeypatch.setattr(elixr_standin, "clip_source", lambda clip, demo_dir: "demo-clip")
    monkeypatch.setattr(elixr_standin, "read_manifest", lambda prepared_dir: {"written": 5})
    monkeypatch.setattr(elixr_standin, "iter_prepared_images", batches)
    monkeypatch.setattr(elixr_standin, "standin_tokens", fake_tokens)
    return names, tokens.numpy()


def test_stand_in_is_written_in_the_published_snapshot_layout_and_labelled(tmp_path, fake_clip):
    names, tokens = fake_clip
    out = tmp_path / "standin"
    elixr_standin.write_elixr_standin(tmp_path, profile_section(ElixrConfig, standin_tokens=3), profile_section(ClipConfig), tmp_path, out,
                                      shard_size=2)
    index = json.loads((out / "datasets.json").read_text())
    assert index["info"]["standin"] is True and "NOT ELIXR" in index["info"]["description"]
    entry = index["datasets"]["elixrb"]["img_emb"]
    assert entry["type"] == "dataset" and entry["features"]["img_emb"]["shape"] == [3, 2]
    shards = sorted(p.name for p in (out / "elixrb" / "img_emb").iterdir())
    assert shards == ["img_emb_1.h5", "img_emb_2.h5", "img_emb_3.h5"]
    with h5py.File(out / "elixrb" / "img_emb" / "img_emb_3.h5", "r") as handle:
        assert list(handle["Image Index"][()]) == [b"00000015_000.png"]
        np.testing.assert_array_equal(handle["img_emb"][()], tokens[4:])
        assert "NOT ELIXR" in handle.attrs["standin"]


def test_stand_in_goes_through_the_snapshot_reader_with_the_default_selection(tmp_path, fake_clip):
    names, tokens = fake_clip
    elixr_standin.write_elixr_standin(tmp_path, profile_section(ElixrConfig, standin_tokens=3), profile_section(ClipConfig), tmp_path,
                                      tmp_path / "standin", shard_size=2)
    metrics = build(tmp_path, ids(15, 11), folder="standin")
    assert metrics["layout"] == "snapshot" and metrics["shape"] == [3, 2]
    np.testing.assert_allclose(ConditionStore(tmp_path / "store")["00000015_000.png"].embeddings.numpy(), tokens[4])


def test_stand_in_selection_of_another_dataset_says_it_is_the_stand_in(tmp_path, fake_clip):
    elixr_standin.write_elixr_standin(tmp_path, profile_section(ElixrConfig, standin_tokens=3), profile_section(ClipConfig), tmp_path,
                                      tmp_path / "standin", shard_size=2)
    with pytest.raises(DataError, match=r"no dataset 'elixrc'.*stand-in.*elixrb/img_emb: img_emb \[3, 2\]"):
        build(tmp_path, ids(11), folder="standin", dataset="elixrc", feature="Embedding")


def test_stand_in_from_a_real_demo_clip_round_trips_through_the_reader(tmp_path, tiny_clip_dir):
    from conftest import make_training_data
    from cxr_diffusion.conditioning.clip import load_vision_encoder
    from cxr_diffusion.conditioning.embed import iter_prepared_images, standin_tokens

    prepared = make_training_data(tmp_path / "data", n_images=12)["prepared"]
    clip, elixr = profile_section(ClipConfig, model=str(tiny_clip_dir), batch_size=5), profile_section(ElixrConfig, standin_tokens=3)
    result = elixr_standin.write_elixr_standin(prepared, elixr, clip, tiny_clip_dir, tmp_path / "standin",
                                               shard_size=5)
    encoder = load_vision_encoder(str(tiny_clip_dir))
    expected = {name: row for names, images in iter_prepared_images(prepared, 5)
                for name, row in zip(names, standin_tokens(encoder, images, 3).numpy())}
    assert result == {"standin": True, "images": len(expected), "shards": 3}
    metrics = build(tmp_path, sorted(expected), folder="standin", dtype="float32")
    store = ConditionStore(tmp_path / "store")
    assert metrics["written"] == len(expected) and metrics["shape"] == [3, 16]
    for name, row in expected.items():
        np.testing.assert_allclose(store[name].embeddings.numpy(), row, rtol=1e-6, atol=1e-6)

"""The data stages on a small NIH-layout download full of the real world's quirks."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr_diffusion.profiles import params_with
from cxr_diffusion.data.filter import run_filter
from cxr_diffusion.data.nih import DataError, index_nih_root
from cxr_diffusion.data.prepare import prepare_shards
from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.data.sources import build_dataset

from conftest import gradient_image, make_nih_download, nih_row, png_bytes


def quirky_download(root):
    """Good images plus each kind of bad input a real download can hold."""
    rows = [nih_row(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", patient=p) for p in range(1, 21)]
    images = {row["Image Index"]: png_bytes(Image.fromarray(gradient_image(seed=i))) for i, row in enumerate(rows)}
    good = png_bytes(Image.fromarray(gradient_image((60, 60))))
    extras = {
        "00000101_000.png": png_bytes(Image.fromarray(np.linspace(0, 65535, 3600).reshape(60, 60).astype(np.uint16))),
        "00000102_000.png": png_bytes(Image.fromarray(gradient_image()).convert("RGBA")),
        "00000103_000.png": png_bytes(Image.fromarray(gradient_image((30, 60)))),  # non-square
        "00000104_000.png": good[: len(good) // 2],                                  # truncated
        "00000105_000.png": b"",                                                     # zero bytes
        "00000106_000.png": b"this is not an image at all",                         # corrupt
    }
    images.update(extras)
    rows += [nih_row(name, "Effusion", patient=101 + i) for i, name in enumerate(extras)]
    rows += [nih_row("00000107_000.png", "Effusion", patient=107)]           # no file on disk
    rows += [nih_row("00000001_000.png", "No Finding", patient=1)]           # duplicate row
    rows += [nih_row("../../etc/passwd.png", "Effusion", patient=108)]       # path traversal
    images["unlisted_999.png"] = good                                        # file no row names
    return make_nih_download(root, rows, images), rows


def tiny_params(root, **prepare):
    return params_with({
        "seed": 0, "image_size": 32,
        "dataset": {"source": "nih", "nih_root": str(root)},
        "filter": {"classes": ["Effusion", "No Finding"], "merges": {},
                   "split": {"val_fraction": 0.2, "test_fraction": 0.2}},
        "prepare": {"shard_size": 8, "row_group_size": 4, "min_side": 16, **prepare},  # the test images are small
    })


@pytest.fixture
def prepared(tmp_path):
    root, rows = quirky_download(tmp_path / "nih")
    params = tiny_params(root)
    build_dataset(params, tmp_path / "dataset", tmp_path / "dataset.json")
    run_filter(tmp_path / "dataset", params.filter, params.seed, tmp_path / "filtered", tmp_path / "filter.json")
    manifest = prepare_shards(params, tmp_path / "dataset", tmp_path / "filtered" / "filtered.csv",
                              tmp_path / "prepared", tmp_path / "prepare.json", workers=2)
    return tmp_path, params, manifest, rows


def test_index_reports_missing_and_unexpected_files(tmp_path):
    root, _ = quirky_download(tmp_path / "nih")
    index = index_nih_root(root)
    assert index.missing == ["00000107_000.png", "../../etc/passwd.png"]
    assert index.unexpected == ["images_001/images/unlisted_999.png"]


def test_index_without_metadata_csv_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIH metadata CSV found"):
        index_nih_root(tmp_path / "empty")


def test_metadata_csv_missing_columns_is_an_error_naming_them(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    pd.DataFrame({"Image Index": ["a.png"], "Finding Labels": ["Effusion"]}).to_csv(root / "Data_Entry_2017.csv", index=False)
    with pytest.raises(DataError, match=r"missing required column\(s\) \['Follow-up #', 'Patient ID'"):
        index_nih_root(root)


def test_bad_files_become_listed_rejects_and_counts_reconcile(prepared):
    tmp, _, manifest, _ = prepared
    rejects = pd.read_csv(tmp / "prepared" / "rejects.csv").set_index("Image Index")["reason"]
    assert rejects["00000104_000.png"].startswith("decode_error")
    assert rejects["00000105_000.png"] == "empty_file"
    assert rejects["00000106_000.png"].startswith("decode_error")
    assert manifest["images_in"] == manifest["written"] + manifest["rejected"] == 26
    assert manifest["rejected"] == 3
    filter_metrics = json.loads((tmp / "filter.json").read_text())
    assert filter_metrics["rejected"]["image_missing"] == 1
    assert filter_metrics["rejected"]["duplicate_image_index"] == 1
    assert filter_metrics["rejected"]["unsafe_image_index"] == 1


def test_16bit_rgba_and_non_square_images_are_prepared(prepared):
    tmp, _, _, _ = prepared
    written = set()
    for split in ("train", "val", "test"):
        dataset = PreparedImages(tmp / "prepared", split)
        written |= {dataset[i]["image_index"] for i in range(len(dataset))}
    assert {"00000101_000.png", "00000102_000.png", "00000103_000.png"} <= written


def test_torch_dataset_yields_rgb_in_minus_one_to_one(prepared):
    tmp, _, manifest, _ = prepared
    dataset = PreparedImages(tmp / "prepared", "train")
    item = dataset[0]
    assert len(dataset) == manifest["per_split"]["train"]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["labels"].shape == (2,)
    assert torch.equal(item["pixel_values"][0], item["pixel_values"][2])


def test_torch_dataset_single_channel(prepared):
    tmp, _, _, _ = prepared
    assert PreparedImages(tmp / "prepared", "train", channels=1)[0]["pixel_values"].shape == (1, 32, 32)


def test_shards_load_with_hugging_face_datasets(prepared):
    datasets = pytest.importorskip("datasets")
    tmp, _, manifest, _ = prepared
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp / "prepared"))
    assert set(loaded) == {"train", "validation", "test"} or set(loaded) == {"train", "val", "test"}
    train = loaded["train"]
    assert len(train) == manifest["per_split"]["train"]
    assert isinstance(train.features["image"], datasets.Image)
    assert train[0]["image"].size == (32, 32)


def test_output_does_not_depend_on_worker_count(prepared, tmp_path):
    tmp, params, manifest, _ = prepared
    again = prepare_shards(params, tmp / "dataset", tmp / "filtered" / "filtered.csv", tmp_path / "again", workers=1)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_shard_size_splits_files(prepared):
    _, _, manifest, _ = prepared
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    assert len(train) >= 2 and all(s["rows"] <= 8 for s in train)


def test_prepare_never_opens_a_path_outside_the_dataset(tmp_path):
    from cxr_diffusion.data.prepare import resolve_image_path
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    roots = (dataset.resolve(),)
    assert resolve_image_path(dataset, "a.png", "../outside/a.png", roots) == (None, "path_outside_dataset")
    assert resolve_image_path(dataset, "../a.png", "images/../a.png", roots)[1] == "unsafe_image_index"
    assert resolve_image_path(dataset, "a.png", "/etc/b.png", roots)[1] == "path_does_not_match_image_index"


def test_row_group_order_visits_every_image_once_group_by_group(prepared):
    tmp, _, _, _ = prepared
    dataset = PreparedImages(tmp / "prepared", "train")
    first = dataset.row_group_order(torch.Generator().manual_seed(0), window=1)
    assert sorted(first) == list(range(len(dataset)))
    assert first == dataset.row_group_order(torch.Generator().manual_seed(0), window=1)
    groups = [dataset._locations[i][:2] for i in first]
    changes = sum(a != b for a, b in zip(groups, groups[1:]))
    assert changes == len(set(groups)) - 1  # with window 1, each row group is read in one run


def test_labels_are_available_without_decoding_images(prepared):
    tmp, _, _, _ = prepared
    dataset = PreparedImages(tmp / "prepared", "train")
    assert dataset.labels.shape == (len(dataset), 2)
    assert np.array_equal(dataset.labels[0], dataset[0]["labels"].numpy())


def test_row_group_cache_stays_within_its_byte_budget(prepared):
    tmp, _, _, _ = prepared
    roomy = PreparedImages(tmp / "prepared", "train")
    tight = PreparedImages(tmp / "prepared", "train", cache_bytes=1)  # keeps only the latest row group
    backwards = list(reversed(range(len(roomy))))
    for i in backwards:
        assert torch.equal(tight[i]["pixel_values"], roomy[i]["pixel_values"])
        assert len(tight._cache) == 1 and tight._cached_bytes == next(iter(tight._cache.values())).nbytes
    groups = {roomy._locations[i][:2] for i in backwards}
    assert len(groups) >= 2 and len(roomy._cache) == len(groups)  # a small split stays cached whole

"""Hostile stores and files: corrupt, truncated, empty or unwritable inputs end in one line naming the file.

Every case here used to end in a numpy, pandas, zipfile or KeyError traceback, or silently read the
wrong bytes. Each test builds its tiny input, breaks one thing, and checks the message says where
and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_diffusion.conditioning.store import ConditionStore, ConditionStoreWriter, StoreError
from cxr_diffusion.config import ClipConfig, ElixrConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.errors import UserError
from cxr_diffusion.io import atomic_directory, atomic_path, write_json
from cxr_diffusion.stage import run_stage

REPO = Path(__file__).resolve().parents[2]


def write_store(path: Path, rows: int = 3, tokens: int = 2, dim: int = 4) -> Path:
    data = np.arange(rows * tokens * dim, dtype=np.float32).reshape(rows, tokens, dim)
    with ConditionStoreWriter(path, rows, tokens, dim) as store:
        store.write(0, data)
        store.finish([f"{i:08d}_000.png" for i in range(rows)], np.arange(rows), {"branch": "test"})
    return path


def edit_index(store: Path, rows: list[object], names: list[str] | None = None) -> None:
    names = names if names is not None else [f"{i:08d}_000.png" for i in range(len(rows))]
    pd.DataFrame({"Image Index": names, "row": rows}).to_csv(store / "index.csv", index=False)


def edit_meta(store: Path, **changes: object) -> None:
    meta = json.loads((store / "store.json").read_text())
    meta.update(changes)
    (store / "store.json").write_text(json.dumps(meta))


def empty_manifest(prepared: Path) -> Path:
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text(json.dumps({"shards": [], "written": 0, "classes": ["No Finding"],
                                                        "image_size": 16}))
    return prepared


def write_prepared(prepared: Path, per_split: dict[str, int], size: int = 16, row_group_size: int = 2) -> Path:
    """A prepared folder as the prepare stage writes it (real shard writer, manifest with sha256s)."""
    from PIL import Image

    from cxr_diffusion.data.decode import encode_png
    from cxr_diffusion.data.shards import MANIFEST, ShardRecord, SplitShardWriter, close_writers, shard_schema

    classes = ("No Finding", "Effusion")
    prepared.mkdir(parents=True)
    writers, number = {}, 0
    for split, count in per_split.items():
        writers[split] = SplitShardWriter(prepared, split, shard_schema(classes), 64, row_group_size)
        for _ in range(count):
            labels = "No Finding" if number % 2 == 0 else "Effusion"
            pixels = np.random.default_rng(number).integers(0, 255, (size, size), dtype=np.uint8)
            assert Image.fromarray(pixels).mode == "L"
            writers[split].write(ShardRecord(encode_png(pixels), f"{number:08d}_000.png", str(number), "PA", labels,
                                             split, (int(labels == "No Finding"), int(labels == "Effusion"))))
            number += 1
    shards = close_writers(prepared, writers)
    write_json(prepared / MANIFEST, {"classes": list(classes), "image_size": size, "written": number,
                                     "shards": shards})
    return prepared


# ----------------------------------------------------------------------------- index.csv


def test_store_index_row_of_minus_one_is_refused_naming_the_row(tmp_path):
    store = write_store(tmp_path / "s")
    edit_index(store, [0, -1, 2])
    with pytest.raises(StoreError, match=r"index.csv: line 3 \(00000001_000.png\): row '-1' is not a whole "
                                         r"number"):  # the writer never writes a sign
        ConditionStore(store)


def test_store_index_row_past_the_last_embedding_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    edit_index(store, [0, 1, 3])
    with pytest.raises(StoreError, match=r"line 4 \(00000002_000.png\): row 3 is outside the 3 rows"):
        ConditionStore(store)


@pytest.mark.parametrize("bad", ["1.5", "one", ""])
def test_store_index_row_that_is_not_an_integer_is_refused(tmp_path, bad):
    store = write_store(tmp_path / "s")
    edit_index(store, ["0", bad, "2"])
    with pytest.raises(StoreError, match=r"index.csv: line 3 \(00000001_000.png\): row '.*' is not a whole number"):
        ConditionStore(store)


def test_store_index_listing_an_image_twice_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    edit_index(store, [0, 1, 2], names=["a.png", "b.png", "a.png"])
    with pytest.raises(StoreError, match=r"index.csv: 'a.png' is on lines 2 and 4"):
        ConditionStore(store)


def test_store_index_rows_shared_by_several_images_are_allowed(tmp_path):
    store = write_store(tmp_path / "s")
    edit_index(store, [1, 1, 1])
    assert ConditionStore(store).row_of == {f"{i:08d}_000.png": 1 for i in range(3)}


def test_store_index_without_its_columns_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    pd.DataFrame({"name": ["a.png"], "row": [0]}).to_csv(store / "index.csv", index=False)
    with pytest.raises(StoreError, match=r"index.csv: expected columns \['Image Index', 'row'\], found \['name', 'row'\]"):
        ConditionStore(store)


def test_store_index_that_is_not_csv_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    (store / "index.csv").write_bytes(b"\xff\xfe\x00garbage\x00")
    with pytest.raises(StoreError, match=r"index.csv: not a readable CSV file .*; rerun its embed stage"):
        ConditionStore(store)


def test_store_index_that_disagrees_with_store_json_image_count_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    edit_index(store, [0, 1])  # a truncated index.csv: one image lost
    with pytest.raises(StoreError, match=r"index.csv lists 2 images but store.json records 3; rerun its embed stage"):
        ConditionStore(store)


def test_empty_store_is_refused(tmp_path):
    with ConditionStoreWriter(tmp_path / "s", 0, 2, 4) as writer:
        writer.finish([], [], {"branch": "test"})
    with pytest.raises(StoreError, match=r"holds no images; .*rerun its embed stage"):
        ConditionStore(tmp_path / "s")


# ----------------------------------------------------------------------------- store.json


def test_store_json_that_is_not_json_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    (store / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"store.json: not valid JSON \(.*\); rerun its embed stage"):
        ConditionStore(store)


def test_store_json_that_is_not_an_object_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    (store / "store.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match=r"store.json: not a readable JSON object"):
        ConditionStore(store)


def test_store_json_without_shape_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    meta = json.loads((store / "store.json").read_text())
    del meta["shape"]
    (store / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"store.json: missing key\(s\) \['shape'\]"):
        ConditionStore(store)


def test_store_json_shape_that_disagrees_with_the_embeddings_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    edit_meta(store, shape=[3, 2, 5])
    with pytest.raises(StoreError, match=r"store.json records shape \[3, 2, 5\] and dtype float16 but "
                                         r"embeddings.npy holds \[3, 2, 4\] float16"):
        ConditionStore(store)


def test_store_json_dtype_that_disagrees_with_the_embeddings_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    edit_meta(store, dtype="int8")
    with pytest.raises(StoreError, match=r"store.json records shape \[3, 2, 4\] and dtype int8"):
        ConditionStore(store)


# ----------------------------------------------------------------------------- embeddings.npy, mask.npy


def test_store_embeddings_truncated_inside_the_header_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    (store / "embeddings.npy").write_bytes((store / "embeddings.npy").read_bytes()[:20])
    with pytest.raises(StoreError, match=r"embeddings.npy: not a readable .npy file .*; rerun its embed stage"):
        ConditionStore(store)


def test_store_embeddings_that_are_not_npy_are_refused(tmp_path):
    store = write_store(tmp_path / "s")
    (store / "embeddings.npy").write_bytes(b"")
    with pytest.raises(StoreError, match=r"embeddings.npy: not a readable .npy file"):
        ConditionStore(store)


def test_store_mask_truncated_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    (store / "mask.npy").write_bytes((store / "mask.npy").read_bytes()[:-3])
    with pytest.raises(StoreError, match=r"mask.npy: not a readable .npy file .*; rerun its embed stage"):
        ConditionStore(store)


def test_store_mask_that_is_not_boolean_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    np.save(store / "mask.npy", np.ones((3, 2), dtype=np.float32))
    with pytest.raises(StoreError, match=r"mask.npy: holds float32, expected bool"):
        ConditionStore(store)


def test_store_mask_of_objects_is_refused_without_unpickling(tmp_path):
    store = write_store(tmp_path / "s")
    np.save(store / "mask.npy", np.array([[None, None]] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(StoreError, match=r"mask.npy: not a readable .npy file"):
        ConditionStore(store)


# ----------------------------------------------------------------------------- lung masks


@pytest.fixture
def xrv_data(tmp_path, monkeypatch):
    """A stand-in torchxrayvision data folder; the mask loader's cache is cleared around the test."""
    from cxr_diffusion.data.phantom import assets

    monkeypatch.setattr(assets, "torchxrayvision_data_dir", lambda: tmp_path)
    assets.load_lung_mask_set.cache_clear()
    assets.finding_box_stats.cache_clear()
    yield tmp_path
    assets.load_lung_mask_set.cache_clear()
    assets.finding_box_stats.cache_clear()


def test_truncated_lung_mask_zip_says_to_reinstall_torchxrayvision(xrv_data):
    from cxr_diffusion.data.phantom.assets import LUNG_MASKS_FILE, load_lung_masks

    with zipfile.ZipFile(xrv_data / LUNG_MASKS_FILE, "w") as archive:
        archive.writestr("a.png", b"\x89PNG" + bytes(200))
    data = (xrv_data / LUNG_MASKS_FILE).read_bytes()
    (xrv_data / LUNG_MASKS_FILE).write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"semantic_masks_v7labs_lungs.zip: not a readable zip file .*"
                                        r"reinstall it with `pip install --no-deps torchxrayvision`"):
        load_lung_masks(32)


def test_lung_mask_zip_of_unreadable_images_is_a_user_error(xrv_data):
    from cxr_diffusion.data.phantom.assets import LUNG_MASKS_FILE, load_lung_masks

    with zipfile.ZipFile(xrv_data / LUNG_MASKS_FILE, "w") as archive:
        archive.writestr("a.png", b"not an image")
    with pytest.raises(UserError, match=r"no usable lung mask \(1 unreadable, 0 degenerate\); reinstall"):
        load_lung_masks(32)


def test_a_malformed_dds_in_the_lung_mask_zip_is_counted_unreadable_not_a_crash(xrv_data):
    import struct

    from cxr_diffusion.data.phantom.assets import LUNG_MASKS_FILE, load_lung_masks

    pixel_format = struct.pack("<II4sIIIII", 32, 0x4, b"ZZZZ", 0, 0, 0, 0, 0)  # a FourCC no decoder knows
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + bytes(44) + pixel_format + bytes(4116)
    with zipfile.ZipFile(xrv_data / LUNG_MASKS_FILE, "w") as archive:
        archive.writestr("a.png", dds)  # PIL's DDS plugin raised NotImplementedError on it
    with pytest.raises(UserError, match=r"no usable lung mask \(1 unreadable, 0 degenerate\); reinstall"):
        load_lung_masks(32)


def test_truncated_finding_box_file_says_to_reinstall_torchxrayvision(xrv_data):
    import gzip

    from cxr_diffusion.data.phantom.assets import NIH_BOXES_FILE, finding_box_stats

    data = gzip.compress(("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                          + "00000001_000.png,Mass,1,2,3,4\n" * 200).encode())
    (xrv_data / NIH_BOXES_FILE).write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"BBox_List_2017.csv.gz: not a readable gzip CSV .*reinstall it with"):
        finding_box_stats()


def test_missing_torchxrayvision_data_file_is_a_user_error(xrv_data):
    from cxr_diffusion.data.phantom.assets import nih_metadata_csv

    with pytest.raises(UserError, match=r"Data_Entry_2017_v2020.csv.gz: missing from the torchxrayvision package"):
        nih_metadata_csv()


# ----------------------------------------------------------------------------- zero images


def test_train_clip_on_zero_prepared_images_says_so(tmp_path):
    from cxr_diffusion.conditioning.demo_clip import train_demo_clip

    prepared = empty_manifest(tmp_path / "prepared")
    with pytest.raises(DataError, match=r"manifest.json: the train split has no images; nothing to train the "
                                        r"in-pipeline CLIP on"):
        train_demo_clip(prepared, profile_section(ClipConfig), ["No Finding"], {"No Finding": ("No Finding",)}, 0, tmp_path / "clip")
    assert not (tmp_path / "clip").exists()


def test_embed_clip_text_on_an_empty_filtered_table_says_so(tmp_path):
    from cxr_diffusion.conditioning.embed import embed_clip_text

    pd.DataFrame({"Image Index": [], "Finding Labels": []}).to_csv(tmp_path / "filtered.csv", index=False)
    with pytest.raises(DataError, match=r"filtered.csv: no images \(0 rows\); nothing to embed"):
        embed_clip_text(tmp_path / "filtered.csv", profile_section(ClipConfig), tmp_path / "clip", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_embed_clip_text_on_a_table_without_finding_labels_says_so(tmp_path):
    from cxr_diffusion.conditioning.embed import embed_clip_text

    pd.DataFrame({"Image Index": ["a.png"]}).to_csv(tmp_path / "filtered.csv", index=False)
    with pytest.raises(DataError, match=r"filtered.csv: no 'Finding Labels' column \(found \['Image Index'\]\)"):
        embed_clip_text(tmp_path / "filtered.csv", profile_section(ClipConfig), tmp_path / "clip", tmp_path / "store")


def test_embed_clip_text_with_an_empty_finding_labels_cell_names_the_line(tmp_path):
    from cxr_diffusion.conditioning.embed import embed_clip_text

    pd.DataFrame({"Image Index": ["a.png", "b.png"], "Finding Labels": ["Effusion", ""]}).to_csv(
        tmp_path / "filtered.csv", index=False)
    with pytest.raises(DataError, match=r"filtered.csv: line 3: empty Finding Labels '': cannot build a prompt; "
                                        r"rerun the filter stage"):
        embed_clip_text(tmp_path / "filtered.csv", profile_section(ClipConfig), tmp_path / "clip", tmp_path / "store")


def test_train_clip_with_no_val_images_trains_and_reports_null_scores(tmp_path):
    from cxr_diffusion.conditioning.demo_clip import train_demo_clip
    from cxr_diffusion.config import DemoClipConfig

    prepared = write_prepared(tmp_path / "prepared", {"train": 4})
    demo = profile_section(DemoClipConfig, image_size=16, patch_size=4, width=16, layers=1, heads=2, projection_dim=8, max_length=16,
                          epochs=1, batch_size=4)
    metrics = train_demo_clip(prepared, profile_section(ClipConfig, demo=demo), ["No Finding", "Effusion"],
                              {"No Finding": ("No Finding",), "Effusion": ("Effusion",)}, 0, tmp_path / "clip")
    assert metrics["val_images"] == 0 and metrics["recall@1"] is None and metrics["zero_shot_macro_auroc"] is None
    assert metrics["train_images"] == 4 and (tmp_path / "clip" / "config.json").is_file()


def test_embed_clip_vision_on_zero_prepared_images_says_so(tmp_path):
    from cxr_diffusion.conditioning.embed import embed_clip_vision

    prepared = empty_manifest(tmp_path / "prepared")
    with pytest.raises(DataError, match=r"manifest.json: no prepared images \(written: 0\); nothing to embed"):
        embed_clip_vision(prepared, profile_section(ClipConfig), tmp_path / "clip", tmp_path / "store")
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- file modes


@pytest.fixture
def umask():
    """Set a known umask for the test and restore the caller's afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_file_gets_the_mode_of_a_plain_write(tmp_path, umask, mask, mode):
    umask(mask)
    write_json(tmp_path / "manifest.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == mode


@pytest.mark.parametrize("mask, mode", [(0o022, 0o755), (0o002, 0o775)])
def test_atomic_directory_gets_the_mode_of_a_plain_mkdir(tmp_path, umask, mask, mode):
    umask(mask)
    with atomic_directory(tmp_path / "clip") as tmp:
        (tmp / "config.json").write_text("{}")
    assert stat.S_IMODE((tmp_path / "clip").stat().st_mode) == mode


def test_atomic_path_leaves_no_temporary_file_when_the_block_fails(tmp_path):
    with pytest.raises(KeyError), atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("half")
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- atomic_directory's leftovers


def replace_directory(target: Path, content: str = "new") -> None:
    with atomic_directory(target) as tmp:
        (tmp / "file.txt").write_text(content)


@pytest.mark.parametrize("name", [".dataset.my-notes.tmp", ".dataset.old", ".dataset.1234.tmp", ".dataset.DEADBEEF.tmp"])
def test_atomic_directory_never_deletes_a_user_folder_beside_its_target(tmp_path, name):
    (tmp_path / "dataset").mkdir()
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("mine")
    replace_directory(tmp_path / "dataset")  # once over an existing target (the .old swap), once more
    replace_directory(tmp_path / "dataset")
    assert (tmp_path / name / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dataset", name])
    assert (tmp_path / "dataset" / "file.txt").read_text() == "new"


@pytest.mark.parametrize(("target", "bystander"), [("data[1]", ".data1.0123abcd.tmp"), ("d*", ".dx.0123abcd.tmp"),
                                                    ("d?", ".dx.0123abcd.tmp")])
def test_atomic_directory_escapes_glob_characters_in_its_target_name(tmp_path, target, bystander):
    (tmp_path / bystander).mkdir()
    (tmp_path / bystander / "notes.txt").write_text("mine")
    replace_directory(tmp_path / target)
    replace_directory(tmp_path / target)
    assert (tmp_path / bystander / "notes.txt").read_text() == "mine"
    assert (tmp_path / target / "file.txt").read_text() == "new"


@pytest.mark.parametrize("suffix", [".tmp", ".old"])
def test_atomic_directory_removes_its_own_leftovers_from_a_killed_run(tmp_path, suffix):
    (tmp_path / "data[1]").mkdir()
    leftover = tmp_path / f".data[1].0123abcd{suffix}"  # the name _new_beside gives, with the target's `[`
    leftover.mkdir()
    (leftover / "half.txt").write_text("half")
    replace_directory(tmp_path / "data[1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data[1]"]


def test_atomic_directory_replaces_a_target_that_is_a_file_or_a_dangling_link(tmp_path):
    (tmp_path / "a").write_text("a file")
    (tmp_path / "b").symlink_to(tmp_path / "nowhere")
    replace_directory(tmp_path / "a")
    replace_directory(tmp_path / "b")
    assert (tmp_path / "a" / "file.txt").read_text() == (tmp_path / "b" / "file.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ----------------------------------------------------------------------------- run_stage


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


def test_full_disk_during_a_stage_write_is_one_line_and_keeps_the_old_output(tmp_path, capsys, monkeypatch, tiny_params_file):
    from cxr_diffusion.conditioning.demo_clip import train_demo_clip

    params = tmp_path / "params.yaml"
    text = tiny_params_file.read_text()
    assert "  model: demo " in text
    params.write_text(text.replace("  model: demo ", "  model: someone/pretrained-clip ", 1))
    out, metrics = tmp_path / "models" / "clip", tmp_path / "metrics" / "clip.json"
    out.mkdir(parents=True)
    (out / "config.json").write_text("old model")
    metrics.parent.mkdir()
    metrics.write_text("old metrics")

    def full_disk(self: Path, data: str, *args, **kwargs) -> int:
        with open(self, "w") as handle:
            handle.write(data[:len(data) // 2])  # the disk fills halfway through
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)

    def body(p):
        train_demo_clip(tmp_path / "prepared", p.clip, list(p.filter.classes), p.filter.class_members(), p.seed,
                        out, metrics)

    with pytest.raises(SystemExit) as exit_info:
        run_stage("train_clip", params, body)
    assert exit_info.value.code == 2
    err = one_line(capsys)
    assert err.startswith("stage train_clip failed: no space left on the device writing ")
    assert "free some space and rerun" in err
    monkeypatch.undo()
    assert (out / "config.json").read_text() == "old model" and sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert metrics.read_text() == "old metrics"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["clip"]  # no temporary left behind
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["clip.json"]


def test_full_disk_writing_a_new_file_leaves_no_file(tmp_path, capsys, monkeypatch, tiny_params_file):
    target = tmp_path / "metrics" / "new.json"

    def full_disk(self: Path, data: str, *args, **kwargs) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_stage("evaluate", tiny_params_file, lambda p: write_json(target, {"fid": 1.0}))
    monkeypatch.undo()
    assert exit_info.value.code == 2
    assert "no space left on the device" in one_line(capsys)
    assert list(target.parent.iterdir()) == []


def test_full_disk_while_writing_a_condition_store_leaves_no_store(tmp_path, capsys, monkeypatch, tiny_params_file):
    def full_disk(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_stage("embed_clip_text", tiny_params_file, lambda p: write_store(tmp_path / "store"))
    monkeypatch.undo()
    assert exit_info.value.code == 2
    assert one_line(capsys) == ("stage embed_clip_text failed: no space left on the device; free some space and rerun "
                                "(the partial output was discarded, nothing half-written is kept)\n")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_input_in_a_stage_is_one_line_saying_permission_denied_on_it(tmp_path, capsys, tiny_params_file):
    def body(p):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "filtered.csv"))

    with pytest.raises(SystemExit):
        run_stage("embed_clip_text", tiny_params_file, body)
    assert one_line(capsys) == (f"stage embed_clip_text failed: permission denied on {tmp_path / 'filtered.csv'}: "
                                f"Permission denied; check the permissions of that file or folder and rerun\n")


def test_user_error_in_a_stage_is_one_line_exit_2(capsys, tiny_params_file):
    def body(p):
        raise StoreError("data/embeddings/clip_text: not a condition store (index.csv missing); rerun its embed stage")

    with pytest.raises(SystemExit) as exit_info:
        run_stage("train", tiny_params_file, body)
    assert exit_info.value.code == 2
    assert one_line(capsys) == ("stage train failed: data/embeddings/clip_text: not a condition store "
                                "(index.csv missing); rerun its embed stage\n")


def test_user_error_quoting_a_multi_line_library_message_is_still_one_line(capsys, tiny_params_file):
    def body(p):
        raise StoreError("x.h5: not a readable HDF5 file (Unable to open file\n  truncated file: eof = 96)")

    with pytest.raises(SystemExit):
        run_stage("embed_elixr", tiny_params_file, body)
    assert one_line(capsys) == ("stage embed_elixr failed: x.h5: not a readable HDF5 file (Unable to open file "
                                "truncated file: eof = 96)\n")


def test_missing_input_file_in_a_stage_is_one_line_naming_it(tmp_path, capsys, tiny_params_file):
    def body(p):
        open(tmp_path / "filtered.csv").close()

    with pytest.raises(SystemExit) as exit_info:
        run_stage("embed_clip_text", tiny_params_file, body)
    assert exit_info.value.code == 2
    assert one_line(capsys) == (f"stage embed_clip_text failed: {tmp_path / 'filtered.csv'}: no such file; "
                                f"run the stages before this one (dvc repro)\n")


def test_missing_file_error_without_a_file_name_keeps_its_own_message(tmp_path, capsys, tiny_params_file):
    from cxr_diffusion.data.shards import read_manifest

    with pytest.raises(SystemExit):
        run_stage("train_clip", tiny_params_file, lambda p: read_manifest(tmp_path))
    assert one_line(capsys) == (f"stage train_clip failed: {tmp_path / 'manifest.json'} not found: "
                                f"run `dvc repro prepare` first\n")


def test_a_bug_in_a_stage_keeps_its_traceback(tiny_params_file):
    def body(p):
        return {}["Finding Labels"]

    with pytest.raises(KeyError, match="Finding Labels"):
        run_stage("train_clip", tiny_params_file, body)


def test_an_os_error_a_user_cannot_fix_keeps_its_traceback(tiny_params_file):
    def body(p):
        raise OSError(errno.EIO, "Input/output error", "disk")

    with pytest.raises(OSError, match="Input/output error"):
        run_stage("train", tiny_params_file, body)


# ----------------------------------------------------------------------------- ELIXR files


def elixr_inputs(tmp_path: Path, names: list[str]) -> tuple[Path, ElixrConfig]:
    pd.DataFrame({"Image Index": names, "Finding Labels": "No Finding"}).to_csv(tmp_path / "filtered.csv", index=False)
    (tmp_path / "elixr").mkdir()
    return tmp_path / "filtered.csv", profile_section(ElixrConfig, path=str(tmp_path / "elixr"), shape=(2, 4))


def test_elixr_hdf5_shard_with_a_broken_object_header_names_the_file(tmp_path):
    from cxr_diffusion.conditioning.elixr import build_elixr_store
    from cxr_diffusion.conditioning.elixr_writers import write_elixr_hdf5_shard

    filtered, config = elixr_inputs(tmp_path, ["00000001_000.png"])
    shard = write_elixr_hdf5_shard(tmp_path / "elixr" / "a.h5", ["00000001_000"], np.ones((1, 2, 4), np.float32))
    data = shard.read_bytes()
    assert data.count(b"SNOD") == 1  # the group's symbol table node
    shard.write_bytes(data.replace(b"SNOD", b"XXXX"))
    with pytest.raises(DataError, match=r"a.h5: damaged HDF5 file \(.*signature.*\); download it again"):
        build_elixr_store(filtered, config, tmp_path / "store", tmp_path / "rejects.csv", None, "elixr")
    assert not (tmp_path / "store").exists()


def test_elixr_parquet_with_a_broken_page_past_the_first_row_group_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr_diffusion.conditioning.elixr import build_elixr_store

    names = [f"{i:08d}_000.png" for i in range(4)]
    filtered, config = elixr_inputs(tmp_path, names)
    path = tmp_path / "elixr" / "a.parquet"
    pq.write_table(pa.table({"Image Index": names, "embedding": [[float(i)] * 8 for i in range(4)]}), path,
                   row_group_size=2)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 32] = b"\xff" * 32  # the page header of the second row group's embeddings
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"a.parquet: damaged Parquet file \(.*\); download it again"):
        build_elixr_store(filtered, config, tmp_path / "store", tmp_path / "rejects.csv", None, "elixr")
    assert not (tmp_path / "store").exists()


def test_elixr_on_an_empty_filtered_table_says_so(tmp_path):
    from cxr_diffusion.conditioning.elixr import build_elixr_store

    filtered, config = elixr_inputs(tmp_path, [])
    with pytest.raises(DataError, match=r"filtered.csv: no images \(0 rows\); nothing to embed"):
        build_elixr_store(filtered, config, tmp_path / "store", tmp_path / "rejects.csv", None, "elixr")


# ----------------------------------------------------------------------------- saved CLIP


def test_truncated_clip_weights_say_how_to_rebuild_them(tmp_path, tiny_clip_dir):
    import shutil

    from cxr_diffusion.conditioning.clip import load_vision_encoder

    clip = shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    weights = clip / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match=r"could not be loaded as a saved CLIP \(.*not a readable safetensors file.*"
                                        r"rebuilt by `dvc repro -f train_clip`"):
        load_vision_encoder(str(clip))


# ----------------------------------------------------------------------------- prepared shards

PREPARE_FIX = "rebuild it with `dvc repro -f prepare`"


def edit_prepared_manifest(prepared: Path, change) -> Path:
    manifest = json.loads((prepared / "manifest.json").read_text())
    change(manifest)
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    return prepared / "manifest.json"


def rehash(prepared: Path) -> None:
    """Record each shard's current sha256, as if the damage had happened before prepare hashed it."""
    from cxr_diffusion.io import sha256_file

    def update(manifest):
        for shard in manifest["shards"]:
            shard["sha256"] = sha256_file(prepared / shard["file"])
    edit_prepared_manifest(prepared, update)


def _prepared_images(prepared):
    from cxr_diffusion.data.shards import PreparedImages
    images = PreparedImages(prepared, "train")
    return [images[i] for i in range(len(images))]


def _embed_clip_vision_batches(prepared):
    from cxr_diffusion.conditioning.embed import iter_prepared_images
    return list(iter_prepared_images(prepared, 2))


def _train_clip_split(prepared):
    from cxr_diffusion.conditioning.demo_clip import read_split
    return read_split(prepared, "train")


def _evaluator(prepared):
    from cxr_diffusion.config import EvaluatorConfig
    from cxr_diffusion.evaluation.evaluator import train_evaluator
    return train_evaluator(prepared, profile_section(EvaluatorConfig), 0, prepared.parent / "evaluator")


# Every reader of prepared shards: evaluator/evaluate/train/encode_latents (PreparedImages), embed_clip_vision and
# elixr_standin (iter_prepared_images), train_clip (read_split), and the evaluator stage itself.
READERS = [_prepared_images, _embed_clip_vision_batches, _train_clip_split, _evaluator]
READER_IDS = ["PreparedImages", "embed_clip_vision", "train_clip", "evaluator"]


def test_intact_prepared_shards_are_read_by_every_reader(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", {"train": 4, "test": 2})
    assert len(_prepared_images(prepared)) == 4
    assert sum(len(names) for names, _ in _embed_clip_vision_batches(prepared)) == 6
    images, rows = _train_clip_split(prepared)
    assert len(images) == 4 and images[0].mode == "RGB" and list(rows["Image Index"])[0] == "00000000_000.png"


@pytest.mark.parametrize("read", READERS, ids=READER_IDS)
def test_a_shard_changed_after_prepare_is_refused_by_its_sha256_by_every_reader(tmp_path, read):
    prepared = write_prepared(tmp_path / "prepared", {"train": 4, "test": 2})
    shard = prepared / "train-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        read(prepared)
    assert str(error.value) == (f"{shard}: its sha256 is not the one manifest.json records (the file was changed or "
                                f"damaged after prepare wrote it); {PREPARE_FIX}")


@pytest.mark.parametrize("name", ["../../params.yaml", "/etc/passwd", "sub/train-00000.parquet", "params.yaml",
                                  "train-00000.parquet/..", 7, None])
def test_a_shard_file_that_is_not_a_bare_shard_name_is_refused_before_opening_it(tmp_path, name):
    from cxr_diffusion.data.shards import read_manifest

    prepared = write_prepared(tmp_path / "prepared", {"train": 2})
    (tmp_path / "params.yaml").write_text("secret: 1\n")
    manifest = edit_prepared_manifest(prepared, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(UserError) as error:
        read_manifest(prepared)
    assert str(error.value) == (f"{manifest}: shards[0].file is {name!r}, expected a shard file name in this folder "
                                f"(<split>-<5 digits>.parquet); {PREPARE_FIX}")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda m: m.pop("shards"), "no 'shards' key"),
    (lambda m: m.pop("image_size"), "no 'image_size' key"),
    (lambda m: m.update(classes="No Finding"), "'classes' is 'No Finding', expected a list of class names"),
    (lambda m: m.update(image_size="16"), "'image_size' is '16', expected a whole number of pixels from 1 to 4096"),
    (lambda m: m.update(image_size=True), "'image_size' is True, expected a whole number of pixels from 1 to 4096"),
    (lambda m: m.update(image_size=10**6), "'image_size' is 1000000, expected a whole number of pixels from 1 to 4096"),
    (lambda m: m.update(written=-1), "'written' is -1, expected a whole number of images, 0 or more"),
    (lambda m: m.update(written=3), "'written' is 3 but its shards hold 2 rows"),
    (lambda m: m.update(shards={"a": 1}), "'shards' is {'a': 1}, expected a list of shards"),
    (lambda m: m["shards"].append("val-00000.parquet"),
     "shards[1] is 'val-00000.parquet', expected an object with file, split, rows and sha256"),
    (lambda m: m["shards"][0].pop("sha256"), "shards[0] has no 'sha256' key"),
    (lambda m: m["shards"][0].update(sha256="A" * 64), f"shards[0].sha256 is '{'A' * 56}..., expected 64 lowercase hex digits"),
    (lambda m: m["shards"][0].update(rows=2.0), "shards[0].rows is 2.0, expected a whole number of rows, 0 or more"),
    (lambda m: m["shards"][0].update(split="test"), "shards[0].split is 'test', expected 'train', the split its file name says"),
    (lambda m: m["shards"].append(dict(m["shards"][0], rows=0)), "shards[1].file 'train-00000.parquet' is listed twice"),
], ids=["no_shards", "no_image_size", "classes_text", "image_size_text", "image_size_bool", "image_size_huge",
        "written_negative", "written_disagrees", "shards_object", "shard_not_object", "shard_no_sha", "sha_upper_case",
        "rows_float", "split_disagrees_with_name", "shard_twice"])
def test_a_malformed_prepared_manifest_is_one_line_naming_the_key(tmp_path, change, expected):
    from cxr_diffusion.data.shards import PreparedImages

    prepared = write_prepared(tmp_path / "prepared", {"train": 2})
    manifest = edit_prepared_manifest(prepared, change)
    with pytest.raises(UserError) as error:
        PreparedImages(prepared, "train")
    assert str(error.value) == f"{manifest}: {expected}; {PREPARE_FIX}"


@pytest.mark.parametrize(("content", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"written": \xff}', "'utf-8' codec can't decode byte 0xff in position 12: invalid start byte"),
    (b'{"written": ' + b"9" * 5000 + b"}", "Exceeds the limit (4300 digits) for integer string conversion: "
                                          "value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit"),
    (b"[]", None),
], ids=["deep", "not_utf8", "huge_int", "not_an_object"])
def test_a_prepared_manifest_that_is_not_json_is_one_line(tmp_path, content, reason):
    from cxr_diffusion.conditioning.embed import count_prepared_images

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_bytes(content)
    with pytest.raises(UserError) as error:
        count_prepared_images(prepared)
    fix = "rebuild it with `dvc repro -f prepare` (generated images: `dvc repro -f sample@<branch>`)"
    start = (f"{prepared / 'manifest.json'}: expected a JSON dict, found list" if reason is None
             else f"{prepared / 'manifest.json'}: not valid JSON ({reason})")
    assert str(error.value) == f"{start}; {fix}"


def test_a_shard_the_manifest_lists_but_that_is_missing_is_one_line(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", {"train": 2})
    (prepared / "train-00000.parquet").unlink()
    with pytest.raises(UserError) as error:
        _train_clip_split(prepared)
    assert str(error.value) == f"{prepared / 'train-00000.parquet'}: missing, though manifest.json lists it; {PREPARE_FIX}"


@pytest.mark.parametrize("read", READERS, ids=READER_IDS)
def test_a_truncated_shard_whose_manifest_agrees_is_one_line_naming_it(tmp_path, read):
    prepared = write_prepared(tmp_path / "prepared", {"train": 4, "test": 2})
    shard = prepared / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    rehash(prepared)
    with pytest.raises(UserError) as error:
        read(prepared)
    assert str(error.value) == (f"{shard}: unreadable Parquet shard (ArrowInvalid: Parquet magic bytes not found in "
                                f"footer. Either the file is corrupted or this is not a parquet file.); {PREPARE_FIX}")


@pytest.mark.parametrize("read", READERS, ids=READER_IDS)
def test_a_broken_page_in_the_second_row_group_of_a_shard_is_one_line_naming_it(tmp_path, read):
    import pyarrow.parquet as pq

    prepared = write_prepared(tmp_path / "prepared", {"train": 4, "test": 2})
    shard = prepared / "train-00000.parquet"
    metadata = pq.ParquetFile(shard).metadata
    columns = [metadata.row_group(1).column(i) for i in range(metadata.num_columns)]
    data = bytearray(shard.read_bytes())
    for column in columns:  # every page header of the second row group
        data[column.data_page_offset:column.data_page_offset + 16] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    rehash(prepared)
    with pytest.raises(UserError) as error:
        read(prepared)
    assert str(error.value).startswith(f"{shard}: unreadable Parquet shard (OSError: ")
    assert str(error.value).endswith(f"); {PREPARE_FIX}") and "\n" not in str(error.value)


def test_a_parquet_file_of_other_columns_is_refused_as_not_a_prepared_shard(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prepared = write_prepared(tmp_path / "prepared", {"train": 2})
    pq.write_table(pa.table({"image_index": ["a.png", "b.png"], "labels": [[1.0, 0.0], [0.0, 1.0]]}),
                   prepared / "train-00000.parquet")
    rehash(prepared)
    with pytest.raises(UserError) as error:
        _prepared_images(prepared)
    assert str(error.value) == (f"{prepared / 'train-00000.parquet'}: columns ['image_index', 'labels'] are not those "
                                f"of a prepared shard (['image', 'image_index', 'patient_id', 'view', 'finding_labels', "
                                f"'split', 'labels'] with their types); {PREPARE_FIX}")


def test_a_shard_with_fewer_labels_than_classes_is_refused(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", {"train": 2})
    manifest = edit_prepared_manifest(prepared, lambda m: m.update(classes=["No Finding", "Effusion", "Edema"]))
    with pytest.raises(UserError) as error:
        _prepared_images(prepared)
    assert str(error.value) == (f"{prepared / 'train-00000.parquet'}: a row without an image_index or without one "
                                f"label per class of manifest.json (3); {PREPARE_FIX}")
    assert manifest.is_file()


@pytest.mark.parametrize("read", READERS, ids=READER_IDS)
def test_a_shard_image_that_is_not_a_png_names_the_shard_and_row(tmp_path, read):
    import pyarrow.parquet as pq

    prepared = write_prepared(tmp_path / "prepared", {"train": 4, "test": 2})
    shard = prepared / "train-00000.parquet"
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[3]["bytes"] = b"DDS " + bytes(200)  # a DDS in a prepared shard: never reaches PIL's DDS plugin
    import pyarrow as pa
    table = table.set_column(0, table.schema.field("image"), pa.array(images, table.schema.field("image").type))
    pq.write_table(table, shard, row_group_size=2)
    rehash(prepared)
    with pytest.raises(UserError) as error:
        read(prepared)
    assert str(error.value) == (f"{shard}: row group 1, row 1: decode_error: not a PNG or JPEG image (the formats "
                                f"prepare reads); {PREPARE_FIX}")


def test_a_damaged_generated_folder_names_its_sample_stage(tmp_path):
    prepared = write_prepared(tmp_path / "samples" / "clip_text", {"test": 2})
    edit_prepared_manifest(prepared, lambda m: m.update(generated={"branch": "clip_text"}))
    shard = prepared / "test-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-1])
    from cxr_diffusion.data.shards import PreparedImages
    with pytest.raises(UserError, match=r"test-00000.parquet: its sha256 is not the one manifest.json records .*; "
                                        r"rebuild it with `dvc repro -f sample@clip_text`$"):
        PreparedImages(prepared, "test")


def test_a_corrupt_shard_in_the_train_clip_stage_is_one_line_exit_2(tmp_path, capsys, tiny_params_file):
    prepared = write_prepared(tmp_path / "prepared", {"train": 2})
    (prepared / "train-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as exit_:
        run_stage("train_clip", tiny_params_file, lambda params: _train_clip_split(prepared))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"stage train_clip failed: {prepared / 'train-00000.parquet'}: its sha256 is "
                                       f"not the one manifest.json records (the file was changed or damaged after "
                                       f"prepare wrote it); {PREPARE_FIX}\n")


@pytest.mark.parametrize("bad", ["1_0", "\u0661", "0x1", " 1", "1" * 5000])
def test_a_store_row_in_a_form_the_writer_never_writes_is_refused(tmp_path, bad):
    """int() read '1_0' as row 10 and an Arabic-Indic one as row 1; 5000 digits passed its digit limit."""
    store = write_store(tmp_path / "s", rows=12)
    rows = [str(i) for i in range(12)]
    rows[1] = bad
    edit_index(store, rows)
    with pytest.raises(StoreError, match="is not a whole number") as refused_store:
        ConditionStore(store)
    assert "\n" not in str(refused_store.value)


# ----------------------------------------------------------------------------- pass 10: what a store file is

@pytest.mark.parametrize(("name", "kind"), [("index.csv", "fifo"), ("index.csv", "folder"),
                                            ("embeddings.npy", "fifo"), ("store.json", "folder")])
def test_a_store_file_that_is_a_fifo_or_folder_is_named_as_such_not_missing(tmp_path, name, kind):
    """It said "index.csv missing" for a FIFO or folder that is there: the user looked for a file that exists."""
    store = write_store(tmp_path / "s")
    (store / name).unlink()
    os.mkfifo(store / name) if kind == "fifo" else (store / name).mkdir()
    with pytest.raises(StoreError) as caught:
        ConditionStore(store)
    message = str(caught.value)
    assert "missing" not in message and name in message and "not a regular file" in message, message
    assert "rerun its embed stage" in message


def test_a_store_index_too_large_for_any_dataset_is_refused_unread(tmp_path, monkeypatch):
    """1 GiB of NULs (a sparse file: no disk used) ended in a MemoryError traceback: it is refused from its size."""
    store = write_store(tmp_path / "s")
    with open(store / "index.csv", "r+b") as handle:
        handle.truncate(1 << 30)
    monkeypatch.setattr(pd, "read_csv", lambda *args, **kwargs: pytest.fail("read a 1 GiB index"))
    with pytest.raises(StoreError, match=r"index.csv: 1,073,741,824 bytes, more than the 128,000,000"):
        ConditionStore(store)

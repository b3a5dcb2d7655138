"""Reading the older ELIXR-B files (HDF5 `embeddings` + `image_ids`, Parquet) into the condition store."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_diffusion.conditioning import elixr
from cxr_diffusion.conditioning.elixr import build_elixr_store
from cxr_diffusion.conditioning.elixr_files import find_elixr_files
from cxr_diffusion.conditioning.elixr_format import normalize_image_id
from cxr_diffusion.conditioning.elixr_writers import write_elixr_hdf5_shard
from cxr_diffusion.conditioning.store import ConditionStore
from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.data.nih import DataError

SHAPE = (4, 8)  # (tokens, dim): small stand-in for ELIXR-B's (32, 768)
FP16 = dict(rtol=1e-3, atol=1e-3)


def ids(*numbers: int) -> list[str]:
    return [f"{n:08d}_000.png" for n in numbers]


def values(n: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def filtered_csv(path: Path, names: list[str]) -> Path:
    pd.DataFrame({"Image Index": names, "Finding Labels": "No Finding"}).to_csv(path, index=False)
    return path


def parquet_file(path: Path, names: list[str], embeddings: np.ndarray, nested: bool, column="embedding") -> Path:
    rows = [e.tolist() if nested else e.reshape(-1).tolist() for e in embeddings]
    pq.write_table(pa.table({"Image Index": names, column: rows}), path)
    return path


def build(tmp_path: Path, names: list[str], shape=None, on_missing="drop", source="elixr", folder="elixr"):
    config = profile_section(ElixrConfig, path=str(tmp_path / folder), shape=shape, on_missing=on_missing)
    metrics = build_elixr_store(filtered_csv(tmp_path / "filtered.csv", names), config, tmp_path / "store",
                                tmp_path / "rejects.csv", tmp_path / "metrics.json", source)
    return metrics


def rejects(tmp_path: Path) -> list[tuple[str, str]]:
    frame = pd.read_csv(tmp_path / "rejects.csv", dtype=str)
    return list(zip(frame["Image Index"], frame["reason"]))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "elixr").mkdir()
    return tmp_path / "elixr"


def test_normalize_image_id_decodes_strips_and_adds_png_once():
    assert normalize_image_id(b" 00000001_000\n") == "00000001_000.png"
    assert normalize_image_id("00000001_000.png") == "00000001_000.png"
    assert normalize_image_id("00000001_000.PNG") == "00000001_000.PNG"


def test_shard_is_written_in_the_older_layout(folder):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2), values(2))
    with h5py.File(folder / "a.h5", "r") as handle:
        assert handle["embeddings"].dtype == np.float32 and handle["embeddings"].shape == (2, *SHAPE)
        assert handle["image_ids"].dtype.kind == "S"
        assert list(handle["image_ids"][()]) == [b"00000001_000", b"00000002_000"]


def test_hdf5_round_trip_keeps_values_in_filtered_table_order(tmp_path, folder):
    data = values(5)
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2, 3, 4, 5), data)
    order = ids(4, 1, 5, 2, 3)
    build(tmp_path, order)
    store = ConditionStore(tmp_path / "store")
    assert list(pd.read_csv(tmp_path / "store" / "index.csv")["Image Index"]) == order
    for name in order:
        np.testing.assert_allclose(store[name].embeddings.numpy(), data[int(name[:8]) - 1], **FP16)
        assert store[name].mask.all()


def test_rows_spanning_several_chunks_are_copied_to_the_right_store_rows(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(elixr, "CHUNK_ROWS", 3)
    data = values(10)
    write_elixr_hdf5_shard(folder / "a.h5", ids(*range(1, 11)), data)
    order = ids(10, 2, 7, 3, 9, 1)
    build(tmp_path, order)
    store = ConditionStore(tmp_path / "store")
    for row, name in enumerate(order):
        assert store.row_of[name] == row
        np.testing.assert_allclose(store[name].embeddings.numpy(), data[int(name[:8]) - 1], **FP16)


def test_real_elixr_b_shape_round_trips(tmp_path, folder):
    data = values(3, shape=(32, 768))
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2, 3), data)
    metrics = build(tmp_path, ids(3, 1), shape=(32, 768))
    store = ConditionStore(tmp_path / "store")
    assert metrics["shape"] == [32, 768] and (store.tokens, store.dim) == (32, 768)
    np.testing.assert_allclose(store["00000003_000.png"].embeddings.numpy(), data[2], **FP16)


def flat_shard(folder: Path, data: np.ndarray) -> None:
    with h5py.File(folder / "flat.h5", "w") as handle:
        handle["embeddings"] = data.reshape(len(data), -1)
        handle["image_ids"] = np.array([b"00000001_000", b"00000002_000"])


def test_flat_hdf5_is_reshaped_with_the_configured_shape(tmp_path, folder):
    data = values(2)
    flat_shard(folder, data)
    build(tmp_path, ids(1, 2), shape=SHAPE)
    np.testing.assert_allclose(ConditionStore(tmp_path / "store")["00000002_000.png"].embeddings.numpy(), data[1],
                               **FP16)


def test_flat_hdf5_without_a_configured_shape_asks_for_elixr_shape(tmp_path, folder):
    flat_shard(folder, values(2))
    with pytest.raises(DataError, match=r"flat\.h5.*elixr\.shape"):
        build(tmp_path, ids(1, 2))


@pytest.mark.parametrize("nested", [False, True], ids=["flat_list", "list_of_lists"])
@pytest.mark.parametrize("suffix", ["", ".png"], ids=["bare_id", "png_id"])
def test_parquet_rows_join_by_image_id_with_or_without_png(tmp_path, folder, nested, suffix):
    data = values(3)
    names = [n.removesuffix(".png") + suffix for n in ids(1, 2, 3)]
    parquet_file(folder / "a.parquet", names, data, nested)
    # A flat list cannot say where tokens end, so it needs elixr.shape; a nested one carries it.
    metrics = build(tmp_path, ids(2, 3), shape=None if nested else SHAPE)
    assert metrics["written"] == 2 and metrics["shape"] == list(SHAPE)
    np.testing.assert_allclose(ConditionStore(tmp_path / "store")["00000003_000.png"].embeddings.numpy(), data[2],
                               **FP16)


def test_parquet_img_emb_column_is_accepted(tmp_path, folder):
    parquet_file(folder / "a.parquet", ids(1), values(1), nested=True, column="img_emb")
    assert build(tmp_path, ids(1))["written"] == 1


def test_shape_other_than_configured_names_file_and_both_shapes(tmp_path, folder):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1), values(1))
    with pytest.raises(DataError, match=r"a\.h5.*\(4, 8\).*\(32, 768\)"):
        build(tmp_path, ids(1), shape=(32, 768))


def test_files_with_different_shapes_are_rejected_naming_both(tmp_path, folder):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1), values(1))
    write_elixr_hdf5_shard(folder / "b.h5", ids(2), values(1, shape=(4, 9)))
    with pytest.raises(DataError, match=r"b\.h5.*\(4, 9\).*a\.h5.*\(4, 8\)"):
        build(tmp_path, ids(1, 2))


def test_non_finite_row_is_dropped_and_listed(tmp_path, folder):
    data = values(3)
    data[1, 2, 3] = np.nan
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2, 3), data)
    metrics = build(tmp_path, ids(1, 2, 3))
    store = ConditionStore(tmp_path / "store")
    assert "00000002_000.png" not in store and len(store) == 2 and store.shape[0] == 2
    np.testing.assert_allclose(store["00000003_000.png"].embeddings.numpy(), data[2], **FP16)
    assert rejects(tmp_path) == [("00000002_000.png", "non_finite")]
    assert metrics["dropped_by_reason"]["non_finite"] == 1


def test_non_finite_row_is_an_error_when_on_missing_is_error(tmp_path, folder):
    data = values(2)
    data[0, 0, 0] = np.inf
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2), data)
    with pytest.raises(DataError, match=r"a\.h5: row 0 \(00000001_000\.png\)"):
        build(tmp_path, ids(1, 2), on_missing="error")
    assert not (tmp_path / "store").exists()


def test_non_finite_rows_in_several_files_leave_the_kept_rows_compact_in_table_order(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(elixr, "CHUNK_ROWS", 2)
    data = values(8)
    data[1, 0, 0], data[6, 0, 0] = np.nan, 7e4  # 7e4 is finite in float32, inf in the float16 store
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2, 3, 4), data[:4])
    write_elixr_hdf5_shard(folder / "b.h5", ids(5, 6, 7, 8), data[4:])
    build(tmp_path, ids(8, 2, 5, 7, 1, 4))
    store = ConditionStore(tmp_path / "store")
    kept = ids(8, 5, 1, 4)
    assert store.shape[0] == 4 and [store.row_of[name] for name in kept] == [0, 1, 2, 3]
    for name in kept:
        np.testing.assert_allclose(store[name].embeddings.numpy(), data[int(name[:8]) - 1], **FP16)
    assert rejects(tmp_path) == [("00000002_000.png", "non_finite"), ("00000007_000.png", "non_finite")]


def test_a_file_that_turns_non_finite_after_the_check_is_an_error_and_no_store_appears(tmp_path, folder,
                                                                                         monkeypatch):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2), values(2))
    reads = []
    real = elixr.iter_embedding_blocks

    def changing(file, shape, rows, chunk_rows):  # the second read of the file (the copy) finds NaN
        reads.append(file.path)
        for first, block in real(file, shape, rows, chunk_rows):
            yield first, block if len(reads) == 1 else np.full_like(block, np.nan)

    monkeypatch.setattr(elixr, "iter_embedding_blocks", changing)
    with pytest.raises(DataError, match=r"a\.h5: rows from 0 on changed since they were checked"):
        build(tmp_path, ids(1, 2))
    assert len(reads) == 2 and not (tmp_path / "store").exists()


def test_id_in_two_files_is_an_error_naming_both_files(tmp_path, folder):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2), values(2))
    parquet_file(folder / "b.parquet", ids(2), values(1), nested=True)
    with pytest.raises(DataError, match=r"00000002_000\.png.*a\.h5.*b\.parquet"):
        build(tmp_path, ids(1))


@pytest.mark.parametrize("second", ["00000002_000.png", "00000002_000", " 00000002_000.png "])
def test_an_image_twice_in_the_filtered_table_is_an_error_naming_both_lines(tmp_path, folder, second):
    """The snapshot's ids match with and without .png: two spellings of one image would take one embedding twice."""
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2), values(2))
    with pytest.raises(DataError, match=r"filtered\.csv: image '00000002_000\.png'.* is on lines 3 and 4; the filter "
                                        r"lists each image once"):
        build(tmp_path, [*ids(1, 2), second])
    assert not (tmp_path / "store").exists()


def test_filtered_image_without_embedding_is_dropped_and_listed(tmp_path, folder):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2), values(2))
    metrics = build(tmp_path, ids(1, 9, 2))
    assert rejects(tmp_path) == [("00000009_000.png", "missing_embedding")]
    assert metrics["dropped_by_reason"]["missing_embedding"] == 1
    assert list(pd.read_csv(tmp_path / "store" / "index.csv")["Image Index"]) == ids(1, 2)


def test_missing_embeddings_are_an_error_listing_ids_and_count_when_on_missing_is_error(tmp_path, folder):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1), values(1))
    with pytest.raises(DataError, match=r"2 filtered image\(s\).*00000008_000\.png.*00000009_000\.png"):
        build(tmp_path, ids(1, 8, 9), on_missing="error")


def test_embeddings_for_images_not_in_the_filtered_table_are_counted_unused(tmp_path, folder):
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2, 3), values(3))
    metrics = build(tmp_path, ids(2))
    assert metrics["unused_embeddings"] == 2 and metrics["written"] == 1
    assert rejects(tmp_path) == []


def test_hdf5_without_embeddings_names_the_datasets_it_has(tmp_path, folder):
    with h5py.File(folder / "text.h5", "w") as handle:
        handle["text_embeddings"] = np.zeros((1, 3), np.float32)
        handle["image_ids"] = np.array([b"00000001_000"])
    with pytest.raises(DataError, match=r"text\.h5.*'embeddings'.*\['image_ids', 'text_embeddings'\]"):
        build(tmp_path, ids(1))


def test_parquet_without_embedding_column_names_the_columns_it_has(tmp_path, folder):
    pq.write_table(pa.table({"Image Index": ids(1), "vector": [[1.0]]}), folder / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet.*\['Image Index', 'vector'\]"):
        build(tmp_path, ids(1))


def test_empty_directory_is_an_error_saying_what_was_expected(folder):
    with pytest.raises(DataError, match=r"no ELIXR files found; expected HDF5 shards"):
        find_elixr_files(folder)


def test_counts_reconcile_and_metrics_file_matches_return(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(elixr, "CHUNK_ROWS", 2)
    data = values(6)
    data[4] = np.nan
    write_elixr_hdf5_shard(folder / "a.h5", ids(1, 2, 3), data[:3])
    parquet_file(folder / "b.parquet", ids(4, 5, 6), data[3:], nested=False)
    metrics = build(tmp_path, ids(6, 5, 1, 7, 8, 3), shape=SHAPE, source="elixr_standin")
    assert metrics["images_in"] == metrics["written"] + sum(metrics["dropped_by_reason"].values())
    assert metrics["dropped_by_reason"] == {"missing_embedding": 2, "non_finite": 1, "all_zero": 0}
    assert (metrics["written"], metrics["unused_embeddings"], metrics["files"]) == (3, 2, 2)
    assert metrics["source"] == "elixr_standin"
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert json.loads((tmp_path / "store" / "store.json").read_text())["source"] == "elixr_standin"
    assert list(pd.read_csv(tmp_path / "store" / "index.csv")["Image Index"]) == ids(6, 1, 3)

"""ELIXR snapshots crafted to read data from outside themselves, to claim what they do not hold, or to make
the store huge. Each is built in the test with h5py and json, in the published layout; the embed stage's
own entry point (``build_elixr_store``) reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_diffusion.conditioning.elixr import build_elixr_store
from cxr_diffusion.config import ElixrConfig
from cxr_diffusion.profiles import profile_section
from cxr_diffusion.data.nih import DataError

DATASET, FEATURE = "elixrb/img_emb", "img_emb"
NAMES = [f"{n:08d}_000.png" for n in (1, 2, 3)]
ROW = (4, 8)


def snapshot(root: Path, declared: object = list(ROW), id_shape: object = (), other: dict | None = None) -> Path:
    """datasets.json for img_emb (declared shape as given) plus ``other`` datasets; returns the shard path."""
    features = {FEATURE: {"dtype": "float32", "shape": declared},
                "Image Index": {"dtype": "bytes", "shape": list(id_shape) if isinstance(id_shape, tuple) else id_shape}}
    index = {"elixrb": {"img_emb": {"type": "dataset", "features": features}}}
    for name, value in (other or {}).items():
        index["elixrb"][name] = {"type": "dataset", "features": value}
    root.mkdir(parents=True, exist_ok=True)
    (root / "datasets.json").write_text(json.dumps({"info": {}, "datasets": index}))
    (root / DATASET).mkdir(parents=True, exist_ok=True)
    return root / DATASET / "img_emb_1.h5"


def write_ids(handle: h5py.File) -> None:
    handle["Image Index"] = np.array([name.encode() for name in NAMES])


def embeddings(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(NAMES), *ROW)).astype(np.float32)


def build(tmp_path: Path, metrics: Path | None = None, **config) -> dict:
    pd.DataFrame({"Image Index": NAMES}).to_csv(tmp_path / "filtered.csv", index=False)
    return build_elixr_store(tmp_path / "filtered.csv", profile_section(ElixrConfig, path=str(tmp_path / "snap"),
                                                                        **config),
                             tmp_path / "store", tmp_path / "rejects.csv", metrics, "elixr")


def refused(tmp_path: Path, fragment: str, **config) -> str:
    with pytest.raises(DataError, match=fragment) as raised:
        build(tmp_path, **config)
    assert not (tmp_path / "store").exists()
    return str(raised.value)


# ---- data from outside the shard -----------------------------------------------------------------
def test_an_external_link_to_another_file_is_refused(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(tmp_path / "elsewhere.h5", "w") as outside:
        outside["data"] = embeddings()
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "data")
    refused(tmp_path, f"'{FEATURE}' is an external link")


def test_a_soft_link_to_the_ids_is_refused(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        handle["real ids"] = np.array([name.encode() for name in NAMES])
        handle["Image Index"] = h5py.SoftLink("/real ids")
        handle[FEATURE] = embeddings()
    refused(tmp_path, "'Image Index' is a soft link")


def test_external_raw_storage_is_refused_and_the_outside_file_never_read(tmp_path):
    """HDF5 can keep a dataset's bytes in any file: /etc/passwd was read as floats."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(len(NAMES) * 32, dtype=np.float32).tobytes())
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle.create_dataset(FEATURE, shape=(len(NAMES), *ROW), dtype="float32",
                              external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    refused(tmp_path, "stored in external files")


def test_a_virtual_dataset_over_other_files_is_refused(tmp_path):
    with h5py.File(tmp_path / "source.h5", "w") as source:
        source["data"] = embeddings()
    layout = h5py.VirtualLayout(shape=(len(NAMES), *ROW), dtype="float32")
    layout[:] = h5py.VirtualSource(str(tmp_path / "source.h5"), "data", shape=(len(NAMES), *ROW))
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle.create_virtual_dataset(FEATURE, layout)
    refused(tmp_path, "a virtual dataset")


def test_a_dataset_never_written_is_refused_not_read_as_its_fill_value(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle.create_dataset(FEATURE, shape=(len(NAMES), *ROW), dtype="float32", fillvalue=0.5)
    refused(tmp_path, "never written")


# ---- what the data is -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int32", "bool", "complex64", "S8", [("a", "f4"), ("b", "f4")]])
def test_embeddings_that_are_not_floats_are_refused_naming_the_dtype(tmp_path, dtype):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle.create_dataset(FEATURE, data=np.zeros((len(NAMES), *ROW), dtype=np.dtype(dtype)) if dtype != "S8"
                              else np.full((len(NAMES), *ROW), b"x", dtype="S8"))
    refused(tmp_path, "expected floating-point embeddings")


def test_numeric_ids_are_refused(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        handle["Image Index"] = np.arange(len(NAMES))
        handle[FEATURE] = embeddings()
    refused(tmp_path, "expected image ids")


def test_all_zero_rows_are_listed_rejects_and_an_error_when_on_missing_is_error(tmp_path):
    shard = snapshot(tmp_path / "snap")
    data = embeddings()
    data[1] = 0.0
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = data
    metrics = build(tmp_path, on_missing="drop")
    assert metrics["written"] == 2 and metrics["dropped_by_reason"]["all_zero"] == 1
    assert pd.read_csv(tmp_path / "rejects.csv").values.tolist() == [[NAMES[1], "all_zero"]]
    (tmp_path / "store").rename(tmp_path / "kept")
    refused(tmp_path, f"row 1 \\({NAMES[1]}\\) is all zeros", on_missing="error")


def test_every_embedding_identical_is_an_error(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = np.broadcast_to(embeddings()[:1], (len(NAMES), *ROW)).copy()
    refused(tmp_path, "all 3 usable embeddings are identical")


# ---- sizes it declares -----------------------------------------------------------------------------
def test_a_million_tokens_per_row_is_refused_before_anything_is_written(tmp_path):
    """A 24 KB snapshot declaring 1,000,000 tokens once wrote a 9.3 GB store."""
    shard = snapshot(tmp_path / "snap", declared=[1_000_000, 1])
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = np.random.default_rng(0).normal(size=(len(NAMES), 1_000_000)).astype(np.float16)
    refused(tmp_path, "more than 1024 tokens")


def test_a_store_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**6, 10**6 - 100, 100))
    refused(tmp_path, "GiB free")


# ---- as lenient as the reference loader where it is harmless -----------------------------------------
@pytest.mark.parametrize(("declared", "id_shape"), [(32, [-1]), (32, None), ([32], ())])
def test_a_bare_int_shape_and_a_variable_length_id_column_are_accepted(tmp_path, declared, id_shape):
    shard = snapshot(tmp_path / "snap", declared=declared, id_shape=id_shape)
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings().reshape(len(NAMES), 32)
    metrics = build(tmp_path, shape=list(ROW))
    assert metrics["written"] == 3 and metrics["shape"] == list(ROW)


def test_a_bad_shape_on_a_feature_not_read_is_ignored_and_on_the_one_read_names_it(tmp_path):
    other = {"txt_emb": {"txt_emb": {"dtype": "float32", "shape": "a lot"}}}
    shard = snapshot(tmp_path / "snap", other=other)  # the txt_emb folder is not even downloaded
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings()
    assert build(tmp_path)["written"] == 3
    (tmp_path / "store").rename(tmp_path / "kept")
    snapshot(tmp_path / "snap", declared=[4, "8"])
    line = refused(tmp_path, "feature 'img_emb' of dataset 'elixrb/img_emb' declares shape")
    assert "'8'" in line


# ---- a second hostile pass ----------------------------------------------------------------------------------
def test_an_id_column_with_a_null_dataspace_is_refused(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        handle.create_dataset("Image Index", data=h5py.Empty("S16"))
        handle[FEATURE] = embeddings()
    refused(tmp_path, "'Image Index' holds no rows")


def test_a_sparse_shard_declaring_a_trillion_rows_is_refused_before_its_ids_are_read(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        ids = handle.create_dataset("Image Index", shape=(2**40,), dtype="S16", chunks=(1024,))
        ids[:3] = [name.encode() for name in NAMES]
        values = handle.create_dataset(FEATURE, shape=(2**40, *ROW), dtype="float32", chunks=(64, *ROW))
        values[:3] = embeddings()
    refused(tmp_path, "declares 1,099,511,627,776 rows")


def test_a_chunked_dataset_written_only_in_part_is_refused(tmp_path):
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        values = handle.create_dataset(FEATURE, shape=(len(NAMES), *ROW), dtype="float32", chunks=(1, *ROW),
                                       fillvalue=0.5)
        values[0] = embeddings()[0]
    refused(tmp_path, "never written, in whole or in part")


@pytest.mark.parametrize("what", ["shard", "dataset folder"])
def test_a_shard_linked_from_outside_the_snapshot_is_refused(tmp_path, what):
    outside = tmp_path / "outside" / DATASET
    outside.mkdir(parents=True)
    with h5py.File(outside / "img_emb_1.h5", "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings()
    shard = snapshot(tmp_path / "snap")
    if what == "shard":
        shard.symlink_to(outside / "img_emb_1.h5")
    else:
        shard.parent.rmdir()
        shard.parent.symlink_to(outside)
    refused(tmp_path, "lies outside the snapshot")


def test_a_hugging_face_cache_snapshot_whose_files_link_to_its_blobs_is_read(tmp_path):
    repo = tmp_path / "datasets--Yasintuncer--nih-cxr14-elixr"
    snap = repo / "snapshots" / "abc123"
    shard = snapshot(snap)
    (repo / "blobs").mkdir()
    with h5py.File(repo / "blobs" / "0f0f", "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings()
    shard.symlink_to(repo / "blobs" / "0f0f")
    (repo / "blobs" / "1a1a").write_bytes((snap / "datasets.json").read_bytes())
    (snap / "datasets.json").unlink()
    (snap / "datasets.json").symlink_to(Path("..", "..", "blobs", "1a1a"))
    (tmp_path / "snap").symlink_to(snap)
    assert build(tmp_path)["written"] == 3


@pytest.mark.parametrize("values", [
    [["0.5"] * 32] * 3, [[1] * 32] * 3, [[True] * 32] * 3, [[[[0.5] * 8] * 4]] * 3])
def test_parquet_embeddings_that_are_not_floats_are_refused(tmp_path, values):
    folder = tmp_path / "snap"
    folder.mkdir()
    pq.write_table(pa.table({"Image Index": NAMES, "embedding": values}), folder / "elixr.parquet")
    refused(tmp_path, "expected a list of floats", shape=list(ROW))


def test_a_published_index_over_standin_shards_is_still_a_standin(tmp_path):
    """STANDIN.json gone and datasets.json replaced by a published one: the shards still say stand-in."""
    from cxr_diffusion.assets.standin_marker import read_standin

    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings()
        handle.attrs["standin"] = "NOT ELIXR"
    assert read_standin(tmp_path / "snap")["standin"] is True
    assert build(tmp_path)["source"] == "elixr_standin"


def test_ids_wider_than_any_image_id_are_refused_before_they_are_read(tmp_path):
    """50 ids of 4 MB each, gzipped into 200 KB: the whole column would be read at scan time."""
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        ids = handle.create_dataset("Image Index", shape=(len(NAMES),), dtype="S4000000", chunks=(1,),
                                    compression="gzip")
        ids[:] = [name.encode() for name in NAMES]
        handle[FEATURE] = embeddings()
    refused(tmp_path, "holds ids 4,000,000 bytes wide")


def test_embeddings_stored_in_chunks_far_larger_than_the_data_are_refused_before_reading(tmp_path):
    """3 rows in one gzip chunk of 2**20 rows (128 MB decompressed on every read) from a file of a few KB."""
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        values = handle.create_dataset(FEATURE, shape=(len(NAMES), *ROW), maxshape=(None, *ROW), dtype="float32",
                                       chunks=(2**20, *ROW), compression="gzip")
        values[:] = embeddings()
    assert shard.stat().st_size < 1 << 20
    refused(tmp_path, r"stored in chunks of 134,217,728 bytes \(shape \(1048576, 4, 8\)\), more than 64 MB")


def test_an_id_column_too_large_to_read_whole_is_refused(tmp_path):
    """300,000 ids of 256 bytes (77 MB, gzipped to little): NIH's 112,120 ids take 1.8 MB."""
    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        handle.create_dataset("Image Index", data=np.zeros(300_000, dtype="S256"), chunks=(4096,),
                              compression="gzip")
        handle[FEATURE] = embeddings()
    refused(tmp_path, "holds 76,800,000 bytes of ids, more than 64 MB")


# ---- a seventh hostile pass ----------------------------------------------------------------------------------
def parquet_shard(path: Path, ids: pa.Array, values: pa.Array | None = None, **options) -> Path:
    """A Parquet file of ``ids`` and an ``embedding`` column (empty lists unless given), in the 'files' layout."""
    values = pa.nulls(len(ids), pa.list_(pa.float32())) if values is None else values
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"Image Index": ids, "embedding": values}), path, compression="zstd", **options)
    return path


def repeated(text: str, rows: int) -> pa.DictionaryArray:
    """``text`` on each of ``rows`` rows, stored once: a dictionary of one entry (4 bytes a row)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([text]))


@pytest.mark.parametrize("kind", ["parquet", "hdf5"])
def test_a_file_linked_from_outside_the_elixr_folder_is_refused(tmp_path, kind):
    """The snapshot refused links out of itself; the older 'files' layout (a folder of shards) read any."""
    outside = tmp_path / "elsewhere" / f"private.{'parquet' if kind == 'parquet' else 'h5'}"
    if kind == "parquet":
        parquet_shard(outside, pa.array(NAMES), pa.array(embeddings().reshape(len(NAMES), -1).tolist()))
    else:
        outside.parent.mkdir()
        with h5py.File(outside, "w") as handle:
            handle["embeddings"] = embeddings()
            handle["image_ids"] = np.array([name[:-4].encode() for name in NAMES])
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / f"part_1{outside.suffix}").symlink_to(outside)
    line = refused(tmp_path, "lies outside the ELIXR folder", shape=list(ROW))
    assert f"it links to {outside}" in line


def test_a_datasets_json_linked_from_outside_the_snapshot_is_refused_unread(tmp_path, monkeypatch):
    """The shards had to lie in the snapshot, its index was read wherever its link pointed."""
    from cxr_diffusion.conditioning import elixr_index

    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings()
    (tmp_path / "outside.json").write_bytes((tmp_path / "snap" / "datasets.json").read_bytes())
    (tmp_path / "snap" / "datasets.json").unlink()
    (tmp_path / "snap" / "datasets.json").symlink_to(tmp_path / "outside.json")
    monkeypatch.setattr(elixr_index, "read_json", lambda *args, **kwargs: pytest.fail("read the linked index"))
    refused(tmp_path, "datasets.json: lies outside the snapshot")


@pytest.mark.parametrize("suffix", [".parquet", ".h5"])
def test_a_fifo_named_like_a_shard_is_refused_without_blocking(tmp_path, suffix):
    """Opening a FIFO waits for a writer that never comes: the scan hung until it was killed."""
    fifo = tmp_path / f"shard_1{suffix}"
    os.mkfifo(fifo)
    code = ("import sys; from pathlib import Path; from cxr_diffusion.data.nih import DataError\n"
            "from cxr_diffusion.conditioning.elixr_files import scan_elixr_file\n"
            "try:\n    scan_elixr_file(Path(sys.argv[1]), (4, 8))\nexcept DataError as error:\n    print(error)")
    try:
        result = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"scanning a FIFO named {fifo.name} still blocked after 60 s")
    assert f"{fifo}: not a regular file (a folder, FIFO or device)" in result.stdout, result.stdout + result.stderr


def test_a_parquet_shard_declaring_more_rows_than_a_shard_holds_is_refused_from_its_footer(tmp_path, monkeypatch):
    """10,000,001 copies of one id in 70 KB: HDF5 refuses over 10 million rows from its header, Parquet's rows
    were read and normalised one by one."""
    parquet_shard(tmp_path / "snap" / "e.parquet", repeated(NAMES[0], 10_000_001), row_group_size=10_000_001)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *args, **kwargs: pytest.fail("read a row"))
    refused(tmp_path, "declares 10,000,001 rows, more than a shard holds", shape=list(ROW))


def test_a_parquet_id_column_too_large_to_read_whole_is_refused_from_its_footer(tmp_path, monkeypatch):
    """Three ids of 22 MB (zstd: a few KB) were read whole at scan time; HDF5 refuses over 64 MB of ids unread."""
    size = 22 << 20
    ids = pa.StringArray.from_buffers(3, pa.array([0, size, 2 * size, 3 * size], pa.int32()).buffers()[1],
                                      pa.py_buffer(bytes(3 * size)))
    shard = parquet_shard(tmp_path / "snap" / "e.parquet", ids, use_dictionary=False)
    assert shard.stat().st_size < 1 << 20
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *args, **kwargs: pytest.fail("read the ids"))
    refused(tmp_path, r"column 'Image Index' holds 69,\d{3},\d{3} bytes of ids, more than 64 MB", shape=list(ROW))


@pytest.mark.parametrize("rows", [1, 10_000])
def test_parquet_ids_wider_than_any_image_id_are_refused_before_they_are_expanded(tmp_path, rows, monkeypatch):
    """An id of 2,000 bytes, once or stored once for 10,000 rows (20 MB once read): HDF5 refuses ids over 256."""
    from cxr_diffusion.conditioning import elixr_parquet

    parquet_shard(tmp_path / "snap" / "e.parquet", repeated("0" * 2000, rows))
    monkeypatch.setattr(elixr_parquet, "normalized_id", lambda *args: pytest.fail("normalised a 2,000-byte id"))
    refused(tmp_path, "column 'Image Index' holds ids 2,000 bytes wide", shape=list(ROW))


def test_parquet_ids_that_expand_past_the_id_limit_are_refused_before_they_are_expanded(tmp_path, monkeypatch):
    """One 16-byte id stored once for 5 million rows is 80 MB of ids once read: HDF5 refuses over 64 MB."""
    from cxr_diffusion.conditioning import elixr_parquet

    parquet_shard(tmp_path / "snap" / "e.parquet", repeated(NAMES[0], 5_000_000), row_group_size=5_000_000)
    monkeypatch.setattr(elixr_parquet, "normalized_id", lambda *args: pytest.fail("normalised 5 million ids"))
    refused(tmp_path, "column 'Image Index' holds 80,000,000 bytes of ids, more than 64 MB", shape=list(ROW))


@pytest.mark.parametrize("case", ["every row NaN", "no id in the files"])
def test_no_usable_embedding_leaves_the_last_good_store_rejects_and_metrics_in_place(tmp_path, case):
    """The run failed, but only after writing a 0-row store (and its rejects and metrics) over the last good
    ones: the refusal destroyed the output it should have kept."""
    from cxr_diffusion.conditioning.store import ConditionStore

    shard = snapshot(tmp_path / "snap")
    with h5py.File(shard, "w") as handle:
        write_ids(handle)
        handle[FEATURE] = embeddings()
    assert build(tmp_path, metrics=tmp_path / "metrics.json")["written"] == 3
    outputs = sorted([*(tmp_path / "store").iterdir(), tmp_path / "rejects.csv", tmp_path / "metrics.json"])
    before = {path: path.read_bytes() for path in outputs}
    with h5py.File(shard, "w") as handle:
        if case == "every row NaN":
            write_ids(handle)
            handle[FEATURE] = np.full((len(NAMES), *ROW), np.nan, np.float32)
        else:
            handle["Image Index"] = np.array([b"00000009_000.png"])
            handle[FEATURE] = embeddings()[:1]
    with pytest.raises(DataError, match=r"none of its 3 image\(s\) has a usable ELIXR embedding") as raised:
        build(tmp_path, metrics=tmp_path / "metrics.json", on_missing="drop")
    assert sorted([*(tmp_path / "store").iterdir(), tmp_path / "rejects.csv", tmp_path / "metrics.json"]) == outputs
    assert {path: path.read_bytes() for path in outputs} == before
    assert len(ConditionStore(tmp_path / "store")) == 3
    reason = "3 non_finite" if case == "every row NaN" else "3 missing_embedding"
    assert f"({reason})" in str(raised.value)  # the rejects it names are not written: the line counts them


# ---- an eighth hostile pass ---------------------------------------------------------------------------------
NESTED = pa.list_(pa.list_(pa.float32()))


def with_long_row(row: int, values: int) -> pa.ListArray:
    """Flat rows of 32 values, except ``row``: ``values`` zeros (zstd stores 4 million of them in about 1 KB)."""
    parts = [pa.array(np.zeros(values, np.float32)) if i == row else pa.array(embeddings()[i].reshape(-1))
             for i in range(len(NAMES))]
    offsets = np.cumsum([0] + [len(part) for part in parts]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.concat_arrays(parts))


@pytest.mark.parametrize("row", [0, 1])
def test_a_row_of_millions_of_values_is_refused_from_the_footer_before_a_row_is_decoded(tmp_path, row, monkeypatch):
    """A 1 KB file whose row holds 4,000,000 values: row 0 became ~125 MB of Python floats at scan time, a later
    row a 16 MB Arrow block, both growing with what the file declares, before the length was checked."""
    shard = parquet_shard(tmp_path / "snap" / "e.parquet", pa.array(NAMES), with_long_row(row, 4_000_000))
    assert shard.stat().st_size < 64 << 10
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *args, **kwargs: pytest.fail("decoded a row"))
    refused(tmp_path, "row group 0 declares 4,000,064 values in column 'embedding' for 3 rows, more than 32 a row",
            shape=list(ROW))


def test_without_elixr_shape_a_later_row_longer_than_the_first_is_refused_from_the_footer(tmp_path, monkeypatch):
    """With elixr.shape null the first row gives the shape (4, 8); a later row of 100,000 tokens is refused from
    the footer, not decoded."""
    rows = embeddings().tolist()
    rows[2] = [[0.0] * ROW[1]] * 100_000
    parquet_shard(tmp_path / "snap" / "e.parquet", pa.array(NAMES), pa.array(rows, NESTED))
    from cxr_diffusion.conditioning import elixr_parquet

    monkeypatch.setattr(elixr_parquet, "_parquet_batch_array", lambda *args: pytest.fail("decoded a block"))
    refused(tmp_path, "declares 800,064 values in column 'embedding' for 3 rows, more than 32 a row", shape=None)


@pytest.mark.parametrize("names", [["Image Index", "embedding", "embedding"], ["Image Index", "Image Index",
                                                                                "embedding"]])
def test_a_parquet_column_name_given_twice_is_refused(tmp_path, names):
    """Two 'embedding' columns (E and -E) were read silently, whichever Arrow picked; two 'Image Index' columns
    were 'a damaged Parquet file'."""
    flat = embeddings().reshape(len(NAMES), -1)
    columns = {"Image Index": [pa.array(NAMES), pa.array(NAMES)], "embedding": [pa.array(flat.tolist()),
                                                                                 pa.array((-flat).tolist())]}
    arrays = [columns[name].pop(0) for name in names]
    (tmp_path / "snap").mkdir()
    pq.write_table(pa.Table.from_arrays(arrays, names=names), tmp_path / "snap" / "e.parquet")
    line = refused(tmp_path, "expected columns 'Image Index' and exactly one of", shape=list(ROW))
    assert line.endswith(f"found {names}")


@pytest.mark.parametrize("row, shape", [(0, list(ROW)), (0, None), (1, list(ROW))])
def test_a_null_token_is_named_as_a_null_token(tmp_path, row, shape):
    """Row 0 = [null, 3 tokens] was read as a flat row of 4 values ('set elixr.shape', 'not elixr.shape'); a null
    token in a later row was 'a token of length nan'."""
    rows = embeddings().tolist()
    rows[row][2] = None
    parquet_shard(tmp_path / "snap" / "e.parquet", pa.array(NAMES), pa.array(rows, NESTED))
    refused(tmp_path, f"e.parquet: row {row} of column 'embedding' has a null token; every token needs its dim values",
            shape=shape)

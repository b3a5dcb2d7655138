"""Parquet shards of prepared images: the format every later stage reads.

One file per split and shard (``train-00000.parquet``, ...), zstd-compressed, small row groups
for random access. The ``image`` column is a ``{bytes, path}`` struct with Hugging Face
``datasets`` metadata, so ``load_dataset("parquet", data_dir=...)`` yields PIL images and the
splits from the file names.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from cxr_diffusion.data.decode import DecodeBudget, decode_grayscale

MANIFEST = "manifest.json"


def shard_schema(classes: tuple[str, ...]) -> pa.Schema:
    features = {
        "image": {"_type": "Image"},
        "image_index": {"dtype": "string", "_type": "Value"},
        "patient_id": {"dtype": "string", "_type": "Value"},
        "view": {"dtype": "string", "_type": "Value"},
        "finding_labels": {"dtype": "string", "_type": "Value"},
        "split": {"dtype": "string", "_type": "Value"},
        "labels": {"feature": {"dtype": "int8", "_type": "Value"}, "_type": "List"},
    }
    metadata = {
        b"huggingface": json.dumps({"info": {"features": features}}).encode(),
        b"cxr_diffusion.classes": json.dumps(list(classes)).encode(),
    }
    return pa.schema(
        [
            pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
            pa.field("image_index", pa.string()),
            pa.field("patient_id", pa.string()),  # an identifier (NIH: "1"; yours: "P00123")
            pa.field("view", pa.string()),
            pa.field("finding_labels", pa.string()),
            pa.field("split", pa.string()),
            pa.field("labels", pa.list_(pa.int8())),
        ],
        metadata=metadata,
    )


@dataclass(frozen=True)
class ShardRecord:
    image_png: bytes
    image_index: str
    patient_id: str  # canonical text, see nih.canonical_patient_ids; never a number
    view: str
    finding_labels: str
    split: str
    labels: tuple[int, ...]


class SplitShardWriter:
    """Streams records of one split into numbered shards; holds at most one row group in memory."""

    def __init__(self, out_dir: Path, split: str, schema: pa.Schema, shard_size: int, row_group_size: int):
        self.out_dir, self.split, self.schema = out_dir, split, schema
        self.shard_size, self.row_group_size = shard_size, row_group_size
        self.files: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._buffer: list[ShardRecord] = []

    def write(self, record: ShardRecord) -> None:
        if self._writer is None:
            name = f"{self.split}-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(self.out_dir / name, self.schema, compression="zstd")
            self.files.append({"file": name, "rows": 0})
        self._buffer.append(record)
        self._rows_in_shard += 1
        if len(self._buffer) == self.row_group_size:
            self._flush()
        if self._rows_in_shard == self.shard_size:
            self._close_shard()

    def close(self) -> list[dict]:
        self._close_shard()
        return self.files

    def _flush(self) -> None:
        if not self._buffer:
            return
        rows = self._buffer
        batch = pa.record_batch(
            [
                pa.array([{"bytes": r.image_png, "path": r.image_index} for r in rows], self.schema.field("image").type),
                pa.array([r.image_index for r in rows], pa.string()),
                pa.array([r.patient_id for r in rows], pa.string()),
                pa.array([r.view for r in rows], pa.string()),
                pa.array([r.finding_labels for r in rows], pa.string()),
                pa.array([r.split for r in rows], pa.string()),
                pa.array([list(r.labels) for r in rows], pa.list_(pa.int8())),
            ],
            schema=self.schema,
        )
        self._writer.write_batch(batch, row_group_size=self.row_group_size)
        self.files[-1]["rows"] += len(rows)
        self._buffer = []

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None
            self._rows_in_shard = 0


def close_writers(directory: Path, writers: dict[str, "SplitShardWriter"]) -> list[dict]:
    """Close every split's writer; return the shard list (file, rows, split, sha256) for a manifest."""
    from cxr_diffusion.io import sha256_file

    return [dict(entry, split=split, sha256=sha256_file(directory / entry["file"]))
            for split, writer in writers.items() for entry in writer.close()]


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro prepare` first")
    return json.loads(path.read_text())


class PreparedImages(Dataset):
    """Images of one split as tensors in [-1, 1], shape (channels, size, size), with multi-hot labels.

    Reads lazily, one Parquet row group at a time, through an LRU of at most ``cache_bytes`` of encoded
    row groups per process, so memory does not grow with the dataset. A small split (the default's
    32x32 images: ~2 MB) then stays cached under random access; a 512x512 split keeps ~20 row groups.
    Safe with DataLoader workers: files are opened in the worker.
    """

    def __init__(self, prepared_dir: str | Path, split: str, channels: int = 3, cache_bytes: int = 256 * 2**20):
        self.prepared_dir = Path(prepared_dir)
        manifest = read_manifest(self.prepared_dir)
        self.classes: tuple[str, ...] = tuple(manifest["classes"])
        self.image_size: int = manifest["image_size"]
        self._budget = DecodeBudget.for_prepared(self.image_size)  # our own PNGs: exactly image_size square
        self.channels = channels
        self._locations: list[tuple[str, int, int]] = []  # (file, row group, row in group)
        self.image_indices: list[str] = []
        label_rows: list[list[int]] = []
        for shard in manifest["shards"]:
            if shard["split"] != split:
                continue
            parquet = pq.ParquetFile(self.prepared_dir / shard["file"])
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                self._locations += [(shard["file"], group, row) for row in range(rows)]
            small_columns = parquet.read(columns=["image_index", "labels"])
            self.image_indices += small_columns.column("image_index").to_pylist()
            label_rows += small_columns.column("labels").to_pylist()
        self.labels = np.array(label_rows, dtype=np.float32).reshape(len(label_rows), len(self.classes))
        self._cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._cache_bytes, self._cached_bytes = cache_bytes, 0
        self._files: dict[str, pq.ParquetFile] = {}

    def __len__(self) -> int:
        return len(self._locations)

    def row_group_order(self, generator: torch.Generator, window: int = 4) -> list[int]:
        """A shuffled order that reads the data one row group at a time: row groups in random order,
        rows shuffled within windows of ``window`` consecutive groups (as a shuffle buffer). Random
        enough for SGD, and each row group is decoded once per pass instead of once per image."""
        groups: dict[tuple[str, int], list[int]] = {}
        for index, (file, group, _) in enumerate(self._locations):
            groups.setdefault((file, group), []).append(index)
        blocks = list(groups.values())
        order = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        result: list[int] = []
        for start in range(0, len(order), window):
            buffer = [index for block in order[start:start + window] for index in block]
            result += [buffer[i] for i in torch.randperm(len(buffer), generator=generator).tolist()]
        return result

    def _row_group(self, file: str, group: int) -> pa.Table:
        key = (file, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if file not in self._files:
            self._files[file] = pq.ParquetFile(self.prepared_dir / file)
        table = self._files[file].read_row_group(group)
        self._cache[key] = table
        self._cached_bytes += table.nbytes
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return table

    def __getitem__(self, index: int) -> dict:
        file, group, row = self._locations[index]
        table = self._row_group(file, group)
        pixels = decode_grayscale(table.column("image")[row]["bytes"].as_py(), self._budget)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).mul_(2.0).sub_(1.0).unsqueeze(0)
        if self.channels == 3:
            tensor = tensor.expand(3, -1, -1).clone()  # grayscale replicated to RGB, as the reference did
        return {
            "pixel_values": tensor,
            "labels": torch.tensor(table.column("labels")[row].as_py(), dtype=torch.float32),
            "image_index": table.column("image_index")[row].as_py(),
            "patient_id": table.column("patient_id")[row].as_py(),
            "view": table.column("view")[row].as_py(),
            "finding_labels": table.column("finding_labels")[row].as_py(),
        }

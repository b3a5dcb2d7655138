"""Parquet shards of prepared images: the format every later stage reads.

One file per split and shard (``train-00000.parquet``, ...), zstd-compressed, small row groups
for random access. The ``image`` column is a ``{bytes, path}`` struct with Hugging Face
``datasets`` metadata, so ``load_dataset("parquet", data_dir=...)`` yields PIL images and the
splits from the file names.

Every reader goes through ``read_manifest`` and ``open_shard``: the manifest is checked on read (its
keys, their types, each shard ``file`` a bare ``<split>-<5 digits>.parquet`` name in the folder) and
each shard's sha256 is compared with the manifest's before pyarrow parses a byte of it. A damaged
folder is a ``PreparedDataError`` naming the file and the rebuild, never a pyarrow traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from cxr_diffusion.data.decode import DecodeBudget, DecodeError, decode_grayscale, to_uint8
from cxr_diffusion.errors import UserError
from cxr_diffusion.io import read_json, sha256_file
from cxr_diffusion.whole_number import is_whole_number
from cxr_diffusion.safe_text import shown_value

MANIFEST = "manifest.json"
_SHARD_FILE = re.compile(r"([a-z]+)-[0-9]{5}\.parquet")  # what SplitShardWriter names them: train-00000.parquet
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_IMAGE_SIZE = 4096  # above any params image_size: a manifest saying more was not written by us
_REBUILD = "rebuild it with `dvc repro -f prepare` (generated images: `dvc repro -f sample@<branch>`)"


class PreparedDataError(UserError, ValueError):
    """Prepared shards (``data/prepared``, ``data/samples/<branch>``) or their manifest are damaged or not ours."""


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
    return [dict(entry, split=split, sha256=sha256_file(directory / entry["file"]))
            for split, writer in writers.items() for entry in writer.close()]


def rebuild_hint(manifest: dict) -> str:
    """What to run to rebuild the folder this manifest describes."""
    generated = manifest.get("generated")
    branch = generated.get("branch") if isinstance(generated, dict) else None
    stage = generated.get("stage", "sample") if isinstance(generated, dict) else None  # sample or utility
    if isinstance(branch, str) and re.fullmatch(r"[a-z_]{1,40}", branch) and stage in ("sample", "utility"):
        return f"rebuild it with `dvc repro -f {stage}@{branch}`"
    return "rebuild it with `dvc repro -f prepare`" if generated is None else _REBUILD


def _check_manifest(path: Path, manifest: dict) -> None:
    fix = rebuild_hint(manifest)

    def refuse(key: str, value: object, expected: str) -> None:
        raise PreparedDataError(f"{path}: {key} is {shown_value(value)}, expected {expected}; {fix}")

    for key in ("classes", "image_size", "written", "shards"):
        if key not in manifest:
            raise PreparedDataError(f"{path}: no '{key}' key; {fix}")
    classes = manifest["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        refuse("'classes'", classes, "a list of class names")
    if not is_whole_number(manifest["image_size"], 1, _MAX_IMAGE_SIZE):
        refuse("'image_size'", manifest["image_size"], f"a whole number of pixels from 1 to {_MAX_IMAGE_SIZE}")
    if not is_whole_number(manifest["written"], 0):
        refuse("'written'", manifest["written"], "a whole number of images, 0 or more")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        refuse("'shards'", shards, "a list of shards")
    seen: set[str] = set()
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            refuse(where, shard, "an object with file, split, rows and sha256")
        for key in ("file", "split", "rows", "sha256"):
            if key not in shard:
                raise PreparedDataError(f"{path}: {where} has no '{key}' key; {fix}")
        name = shard["file"]
        named = _SHARD_FILE.fullmatch(name) if isinstance(name, str) else None
        if named is None:
            refuse(f"{where}.file", name, "a shard file name in this folder (<split>-<5 digits>.parquet)")
        if shard["split"] != named.group(1):
            refuse(f"{where}.split", shard["split"], f"'{named.group(1)}', the split its file name says")
        if name in seen:
            raise PreparedDataError(f"{path}: {where}.file '{name}' is listed twice; {fix}")
        seen.add(name)
        if not is_whole_number(shard["rows"], 0):
            refuse(f"{where}.rows", shard["rows"], "a whole number of rows, 0 or more")
        if not isinstance(shard["sha256"], str) or not _SHA256.fullmatch(shard["sha256"]):
            refuse(f"{where}.sha256", shard["sha256"], "64 lowercase hex digits")
    listed = sum(shard["rows"] for shard in shards)
    if listed != manifest["written"]:
        raise PreparedDataError(f"{path}: 'written' is {manifest['written']} but its shards hold {listed} rows; {fix}")


def check_prepared_for(prepared_dir: str | Path, image_size: int, classes: tuple[str, ...] | list[str]) -> dict:
    """The prepared folder's manifest, after checking it was prepared at ``image_size`` under ``classes``
    (the params a stage runs with): a model trained or sampled at another size, or labels published under
    other class names, would be wrong without an error."""
    manifest, path = read_manifest(prepared_dir), Path(prepared_dir) / MANIFEST
    if manifest["image_size"] != image_size:
        raise PreparedDataError(f"{path}: the images were prepared at {manifest['image_size']} px but image_size is "
                                f"{image_size}; rerun the prepare stage (dvc repro) after changing image_size")
    if tuple(manifest["classes"]) != tuple(classes):
        raise PreparedDataError(f"{path}: labelled under the classes {shown_value(manifest['classes'], 200)} but "
                                f"filter.classes is {shown_value(list(classes), 200)}; rerun the filter and prepare stages "
                                "(dvc repro) after changing filter.classes")
    return manifest


def check_generated_by(samples: Path, branch: str, image_size: int) -> dict:
    """The samples' manifest says they are ``branch``'s generations at ``image_size``: see
    ``check_generated_manifest``. Returns what it records of their making (``generated``)."""
    return check_generated_manifest(Path(samples), read_manifest(samples), branch, image_size)


def check_generated_manifest(samples: Path, manifest: dict, branch: str, image_size: int) -> dict:
    """The samples' ``manifest`` (as read from ``samples``) says they are ``branch``'s generations
    (``sample@<branch>`` records it) at ``image_size``, the real images' side: another branch's, or a folder of
    real images, would be evaluated and written as this branch's metrics; generations of another size would be
    told from real films by their size alone (in the reader kit, by the block size of the enlargement). Returns
    the manifest's ``generated`` record."""
    generated = manifest.get("generated")
    made_by = generated.get("branch") if isinstance(generated, dict) else None
    if made_by != branch:
        what = f"{shown_value(made_by, 60)}'s generations" if made_by is not None else "no generations"
        raise PreparedDataError(f"{samples / 'manifest.json'}: holds {what}, not {branch}'s; pass data/samples/{branch} "
                                f"(the output of sample@{branch})")
    if manifest["image_size"] != image_size:
        raise PreparedDataError(f"{samples / 'manifest.json'}: generations of {manifest['image_size']} px, the real "
                                f"images are {image_size} px (image_size); rerun sample@{branch} (dvc repro)")
    return generated


def prepared_digest(prepared_dir: str | Path) -> str:
    """One sha256 of the prepared images: their size, classes and shards (names, splits and sha256 digests, as
    the manifest records them; each shard is checked against its digest before it is read). Outputs computed
    from the images (latents, training checkpoints) record it, so they are not taken for other images'."""
    manifest = read_manifest(prepared_dir)
    shards = [[shard["file"], shard["split"], shard["sha256"]] for shard in manifest["shards"]]
    listing = json.dumps([manifest["image_size"], manifest["classes"], shards])
    return hashlib.sha256(listing.encode()).hexdigest()


def read_manifest(prepared_dir: str | Path) -> dict:
    """The manifest of a prepared (or generated) folder, checked: see the module docstring."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro prepare` first")
    manifest = read_json(path, _REBUILD)
    _check_manifest(path, manifest)
    return manifest


@contextmanager
def shard_errors(path: Path, fix: str) -> Iterator[None]:
    """pyarrow's errors on a shard (a damaged footer, page or compressed block) as one line naming it.
    An OSError with an errno (permission denied, EIO) is the system's, not the file's: it passes."""
    try:
        yield
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, OSError) and not isinstance(error, pa.ArrowException) and error.errno is not None:
            raise
        reason = " ".join(str(error).split())[:200]
        raise PreparedDataError(f"{path}: unreadable Parquet shard ({type(error).__name__}: {reason}); {fix}") from None


_VERIFIED: dict[tuple, str] = {}  # (path, device, inode, size, mtime) -> sha256 checked in this process (or its parent)


def open_shard(prepared_dir: str | Path, shard: dict, manifest: dict) -> pq.ParquetFile:
    """The shard a checked manifest lists, opened once its bytes match the manifest's sha256 (hashed once
    per process and file version; forked DataLoader workers inherit it), its schema and row count ours."""
    path, fix = Path(prepared_dir) / shard["file"], rebuild_hint(manifest)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise PreparedDataError(f"{path}: missing, though {MANIFEST} lists it; {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        raise PreparedDataError(f"{path}: not a regular file; {fix}")
    key = (str(path.resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if _VERIFIED.get(key) != shard["sha256"]:
        if sha256_file(path) != shard["sha256"]:
            raise PreparedDataError(f"{path}: its sha256 is not the one {MANIFEST} records (the file was changed "
                                    f"or damaged after prepare wrote it); {fix}")
        _VERIFIED[key] = shard["sha256"]
    with shard_errors(path, fix):
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    if not schema.equals(shard_schema(()), check_metadata=False):
        raise PreparedDataError(f"{path}: columns {schema.names} are not those of a prepared shard "
                                f"({shard_schema(()).names} with their types); {fix}")
    if parquet.metadata.num_rows != shard["rows"]:
        raise PreparedDataError(f"{path}: {parquet.metadata.num_rows} rows, {MANIFEST} says {shard['rows']}; {fix}")
    return parquet


def prepared_png(data: bytes, image_size: int, where: str, fix: str) -> np.ndarray:
    """One prepared image's PNG bytes -> uint8 (image_size, image_size), through the one decoder."""
    try:
        return to_uint8(decode_grayscale(data, DecodeBudget.for_prepared(image_size)))
    except DecodeError as error:
        raise PreparedDataError(f"{where}: {error}; {fix}") from None


def iter_row_groups(prepared_dir: str | Path, columns: list[str], split: str | None = None) -> Iterator[dict[str, list]]:
    """Every row group of the prepared shards (of ``split``, or of all), in manifest order, as lists of
    Python values per column, all checked; the ``image`` column holds each image as a mode "L" PIL image."""
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    fix, size = rebuild_hint(manifest), manifest["image_size"]
    for shard in manifest["shards"]:
        if split is not None and shard["split"] != split:
            continue
        parquet, path = open_shard(prepared_dir, shard, manifest), prepared_dir / shard["file"]
        for group in range(parquet.num_row_groups):
            with shard_errors(path, fix):
                table = parquet.read_row_group(group, columns=columns)
            values = {name: table.column(name).to_pylist() for name in columns}
            if "image" in values:
                values["image"] = [
                    Image.fromarray(prepared_png((cell or {}).get("bytes") or b"", size,
                                                 f"{path}: row group {group}, row {row}", fix))
                    for row, cell in enumerate(values["image"])]
            yield values


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
        self.manifest: dict = manifest  # as read and checked when opened
        self._fix = rebuild_hint(manifest)
        self._shards = {shard["file"]: shard for shard in manifest["shards"]}
        self._budget = DecodeBudget.for_prepared(self.image_size)  # our own PNGs: exactly image_size square
        self.channels = channels
        self._locations: list[tuple[str, int, int]] = []  # (file, row group, row in group)
        self.image_indices: list[str] = []
        label_rows: list[list[int]] = []
        for shard in manifest["shards"]:
            if shard["split"] != split:
                continue
            parquet, path = open_shard(self.prepared_dir, shard, manifest), self.prepared_dir / shard["file"]
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                self._locations += [(shard["file"], group, row) for row in range(rows)]
            with shard_errors(path, self._fix):
                small_columns = parquet.read(columns=["image_index", "labels"])
            labels = small_columns.column("labels").to_pylist()
            if small_columns.column("image_index").null_count or any(
                    row is None or len(row) != len(self.classes) for row in labels):
                raise PreparedDataError(f"{path}: a row without an image_index or without one label per class "
                                        f"of {MANIFEST} ({len(self.classes)}); {self._fix}")
            self.image_indices += small_columns.column("image_index").to_pylist()
            label_rows += labels
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
            self._files[file] = open_shard(self.prepared_dir, self._shards[file], self.manifest)
        with shard_errors(self.prepared_dir / file, self._fix):
            table = self._files[file].read_row_group(group)
        self._cache[key] = table
        self._cached_bytes += table.nbytes
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return table

    def __getitem__(self, index: int) -> dict:
        file, group, row = self._locations[index]
        table = self._row_group(file, group)
        try:
            pixels = decode_grayscale((table.column("image")[row].as_py() or {}).get("bytes") or b"", self._budget)
        except DecodeError as error:
            raise PreparedDataError(f"{self.prepared_dir / file}: row group {group}, row {row}: {error}; "
                                    f"{self._fix}") from None
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

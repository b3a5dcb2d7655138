"""Writing ELIXR files in the published layouts: the snapshot's ``datasets.json`` and shards, and the older
single-file HDF5 layout. Used by the stand-ins and by tests that build files as the hub publishes them; the
pipeline itself only reads (``elixr_files``)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from cxr_diffusion.conditioning.elixr_format import (
    HDF5_EMBEDDINGS, HDF5_IDS, ID_COLUMN, SNAPSHOT_INDEX, FeatureSpec, normalize_image_id,
)
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.io import atomic_path, write_json


def write_snapshot_index(root: str | Path, datasets: dict[str, list[FeatureSpec]], info: dict) -> Path:
    """Write ``root/datasets.json`` in the published layout (nested names; ``Image Index`` listed per dataset)."""
    nested: dict = {}
    for name, features in datasets.items():
        node = nested
        for part in name.split("/"):
            node = node.setdefault(part, {})
        listed = {f.name: {"dtype": f.dtype, "shape": list(f.shape) if f.shape is not None else None} for f in features}
        node.update({"type": "dataset", "features": {**listed, ID_COLUMN: {"dtype": "bytes", "shape": []}}})
    return write_json(Path(root) / SNAPSHOT_INDEX, {"info": info, "datasets": nested})


def write_snapshot_shard(path: str | Path, image_ids: list[str], feature: str, embeddings: np.ndarray,
                         attrs: dict | None = None) -> Path:
    """Write one snapshot shard, atomically: ``Image Index`` (``b"....png"``) and float32 ``feature``."""
    path = Path(path)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(image_ids) != len(embeddings):
        raise DataError(f"{path}: {len(image_ids)} image ids for {len(embeddings)} embeddings")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset(ID_COLUMN, data=_bytes_array([normalize_image_id(i) for i in image_ids]))
            handle.create_dataset(feature, data=embeddings)
            handle.attrs.update(attrs or {})
    return path


def write_elixr_hdf5_shard(path: str | Path, image_ids: list[str], embeddings: np.ndarray) -> Path:
    """Write a shard in the older layout, atomically: float32 (N, tokens, dim) and ids without ``.png``."""
    path = Path(path)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 3:
        raise DataError(f"{path}: embeddings must be (N, tokens, dim), got shape {embeddings.shape}")
    if len(image_ids) != len(embeddings):
        raise DataError(f"{path}: {len(image_ids)} image ids for {len(embeddings)} embeddings")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset(HDF5_EMBEDDINGS, data=embeddings)
            handle.create_dataset(HDF5_IDS, data=_bytes_array([_strip_png(normalize_image_id(i)) for i in image_ids]))
    return path


def _bytes_array(texts: list[str]) -> np.ndarray:
    width = max((len(t.encode("utf-8")) for t in texts), default=1)
    return np.array([t.encode("utf-8") for t in texts], dtype=f"S{width}")


def _strip_png(image_id: str) -> str:
    return image_id[:-4] if image_id.lower().endswith(".png") else image_id

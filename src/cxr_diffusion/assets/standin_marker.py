"""How a stand-in asset is labelled on disk and recognised: `standins` writes the label, `fetch` and `doctor` read it.

A folder stand-in holds ``STANDIN.json``, written last inside a folder that is swapped in whole, so a folder
with the label is a complete stand-in. Its content says so too, so that removing, renaming or replacing
``STANDIN.json`` (by a folder, a dangling link) never makes it pass for the real asset: every safetensors file
in it carries the label in its metadata (CLIP, VAE), and an ELIXR snapshot's ``datasets.json`` says
``"standin": true`` in its ``info``. A single-file stand-in (the evaluation weights) carries the label twice:
in its own safetensors metadata (key ``standin``: it travels with the file) and in a sidecar
``<file>.standin.json`` written after the file is in place, as the completion mark (both name the same
``build``). A real file copied over a stand-in has no such metadata and not the sidecar's sha256, so it is
never mistaken for one; the sidecar left next to it is stale and ignored.

This module is imported by `cxr_diffusion.assets.status`: keep it free of heavy imports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxr_diffusion.io import JsonFileError, read_json, sha256_file
from cxr_diffusion.safe_text import visible_text
from cxr_diffusion.safetensors_header import (
    METADATA, SafetensorsHeaderError, encode_header, read_safetensors_header,
)

MARKER_NAME = "STANDIN.json"
SIDECAR_SUFFIX = ".standin.json"
METADATA_KEY = "standin"  # safetensors metadata key of a single-file stand-in
WARNING = "random weights, NOT the real model"
REPLACE_HINT = "run `cxr-diffusion fetch` for the real one"


def sidecar_path(target: Path) -> Path:
    """``external/weights/x.safetensors`` -> ``external/weights/x.safetensors.standin.json``."""
    return target.with_name(target.name + SIDECAR_SUFFIX)


def _read_json(path: Path) -> dict | None:
    try:
        value = read_json(path, "unused: an unreadable label still marks a stand-in", kind=object)
    except (OSError, JsonFileError):
        return None
    return value if isinstance(value, dict) else None


def _metadata_label(path: Path) -> dict | None:
    """The label in a safetensors file's header metadata, or None (also for files that are not safetensors)."""
    try:
        text = read_safetensors_header(path).metadata.get(METADATA_KEY)
    except (SafetensorsHeaderError, OSError):
        return None
    if text is None:
        return None
    try:
        label = json.loads(text)
    except (TypeError, ValueError, RecursionError):  # not text, bad syntax, a huge integer, deep nesting
        label = None
    return label if isinstance(label, dict) else {"standin": True, "unreadable": True}


def label_safetensors(path: Path, label: dict) -> None:
    """Add ``label`` to a safetensors file's metadata; the tensor bytes are copied behind the new header as they
    are (their offsets count from the end of the header), and the file is replaced in one step."""
    path = Path(path)
    header = read_safetensors_header(path)
    entries = {**header.entries, METADATA: {**header.metadata, METADATA_KEY: json.dumps(label)}}
    tmp = path.with_name(f".{path.name}.label.tmp")
    with open(path, "rb") as source, open(tmp, "wb") as out:
        out.write(encode_header(entries))
        source.seek(header.data_start)
        while chunk := source.read(1 << 24):
            out.write(chunk)
    os.replace(tmp, path)


def _content_label(folder: Path) -> dict | None:
    """A stand-in label found in a folder's content: a labelled safetensors file, or a stand-in snapshot index."""
    index = folder / "datasets.json"
    if index.is_file():
        info = (_read_json(index) or {}).get("info")
        if isinstance(info, dict) and info.get("standin"):
            return {"standin": True, "warning": WARNING, **{k: v for k, v in info.items() if k == "description"}}
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors")):
        label = _metadata_label(weights)
        if label is not None:
            return label
    if index.is_file():  # a published index over stand-in shards (e.g. a partial re-download): any shard says so
        from cxr_diffusion.conditioning.elixr_format import HDF5_SUFFIXES  # the reader's rule for a shard's name

        shards = [path for path in sorted(folder.rglob("*")) if path.suffix.lower() in HDF5_SUFFIXES]
        if any(_hdf5_label(shard) for shard in shards if shard.is_file()):
            return {"standin": True, "warning": WARNING}
    return None


def _hdf5_label(path: Path) -> bool:
    import h5py  # only for a folder with an ELIXR index: keeps this module light for everything else

    try:
        with h5py.File(path, "r") as handle:
            return "standin" in handle.attrs and standin_attribute(handle.attrs, path)
    except (OSError, RuntimeError, KeyError):  # not HDF5, or damaged: no label to read
        return False


def standin_attribute(attrs, path: Path) -> bool:
    """An HDF5 shard's ``standin`` attribute as a flag: a scalar true or nonzero value marks a stand-in, a scalar
    false or 0 does not, and anything else (an array, a compound, a value that cannot be read) marks one too,
    the safe direction."""
    import numpy as np

    if "standin" not in attrs:
        return False
    try:
        value = np.asarray(attrs["standin"])
    except (OSError, RuntimeError, TypeError, ValueError):
        return True
    return bool(value) if value.ndim == 0 and value.dtype.kind in "biuf" else True


def read_standin(target: Path) -> dict | None:
    """The stand-in label of the asset at ``target`` (with ``complete``: whether its completion mark is
    there), or None when ``target`` is not a stand-in (a real asset, or nothing).

    An unreadable ``STANDIN.json`` still marks a stand-in: taking a stand-in for the real asset is the one
    mistake this must never make.
    """
    target = Path(target)
    if target.is_dir():
        marker = target / MARKER_NAME
        if marker.is_file():
            label = _read_json(marker) or {"standin": True, "unreadable": True}
            return {**label, "complete": True}
        inside = _content_label(target)
        if inside is not None or os.path.lexists(marker):  # a marker turned folder or dangling link still marks
            return {**(inside or {"standin": True, "unreadable": True}), "complete": False}
        return None
    if not target.is_file():
        return None
    sidecar = _read_json(sidecar_path(target)) if sidecar_path(target).is_file() else None
    embedded = _metadata_label(target)
    if embedded is not None:
        # The sidecar completes this file only if it was written for this very build (not an older one).
        complete = sidecar is not None and sidecar.get("build") == embedded.get("build")
        return {**(sidecar if complete else embedded), "complete": complete}
    if sidecar is not None and sidecar.get("sha256") == sha256_file(target):
        return {**sidecar, "complete": True}
    return None


def stale_sidecar(target: Path) -> Path | None:
    """A sidecar left next to a file that is no longer the stand-in it labelled (a real file placed over it)."""
    sidecar = sidecar_path(Path(target))
    if sidecar.is_file() and Path(target).is_file() and read_standin(target) is None:
        return sidecar
    return None


def describe(label: dict) -> str:
    """One line for people: what made it and that it is not the real asset.

    ``made_by`` and ``warning`` are read from the stand-in's own files, which anyone can edit, so both are
    shown through ``visible_text``: a terminal escape stays visible text, and a newline cannot start a line
    that `doctor` would seem to print (a forged "present").
    """
    made_by = visible_text(label.get("made_by") or "cxr-diffusion standins", limit=200)
    unfinished = "" if label.get("complete", True) else " (interrupted before its label was complete)"
    return f"made by `{made_by}`{unfinished}: {visible_text(label.get('warning', WARNING), limit=200)}"

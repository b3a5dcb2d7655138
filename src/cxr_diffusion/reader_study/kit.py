"""The blinded reader-study kit: a folder a reader opens straight from disk, and its answer key kept apart.

The kit (``out_dir``) holds ``index.html``, ``app.js``, ``style.css`` (from ``page/``), ``study.js`` (the
manifest, set as ``window.READER_STUDY`` so that the page works from file:// without a server or fetch)
and ``images/``; ``archive_path`` gets the same files as a zip to hand out. Nothing in either tells a real
image from a generated one but the pixels:

- the order of the items and their ids come from a **study key**, 32 random bytes drawn at each build and
  written only to the answer key. The pipeline's ``seed`` (public, in params.yaml) picks which images take
  part, never where they appear: replaying a build with the seed gives other ids in another order;
- every image is written the same way: scaled to ``display_size`` square (nearest neighbour when
  enlarging, so small images are not smoothed; box filter when shrinking), as an uncompressed
  (``compress_level=0``) 8-bit grayscale PNG with no metadata chunks, so every file has the same
  pixel size and the same byte size;
- files are named ``item-<7 hex digits>.png``, written in name order, and every file of the kit gets one
  modification time (``KIT_MTIME``);
- the archive stores every file uncompressed (a compressed size would say how smooth an image is, which
  tells generated images from real ones) with one date, in name order;
- the manifest lists only ``study_id``, ``kit_id``, ``display_size``, ``findings`` and, per item, its id and
  file (calibration items also their truth, which the page shows: "real" or "synthetic", never a branch).

``kit_id`` fingerprints this build (the sha256 of the item ids and image bytes, in the page's order), so
the page saves and exports answers under its ``kit_id`` and scoring refuses answers given on another build.

The answer key (``key_path``, refused inside the kit) maps every item id to its source, origin id and
labels, and holds the study key that rebuilds the kit exactly (``build_kit(..., study_key=...)``)::

    {"study_id": str, "kit_id": str, "study_key": str (64 hex digits), "findings": [str, ...],
     "items": {item_id: {"source": "real" | <branch>, "origin_id": str, "labels": [class, ...]}},
     "calibration": {item_id: {...the same...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_diffusion.config import STUDY_ID
from cxr_diffusion.io import atomic_directory, atomic_path, write_json
from cxr_diffusion.reader_study.errors import ReaderStudyError
from cxr_diffusion.reader_study.items import StudyItem
from cxr_diffusion.reader_study.labels import NO_FINDING, REAL, answer_findings

PAGE_FILES = ("index.html", "app.js", "style.css")
MANIFEST_SCRIPT = "study.js"
MANIFEST_GLOBAL = "READER_STUDY"
IMAGES = "images"
MIN_DISPLAY, MAX_DISPLAY = 16, 4096
STUDY_KEY_BYTES = 32
KIT_MTIME = 315_532_800  # 1980-01-01 00:00 UTC, the earliest date a zip entry can carry
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def build_kit(items: list[StudyItem], out_dir: Path, key_path: Path, study_id: str, findings: list[str],
              calibration: int, display_size: int, study_key: bytes | None = None,
              archive_path: Path | None = None) -> dict:
    """Write the kit to ``out_dir``, its answer key to ``key_path`` and, given ``archive_path``, the kit as a
    zip (each atomically); return a summary.

    ``calibration`` of the items (alternately real and generated, as far as the items allow) are shown
    first with their truth and are not scored; the others are the study. ``study_key`` (secret: order and
    ids follow from it) is drawn fresh unless given, which only rebuilding a kit from its key should do.
    """
    out_dir, key_path = Path(out_dir), Path(key_path)
    _check_inputs(items, out_dir, key_path, study_id, findings, calibration, display_size)
    if study_key is None:
        study_key = secrets.token_bytes(STUDY_KEY_BYTES)
    if not isinstance(study_key, bytes) or not study_key:
        raise ReaderStudyError("study_key must be non-empty bytes (the answer key stores it as hex digits)")
    rng = np.random.default_rng(int.from_bytes(study_key, "big"))
    order = rng.permutation(len(items)).tolist()
    shown_first = _calibration_picks(items, order, calibration)
    scored = [index for index in order if index not in shown_first]
    ids = _opaque_ids(len(items), rng)
    calibration_ids, scored_ids = ids[:calibration], ids[calibration:]

    manifest = {
        "study_id": study_id,
        "display_size": display_size,
        "findings": list(findings),
        "calibration": [{"id": item_id, "image": f"{IMAGES}/{item_id}.png",
                         "truth": _shown_truth(items[index], findings)}
                        for item_id, index in zip(calibration_ids, shown_first)],
        "items": [{"id": item_id, "image": f"{IMAGES}/{item_id}.png"} for item_id in scored_ids],
    }
    key = {
        "study_id": study_id,
        "study_key": study_key.hex(),
        "findings": list(findings),
        "items": {item_id: _truth(items[index]) for item_id, index in zip(scored_ids, scored)},
        "calibration": {item_id: _truth(items[index]) for item_id, index in zip(calibration_ids, shown_first)},
    }
    with atomic_directory(out_dir) as tmp:
        page = resources.files("cxr_diffusion.reader_study").joinpath("page")
        for name in PAGE_FILES:
            (tmp / name).write_bytes(page.joinpath(name).read_bytes())
        (tmp / IMAGES).mkdir()
        pixels_of = {item_id: items[index].pixels for item_id, index in zip(ids, shown_first + scored)}
        for item_id in sorted(pixels_of):  # name order: nothing on disk follows the sources' order
            write_blinded_png(pixels_of[item_id], display_size, tmp / IMAGES / f"{item_id}.png")
        sizes = {path.stat().st_size for path in (tmp / IMAGES).iterdir()}
        if len(sizes) != 1:  # would let a reader tell files apart by size: never ship that
            raise RuntimeError(f"kit images differ in byte size ({sorted(sizes)}); the PNG writer changed")
        manifest["kit_id"] = key["kit_id"] = kit_fingerprint(tmp, ids)
        (tmp / MANIFEST_SCRIPT).write_text(manifest_script(manifest))
        for path in [tmp, *tmp.rglob("*")]:
            os.utime(path, (KIT_MTIME, KIT_MTIME))
        if archive_path is not None:
            write_kit_archive(tmp, Path(archive_path), Path(out_dir).name)
        write_json(key_path, key)  # inside the block: a failed key write leaves the previous kit in place
    return {"study_id": study_id, "kit_id": key["kit_id"], "items": len(scored_ids), "calibration": len(calibration_ids),
            "display_size": display_size, "image_bytes": sizes.pop(), "kit": str(out_dir), "key": str(key_path)}


def write_kit_archive(kit_dir: Path, archive_path: Path, folder: str) -> None:
    """The kit as a zip (under ``folder/``) that hides nothing but reveals nothing either: every entry
    stored uncompressed, with one date and the same permissions, in name order."""
    with atomic_path(archive_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(Path(kit_dir).rglob("*")):
            if path.is_file():
                entry = zipfile.ZipInfo(f"{folder}/{path.relative_to(kit_dir).as_posix()}", date_time=_ZIP_DATE)
                entry.external_attr = 0o644 << 16
                archive.writestr(entry, path.read_bytes(), compress_type=zipfile.ZIP_STORED)


def kit_fingerprint(kit_dir: Path, ids: list[str]) -> str:
    """16 hex digits of the sha256 of every item id and its image bytes, in the page's order."""
    digest = hashlib.sha256()
    for item_id in ids:
        digest.update(item_id.encode() + b"\0" + (Path(kit_dir) / IMAGES / f"{item_id}.png").read_bytes())
    return digest.hexdigest()[:16]


def manifest_script(manifest: dict) -> str:
    """The manifest as a script that sets a global: pages opened from file:// cannot fetch a JSON file."""
    return f'"use strict";\nwindow.{MANIFEST_GLOBAL} = {json.dumps(manifest, indent=1, sort_keys=True)};\n'


def read_kit_manifest(kit_dir: Path) -> dict:
    """The manifest of a kit folder (the inverse of ``manifest_script``)."""
    text = (Path(kit_dir) / MANIFEST_SCRIPT).read_text()
    start, end = text.index("{"), text.rindex("}")
    return json.loads(text[start:end + 1])


def write_blinded_png(pixels: np.ndarray, display_size: int, path: Path) -> None:
    """``pixels`` scaled to fit ``display_size`` square (padded black if not square), saved as an
    uncompressed grayscale PNG with no metadata: the same size in pixels and bytes for every image."""
    image = Image.fromarray(pixels, mode="L")
    scale = display_size / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    image = image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)
    canvas = Image.new("L", (display_size, display_size), 0)
    canvas.paste(image, ((display_size - size[0]) // 2, (display_size - size[1]) // 2))
    canvas.save(path, format="PNG", compress_level=0, optimize=False)  # no pnginfo: no tEXt, iTXt, tIME


def _check_inputs(items: list[StudyItem], out_dir: Path, key_path: Path, study_id: str, findings: list[str],
                  calibration: int, display_size: int) -> None:
    kit, key = out_dir.resolve(), key_path.resolve()
    if key == kit or kit in key.parents:
        raise ReaderStudyError(f"the answer key {key_path} lies inside the kit folder {out_dir}, which readers "
                               f"receive; write the key outside it (e.g. beside it)")
    if not STUDY_ID.fullmatch(study_id):
        raise ReaderStudyError(f"study_id {study_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
                               f"(it names the readers' files), starting with a letter or digit")
    if not MIN_DISPLAY <= display_size <= MAX_DISPLAY:
        raise ReaderStudyError(f"display_size must be {MIN_DISPLAY} to {MAX_DISPLAY} pixels, got {display_size}")
    if len(set(findings)) != len(findings) or not all(isinstance(name, str) and name.strip() for name in findings) \
            or "none" in findings or NO_FINDING in findings:
        raise ReaderStudyError(f"findings {findings} must be distinct non-empty names, without 'none' or "
                               f"'{NO_FINDING}' (the page asks those as 'none')")
    if not 0 <= calibration < len(items):
        raise ReaderStudyError(f"calibration must be 0 to {len(items) - 1} (fewer than the {len(items)} items, "
                               f"so that some are scored), got {calibration}")
    known = {*findings, NO_FINDING}
    for item in items:
        unknown = sorted(set(item.labels) - known)
        if unknown:
            raise ReaderStudyError(f"image {item.origin_id!r} ({item.source}) has labels {unknown} that are not "
                                   f"among the study's findings {findings}")


def _calibration_picks(items: list[StudyItem], order: list[int], calibration: int) -> list[int]:
    """The first ``calibration`` of the shuffled items, taken alternately real and generated."""
    real = [index for index in order if items[index].source == REAL]
    generated = [index for index in order if items[index].source != REAL]
    alternating = [index for pair in zip(real, generated) for index in pair]
    rest = real[len(generated):] + generated[len(real):]
    return (alternating + rest)[:calibration]


def _opaque_ids(count: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        candidate = f"item-{int(rng.integers(0, 16**7)):07x}"
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _shown_truth(item: StudyItem, findings: list[str]) -> dict:
    return {"call": "real" if item.source == REAL else "synthetic", "findings": answer_findings(item.labels, findings)}


def _truth(item: StudyItem) -> dict:
    return {"source": item.source, "origin_id": item.origin_id, "labels": list(item.labels)}

"""A stand-in NIH ChestX-ray14 download, in NIH's own layout, for an offline rehearsal of nih-512.

``<root>/Data_Entry_2017_v2020.csv``        the real metadata, all 112,120 rows (torchxrayvision's copy)
``<root>/images_NNN/images/<id>.png``       phantom renders (8-bit grayscale) for ``count`` real ids
``<root>/STANDIN.txt``                      what this folder is: a phantom, not NIH data
``<root>/STANDIN.json``                     the manifest a rerun compares against (arguments, file hashes)

Only the images are made up: every id, archive folder and metadata byte is NIH's, so the pipeline's
NIH reader (`index_nih_root`) sees a download with most images missing, which is what a rehearsal of
the real profile at small counts needs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import time
from collections import Counter
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from cxr_diffusion.data.filter import read_include_list
from cxr_diffusion.data.nih import NIH_HEADER, read_metadata_csv, split_labels
from cxr_diffusion.data.phantom import render as phantom_render
from cxr_diffusion.data.phantom.assets import load_phantom_assets, nih_metadata_csv
from cxr_diffusion.data.phantom.render import PhantomStudy, render_study
from cxr_diffusion.io import JsonFileError, atomic_directory, read_json, sha256_file

METADATA_NAME = "Data_Entry_2017_v2020.csv"
NOTE_NAME = "STANDIN.txt"
MANIFEST_NAME = "STANDIN.json"
MANIFEST_FORMAT = 1
# How NIH split the 112,120 sorted image ids into its 12 archives (images_001.tar.gz ... images_012.tar.gz):
# images_001 ends at 00001335_006.png, images_012 starts at 00028173_003.png.
ARCHIVE_SIZES: tuple[int, ...] = (4_999,) + (10_000,) * 10 + (7_121,)
# A patient-level split with val and test fractions of 0.1 gives each split a patient from 3 patients up.
MIN_COUNT = 3


def archive_folders(image_ids: list[str]) -> dict[str, str]:
    """Every NIH image id -> the folder NIH ships it in (``images_001/images`` ...)."""
    if len(image_ids) != sum(ARCHIVE_SIZES):
        raise ValueError(f"NIH ChestX-ray14 has {sum(ARCHIVE_SIZES)} images in its 12 archives; "
                         f"the metadata holds {len(image_ids)} ids")
    ordered = sorted(image_ids)
    bounds = np.cumsum((0,) + ARCHIVE_SIZES)
    return {name: f"images_{archive + 1:03d}/images"
            for archive in range(len(ARCHIVE_SIZES))
            for name in ordered[bounds[archive]:bounds[archive + 1]]}


def select_images(include_list: pd.DataFrame, metadata: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """``count`` metadata rows of images the include list names: one image per patient, spread evenly.

    The strata are (class, View Position) pairs of the include list; they are visited in turn, each
    giving its next seeded-random candidate whose patient is not chosen yet. Returned sorted by id.
    """
    classes = [c for c in include_list.columns if c != "Image Index"]
    rows = metadata.merge(include_list, on="Image Index").sort_values("Image Index").reset_index(drop=True)
    patients = rows["Patient ID"].nunique()
    if not MIN_COUNT <= count <= patients:
        raise ValueError(f"count={count}: need {MIN_COUNT} (one patient per split) to {patients} (the patients "
                         f"of the include list's images that the metadata names)")
    rng = np.random.default_rng([seed, 11])
    strata = []
    for name in classes or [None]:
        for view in sorted(rows["View Position"].unique()):
            member = rows["View Position"] == view
            if name is not None:
                member &= rows[name] == 1
            candidates = np.flatnonzero(member.to_numpy())
            if len(candidates):
                strata.append(list(rng.permutation(candidates)))
    patient_of = rows["Patient ID"].to_numpy()
    chosen: list[int] = []
    used_patients: set[int] = set()
    turn = 0
    while len(chosen) < count:
        strata = [s for s in strata if s]
        if not strata:
            raise ValueError(f"count={count}: the include list's strata hold only {len(chosen)} patients")
        stratum = strata[turn % len(strata)]
        turn += 1
        while stratum and patient_of[stratum[-1]] in used_patients:
            stratum.pop()
        if stratum:
            chosen.append(int(stratum.pop()))
            used_patients.add(patient_of[chosen[-1]])
    return metadata[metadata["Image Index"].isin(set(rows.loc[chosen, "Image Index"]))] \
        .sort_values("Image Index").reset_index(drop=True)


def build_nih_folder(root: Path, include_list: Path, count: int = 32, seed: int = 0, image_size: int = 1024,
                     progress: bool = True, classes: tuple[str, ...] | None = None) -> dict:
    """Write (or keep, when its manifest matches) a stand-in NIH ChestX-ray14 folder at ``root``.

    The include list is read as the filter stage reads it (``read_include_list``), under ``classes`` (the
    params' ``filter.classes``; by default, its own columns).

    A folder at ``root`` that this function did not make is never replaced: an error says so.
    Returns root, the ids written, per-archive counts, whether it was skipped, and the seconds taken.
    """
    start = time.perf_counter()
    root, include_list = Path(root), Path(include_list)
    if not include_list.is_file():
        raise FileNotFoundError(f"include list {include_list} not found (the reference list is "
                                "reference/nih-512/filtered_nihcxr14.csv)")
    arguments = {"count": count, "seed": seed, "image_size": image_size,
                 "include_list_sha256": sha256_file(include_list), "renderer_sha256": _renderer_sha256()}
    previous = _read_manifest(root)
    if previous is not None and previous["arguments"] == arguments and _files_match(root, previous["files"]):
        return _summary(root, previous["ids"], skipped=True, start=start)
    if previous is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and has no {MANIFEST_NAME}, so it was not made by build_nih_folder; "
                              "it is left alone. Pick an empty or new folder for the stand-in.")

    with atomic_directory(root) as tmp:
        _copy_metadata(tmp / METADATA_NAME)
        metadata = read_metadata_csv(tmp / METADATA_NAME)
        folders = archive_folders(metadata["Image Index"].tolist())
        chosen = select_images(_read_include_list(include_list, classes), metadata, count, seed)
        assets = load_phantom_assets()
        for row in tqdm(chosen.to_dict("records"), desc="render NIH stand-in", unit="img", disable=not progress):
            path = tmp / folders[row["Image Index"]] / row["Image Index"]
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = render_study(_study(row), assets, image_size, seed)
            # zlib level 1, as the phantom dataset stage: the same pixels, saved 3.4x faster than level 6.
            Image.fromarray(pixels, mode="L").save(path, format="PNG", compress_level=1)
        ids = chosen["Image Index"].tolist()
        (tmp / NOTE_NAME).write_text(_note(include_list, count, seed, image_size, ids))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": MANIFEST_FORMAT, "made_by": "cxr-diffusion", "arguments": arguments,
                    "include_list": str(include_list), "ids": ids, "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return _summary(root, ids, skipped=False, start=start)


def _study(row: dict) -> PhantomStudy:
    """The phantom study of one NIH metadata row: its findings, view, age and sex."""
    findings = tuple(label for label in split_labels(row["Finding Labels"]) if label != "No Finding")
    return PhantomStudy(image_index=row["Image Index"], patient_id=int(row["Patient ID"]),
                        follow_up=int(row["Follow-up #"]), findings=findings, view=row["View Position"],
                        age=int(row["Patient Age"]), gender=row["Patient Gender"])


def _copy_metadata(target: Path) -> None:
    """torchxrayvision's Data_Entry_2017_v2020.csv, decompressed byte for byte; its header must be NIH's."""
    source = nih_metadata_csv()
    with gzip.open(source, "rb") as handle:
        header = handle.readline().decode().rstrip("\r\n")
    if header != ",".join(NIH_HEADER):
        raise ValueError(f"{source}: header {header!r} is not NIH's {','.join(NIH_HEADER)!r}; "
                         "reinstall torchxrayvision with `pip install --no-deps torchxrayvision`")
    with gzip.open(source, "rb") as handle, open(target, "wb") as out:
        shutil.copyfileobj(handle, out, 1 << 20)


def _renderer_sha256() -> str:
    """A hash of the phantom renderer's sources: a changed renderer makes the old images stale."""
    digest = hashlib.sha256()
    for path in sorted(Path(phantom_render.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _read_manifest(root: Path) -> dict | None:
    try:
        manifest = read_json(root / MANIFEST_NAME, "unused: an unreadable record is no record", kind=object)
    except (OSError, JsonFileError):  # no record, or one we did not write: the folder is not ours
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not {"arguments", "files", "ids"} <= manifest.keys():
        return None
    files, ids = manifest["files"], manifest["ids"]
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
            and isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        return None  # not the record build_nih_folder writes
    return manifest


def _files_match(root: Path, files: dict[str, str]) -> bool:
    """True when the folder holds exactly the recorded files (manifest aside), each with its recorded hash."""
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    return on_disk == set(files) and all(sha256_file(root / name) == digest for name, digest in files.items())


def _read_include_list(path: Path, classes: tuple[str, ...] | None) -> pd.DataFrame:
    if classes is None:
        classes = tuple(column for column in pd.read_csv(path, nrows=0).columns if column != "Image Index")
    return read_include_list(path, tuple(classes))


def _note(include_list: Path, count: int, seed: int, image_size: int, ids: list[str]) -> str:
    try:
        version = package_metadata.version("cxr-diffusion")
    except package_metadata.PackageNotFoundError:
        version = "unknown"
    return (
        "PHANTOM STAND-IN: NOT NIH ChestX-ray14 DATA\n\n"
        f"Made by cxr-diffusion {version} for an offline rehearsal of the nih-512 profile, with\n"
        f"  cxr_diffusion.rehearsal.nih_folder.build_nih_folder(root, {str(include_list)!r}, count={count}, "
        f"seed={seed}, image_size={image_size})\n\n"
        f"{METADATA_NAME} is the real NIH metadata (all 112,120 rows, the copy shipped in the\n"
        "torchxrayvision package). The images are procedural phantoms rendered by cxr-diffusion from\n"
        f"those rows (findings, view, age, sex), {image_size}x{image_size} 8-bit grayscale, for {len(ids)} ids "
        "picked\n(seeded, one per patient) from the include list and named by their real NIH ids, in NIH's\n"
        "images_NNN/images/ folders. Every other image is missing. No pixel comes from a patient.\n\n"
        f"{MANIFEST_NAME} records the arguments and file hashes; a rerun with the same arguments keeps the folder.\n"
    )


def _summary(root: Path, ids: list[str], skipped: bool, start: float) -> dict:
    archives = Counter(folder.split("/")[0] for folder in _folders_of(root, ids))
    return {"root": str(root), "ids": list(ids), "archives": dict(sorted(archives.items())),
            "skipped": skipped, "seconds": round(time.perf_counter() - start, 3)}


def _folders_of(root: Path, ids: list[str]) -> list[str]:
    found = {p.name: str(p.parent.relative_to(root)) for p in root.glob("images_*/images/*.png")}
    return [found[name] for name in ids]

"""The sha256 of every file of a saved model, written when it is saved and checked before it is loaded.

A flipped block inside a safetensors file still loads (the header is intact) and quietly generates
garbage; a hash is the only check that sees it. ``CXRDiffusionPipeline.save_pretrained`` writes
``model_files.sha256.json`` into the model folder; ``load_pipeline`` refuses a folder whose files
differ from it, or that has none (saved before models were hashed, or copied without it).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import JsonFileError, read_json, sha256_file, write_json
from cxr_diffusion.safe_text import visible_text

MODEL_FILES = "model_files.sha256.json"
# The largest model folder read: an SD-1.5-sized pipeline in fp32 is ~4.3 GB, an SDXL-sized UNet ~10 GB. A folder
# beyond this (a sparse file of terabytes, a config of billions of parameters with weights to match) is refused
# before a byte of it is hashed or loaded.
MAX_MODEL_BYTES = 40 << 30

_FIX = "re-fetch the whole folder (`dvc checkout` / `dvc pull`) or retrain it (`dvc repro`, stage train@<branch>)"


class ModelFilesError(UserError, ValueError):
    """A saved model's files are not the ones written when it was saved; the message names the file."""


def write_model_files(folder: str | Path) -> Path:
    """Record the size and sha256 of every file under ``folder`` (relative POSIX paths) in MODEL_FILES."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MODEL_FILES):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return write_json(folder / MODEL_FILES, {"algorithm": "sha256", "files": files})


def verify_model_files(folder: str | Path) -> None:
    """Raise ModelFilesError unless every file recorded in MODEL_FILES is present with its recorded hash, and
    no component folder holds a file the record does not list: diffusers and transformers choose among the files
    they find (a sharded index beside the recorded weights is read instead of them). Files beside the
    components (a README) are not read by the loader and may be added.
    """
    folder = Path(folder)
    manifest = folder / MODEL_FILES
    if not manifest.is_file():
        raise ModelFilesError(
            f"{folder}: no {MODEL_FILES} (the hashes of its files, written when a model is saved), so its "
            f"weights cannot be checked; it was saved by an older version or copied without it: {_FIX}")
    files = _recorded_files(manifest)
    unrecorded = sorted(path.relative_to(folder).as_posix() for path in folder.glob("*/**/*")
                        if not path.is_dir() and path.relative_to(folder).as_posix() not in files)
    if unrecorded:
        raise ModelFilesError(f"{folder / unrecorded[0]}: not a file of the saved model ({MODEL_FILES} does not "
                              f"list it), and the loader could read it instead of the recorded ones; remove it: "
                              f"{_FIX}")
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            what = "not a regular file (a folder, FIFO or dangling link)" if path.exists() or path.is_symlink() \
                else "missing from the saved model"
            raise ModelFilesError(f"{path}: {what} ({MODEL_FILES} lists it): {_FIX}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ModelFilesError(f"{path}: {size} bytes, but {record['bytes']} were saved (truncated or "
                                  f"replaced): {_FIX}")
    total = sum(record["bytes"] for record in files.values())
    if total > MAX_MODEL_BYTES:
        raise ModelFilesError(f"{folder}: its files hold {total / 2**30:.1f} GiB, more than the "
                              f"{MAX_MODEL_BYTES >> 30} GiB of any model this project saves; check that it is "
                              f"the model you meant: {_FIX}")
    for name, record in files.items():
        path = folder / name
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise ModelFilesError(f"{path}: changed since the model was saved (sha256 {digest[:12]}, saved "
                                  f"{record['sha256'][:12]}); the weights are corrupted or were edited: {_FIX}")


def _recorded_files(manifest: Path) -> dict[str, dict]:
    """The ``files`` table of MODEL_FILES, checked: plain relative paths inside the folder, sizes, hex digests."""
    try:
        payload = read_json(manifest, _FIX, kind=object)
    except JsonFileError as error:  # bad bytes, syntax, nesting or a huge integer
        raise ModelFilesError(str(error)) from None
    valid = isinstance(payload, dict) and payload.get("algorithm") == "sha256"
    files = payload.get("files") if valid else None
    if not isinstance(files, dict) or not files:
        raise ModelFilesError(f"{manifest}: expected {{\"algorithm\": \"sha256\", \"files\": {{path: "
                              f"{{\"bytes\", \"sha256\"}}}}}} listing the model's files: {_FIX}")
    for name, record in files.items():
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or not parts or ".." in parts or "\\" in name:
            raise ModelFilesError(f"{manifest}: lists {visible_text(repr(name), 80)}, which is not a path inside the model folder: {_FIX}")
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64):
            raise ModelFilesError(f"{manifest}: the entry for {visible_text(repr(name), 80)} needs an integer 'bytes' and a 64-digit "
                                  f"'sha256': {_FIX}")
    return files

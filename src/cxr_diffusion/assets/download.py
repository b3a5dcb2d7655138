"""The two ways an asset is downloaded: a Hugging Face hub snapshot, or one published file with a pinned sha256.

Both are plain functions so that fetch can be tested with fakes in their place; neither is ever called at
stage time.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from cxr_diffusion.errors import UserError
from cxr_diffusion.io import sha256_file


class AssetError(UserError):
    """An asset could not be fetched, checked or placed (the message says which and what to do)."""


def hub_snapshot(repo_id: str, *, repo_type: str = "model", revision: str | None = None,
                 local_dir: Path | None = None, allow_patterns: tuple[str, ...] | None = None,
                 local_files_only: bool = False) -> Path:
    """``huggingface_hub.snapshot_download``: its own progress bars, resume of interrupted files and login
    (HF_TOKEN or `hf auth login`, for gated repositories). ``local_dir`` None: the Hugging Face cache."""
    from huggingface_hub import errors, snapshot_download

    try:
        path = snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                 local_dir=None if local_dir is None else str(local_dir),
                                 allow_patterns=None if allow_patterns is None else list(allow_patterns),
                                 local_files_only=local_files_only)
    except getattr(errors, "XetDownloadError", ()) as error:  # the one hub error that is not an OSError
        raise AssetError(f"{repo_id}: {error}") from error
    return Path(path)


def _open(url: str, offset: int) -> tuple[BinaryIO, int | None, bool]:
    """(body, its length or None, whether it starts at ``offset``): a Range request when ``offset`` > 0."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing after offset: the partial file is whole (the hash decides)
            return io.BytesIO(b""), 0, True
        raise
    length = response.headers.get("Content-Length")
    return response, (int(length) if length else None), (offset > 0 and response.status == 206)


def _stream(url: str, part: Path, chunk_size: int) -> None:
    """Append ``url`` to ``part`` from its current size (or rewrite it if the server ignores the Range)."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    body, length, resumed = _open(url, offset)
    if not resumed:
        offset = 0
    total = None if length is None else offset + length
    with body, open(part, "ab" if resumed else "wb") as out, \
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name.removesuffix(".part")) as bar:
        while chunk := body.read(chunk_size):
            out.write(chunk)
            bar.update(len(chunk))


def url_download(url: str, target: str | Path, sha256: str, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``target`` (with a progress bar) unless it is already there with ``sha256``.

    Bytes go to ``target.part``; an interrupted download resumes from it with an HTTP Range request. The
    file is moved into place only after its whole sha256 matched: a resumed file that does not match is
    deleted and downloaded once more from the start, and a fresh one that does not match is an error.
    """
    target = Path(target)
    if target.is_file():
        actual = sha256_file(target)
        if actual == sha256:
            return target
        raise AssetError(f"{target} has sha256 {actual}, not the pinned {sha256} of {url}: it is another file; "
                         "move it away and rerun `cxr-diffusion fetch`")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    while True:
        resumed = part.is_file() and part.stat().st_size > 0
        _stream(url, part, chunk_size)
        actual = sha256_file(part)
        if actual == sha256:
            os.replace(part, target)
            return target
        part.unlink()
        if not resumed:
            raise AssetError(f"{url}: the download has sha256 {actual}, not the pinned {sha256}; it was deleted "
                             f"and not placed at {target}. Check the URL (or a proxy rewriting it) and rerun")

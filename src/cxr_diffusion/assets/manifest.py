"""The fetch record (e.g. external/assets.json): what each asset was fetched from and the sha256 of every
file it placed, so that `doctor` can tell an asset that changed in place since it was fetched."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from cxr_diffusion.assets.download import AssetError
from cxr_diffusion.io import sha256_file, write_json

VERSION = 1


def visible_files(folder: Path) -> list[Path]:
    """Files under ``folder``, skipping hidden parts (the hub's .cache/ bookkeeping, .part and .tmp files)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def snapshot(path: Path) -> dict:
    """What is at ``path`` now: each file's sha256 and size, keyed by its path relative to ``path``
    ("." for a single file)."""
    files = [path] if path.is_file() else visible_files(path)
    return {"kind": "file" if path.is_file() else "directory",
            "files": {("." if f == path else f.relative_to(path).as_posix()): {"sha256": sha256_file(f),
                                                                             "size": f.stat().st_size}
                      for f in files}}


def differences(recorded: dict, path: Path, limit: int = 5) -> list[str]:
    """How ``path`` differs from its record (empty when it matches): changed, added and removed files."""
    if not path.exists():
        return ["it is gone"]
    if (recorded["kind"] == "file") != path.is_file():
        return [f"it was a {recorded['kind']} and is not any more"]
    files = [path] if path.is_file() else visible_files(path)
    now = {("." if f == path else f.relative_to(path).as_posix()): f for f in files}
    before = recorded["files"]
    found = [f"added {name}" for name in sorted(now.keys() - before.keys())]
    found += [f"removed {name}" for name in sorted(before.keys() - now.keys())]
    for name in sorted(now.keys() & before.keys()):
        if len(found) >= limit:
            break
        file = now[name]  # the size first: most edits change it, and it costs no hashing
        if file.stat().st_size != before[name]["size"] or sha256_file(file) != before[name]["sha256"]:
            found.append(f"changed {path.name if name == '.' else name}")
    return found[:limit]


def read_manifest(path: Path) -> dict[str, dict]:
    """The recorded assets by name; empty when nothing was fetched yet."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        data = None
    assets = data.get("assets") if isinstance(data, dict) and data.get("version") == VERSION else None
    if not isinstance(assets, dict):
        raise AssetError(f"{path} is not a fetch manifest (version {VERSION}); move it away and rerun "
                         "`cxr-diffusion fetch` (it re-checks what is in place)")
    return assets


def record(path: Path, name: str, target: str, source: dict, contents: dict) -> dict:
    """Add or replace the entry of asset ``name`` in the manifest at ``path`` (atomically); returns it."""
    assets = read_manifest(path)
    recorded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entry = {"target": target, "source": source, "recorded_at": recorded_at, **contents}
    assets[name] = entry
    write_json(path, {"version": VERSION, "assets": assets})
    return entry

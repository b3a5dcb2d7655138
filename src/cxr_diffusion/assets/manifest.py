"""The fetch record (e.g. external/assets.json): what each asset was fetched from and the sha256 of every
file it placed, so that `doctor` can tell an asset that changed in place since it was fetched."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from cxr_diffusion.assets.download import AssetError
from cxr_diffusion.io import JsonFileError, lies_inside, read_json, sha256_file, write_json
from cxr_diffusion.safe_text import visible_text

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
    """How ``path`` differs from its record (empty when it matches): changed, added and removed files.

    The names come from a download's folder and from the record, so each is shown through ``visible_text``:
    a file named with a terminal escape or a newline is listed escaped, on the one line `doctor` prints.
    """
    if not path.exists():
        return ["it is gone"]
    if (recorded["kind"] == "file") != path.is_file():
        return [f"it was a {recorded['kind']} and is not any more"]
    files = [path] if path.is_file() else visible_files(path)
    now = {("." if f == path else f.relative_to(path).as_posix()): f for f in files}
    before = recorded["files"]
    found = [f"added {_shown(name)}" for name in sorted(now.keys() - before.keys())]
    found += [f"removed {_shown(name)}" for name in sorted(before.keys() - now.keys())]
    for name in sorted(now.keys() & before.keys()):
        if len(found) >= limit:
            break
        file = now[name]
        if path.is_dir() and not lies_inside(file, path):  # never hashed: a link out is not the fetched file
            found.append(f"{_shown(name)} links outside the folder (copy the file itself in)")
            continue
        # the size first: most edits change it, and it costs no hashing
        if file.stat().st_size != before[name]["size"] or sha256_file(file) != before[name]["sha256"]:
            found.append(f"changed {_shown(path.name if name == '.' else name)}")
    return found[:limit]


def _shown(name: str) -> str:
    """A file name as listed by ``differences``: hidden characters escaped, cut if absurdly long."""
    return visible_text(name, limit=200)


_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "move it away and rerun `cxr-diffusion fetch` (it re-checks what is in place)"


def read_manifest(path: Path) -> dict[str, dict]:
    """The recorded assets by name, each entry checked (see ``_check_entry``); empty when nothing was fetched yet."""
    if not path.is_file():
        return {}
    try:
        data = read_json(path, f"it is not a fetch manifest (version {VERSION}): {_FIX}")
    except JsonFileError as error:
        raise AssetError(str(error)) from None  # fetch and doctor report an AssetError in one line
    assets = data.get("assets") if data.get("version") == VERSION else None
    if not isinstance(assets, dict):
        raise AssetError(f"{path} is not a fetch manifest (version {VERSION}); {_FIX}")
    for name, entry in assets.items():
        _check_entry(path, name, entry)
    return assets


def _printable(key: str) -> str:
    return key if key.isprintable() and len(key) <= 80 else repr(key)[:80]


def _check_entry(path: Path, name: str, entry: object) -> None:
    """What `doctor` and `fetch` read of an entry: target, source, kind, and each file's sha256 and size."""
    name = _printable(name)
    def refuse(key: str, value: object, expected: str) -> None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise AssetError(f"{path}: assets.{key} is {shown}, expected {expected}; {_FIX}")

    if not isinstance(entry, dict):
        refuse(name, entry, "an object with target, source, kind and files")
    for key in ("target", "source", "kind", "files"):
        if key not in entry:
            raise AssetError(f"{path}: assets.{name} has no '{key}' key; {_FIX}")
    if not isinstance(entry["target"], str):
        refuse(f"{name}.target", entry["target"], "the asset's path as text")
    if not isinstance(entry["source"], dict):
        refuse(f"{name}.source", entry["source"], "an object saying where it was fetched from")
    if entry["kind"] not in ("file", "directory"):
        refuse(f"{name}.kind", entry["kind"], "'file' or 'directory'")
    if not isinstance(entry["files"], dict):
        refuse(f"{name}.files", entry["files"], "an object of file name -> {sha256, size}")
    for file, recorded in entry["files"].items():
        key = f"{name}.files.{_printable(file)}"
        if not isinstance(recorded, dict):
            refuse(key, recorded, "an object with sha256 and size")
        if not isinstance(recorded.get("sha256"), str) or not _SHA256.fullmatch(recorded["sha256"]):
            refuse(f"{key}.sha256", recorded.get("sha256"), "64 lowercase hex digits")
        size = recorded.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            refuse(f"{key}.size", size, "a whole number of bytes, 0 or more")


def record(path: Path, name: str, target: str, source: dict, contents: dict) -> dict:
    """Add or replace the entry of asset ``name`` in the manifest at ``path`` (atomically); returns it."""
    assets = read_manifest(path)
    recorded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entry = {"target": target, "source": source, "recorded_at": recorded_at, **contents}
    assets[name] = entry
    write_json(path, {"version": VERSION, "assets": assets})
    return entry

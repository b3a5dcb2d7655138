"""The state of one asset, compared with what fetch recorded: the one check that `fetch` and `doctor` share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cxr_diffusion.assets import download
from cxr_diffusion.assets.catalog import Asset, HandSource, HubSource
from cxr_diffusion.assets.content import check_hub_folder
from cxr_diffusion.assets.manifest import differences
from cxr_diffusion.assets.standin_marker import describe, read_standin

State = Literal["present", "missing", "stand-in", "partial", "unrecorded", "stale", "mismatch"]


@dataclass(frozen=True)
class Check:
    state: State
    detail: str  # what was found, for people


def source_record(asset: Asset) -> dict:
    """What the manifest stores as an asset's source: a change of it (a new revision pin) means refetch."""
    if isinstance(asset.source, HandSource):
        return {"by_hand": asset.name}
    record = asdict(asset.source)
    if isinstance(asset.source, HubSource):
        record.pop("in_cache")
        record["allow_patterns"] = None if asset.source.allow_patterns is None else list(asset.source.allow_patterns)
    return record


def _interrupted_hub_files(folder: Path) -> list[Path]:
    """Files that huggingface_hub is still downloading into ``folder`` (left by an interrupted snapshot)."""
    bookkeeping = folder / ".cache" / "huggingface"
    return sorted(bookkeeping.rglob("*.incomplete")) if bookkeeping.is_dir() else []


def check_asset(asset: Asset, manifest: dict[str, dict], root: Path) -> Check:
    """Whether ``asset`` is in place and, when fetch recorded it, unchanged since (every file's sha256).

    A stand-in (`cxr-diffusion standins`: random weights) is never "present", whatever the record says.
    """
    source = asset.source
    if isinstance(source, HubSource) and source.in_cache:
        try:
            path = download.hub_snapshot(source.repo_id, repo_type=source.repo_type, revision=source.revision,
                                         allow_patterns=source.allow_patterns, local_files_only=True)
        except (OSError, ValueError, download.AssetError):
            return Check("missing", "not in the Hugging Face cache")
        try:  # offline, the hub returns the snapshot folder without looking inside: an interrupted download too
            check_hub_folder(asset, Path(path))
        except download.AssetError as error:
            return Check("partial", f"in the Hugging Face cache ({path}), but {error}")
        return Check("present", f"in the Hugging Face cache ({path})")
    path = asset.path(root)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return Check("missing", f"{asset.target} does not exist" if not path.exists() else f"{asset.target} is empty")
    label = read_standin(path)
    if label is not None:
        return Check("stand-in", f"{asset.target} was {describe(label)}")
    if isinstance(source, HubSource) and _interrupted_hub_files(path):
        return Check("partial", f"{asset.target} holds an interrupted download")
    entry = manifest.get(asset.name)
    if entry is None or entry.get("target") != asset.target:
        return Check("unrecorded", f"{asset.target} is there but fetch has no record of it")
    if entry.get("source") != source_record(asset):
        return Check("stale", f"{asset.target} was fetched from {entry.get('source')}; the params now name "
                              f"{source_record(asset)}")
    changes = differences(entry, path)
    if changes:
        return Check("mismatch", f"{asset.target} changed since fetch recorded it: {'; '.join(changes)}")
    count = len(entry["files"])
    return Check("present", f"{asset.target} matches the fetch record ({count} file{'s' if count > 1 else ''})")

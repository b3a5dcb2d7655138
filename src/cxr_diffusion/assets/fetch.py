"""`cxr-diffusion fetch`: bring every asset the params need to the path they name, and record its hashes.

Each asset is independent: one that cannot be fetched (offline, gated, wrong hash) is listed at the end with
how to place it by hand, and the others go on. What is in place and matches the record is not touched. A
stand-in (`cxr-diffusion standins`) is not in place: it is replaced by the real asset, and stays where it is
until the real one is complete (a hub folder is downloaded beside it and swapped in).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cxr_diffusion.assets import download
from cxr_diffusion.assets.content import check_hub_folder
from cxr_diffusion.assets.catalog import (
    NOTHING_NEEDED, Asset, HandSource, HubSource, UrlSource, how_to_place, needed_assets, overlapping_paths,
    rerun_command,
)
from cxr_diffusion.assets.download import AssetError
from cxr_diffusion.assets.manifest import read_manifest, record, snapshot
from cxr_diffusion.assets.status import Check, check_asset, source_record
from cxr_diffusion.config import Params
from cxr_diffusion.assets.standin_marker import stale_sidecar
from cxr_diffusion.safe_text import visible_text

# What a failed download or check raises: huggingface_hub's and urllib's errors are OSErrors, the weight
# checks raise ValueError (wrong keys or shapes), ours raise AssetError.
FETCH_ERRORS = (OSError, ValueError, AssetError)


@dataclass
class FetchReport:
    placed: list[tuple[Asset, str]] = field(default_factory=list)   # in place now, and what was done
    missing: list[tuple[Asset, str]] = field(default_factory=list)  # could not be placed, and why


def _record(asset: Asset, manifest_path: Path, root: Path, what: str) -> str:
    path = asset.path(root)
    stale = stale_sidecar(path)  # the label of a stand-in that a real file has replaced
    if stale is not None:
        stale.unlink()
    contents = snapshot(path)
    if not contents["files"]:
        raise AssetError(f"{asset.target} holds no files after the download (does {asset.param} name what the "
                         f"source publishes? {asset.source.describe()})")
    record(manifest_path, asset.name, asset.target, source_record(asset), contents)
    return what


def _check_loads(asset: Asset, path: Path) -> None:
    """Load a weights file into its network (keys, shapes, class count) on the CPU, so that a wrong file is
    never recorded."""
    import torch
    from safetensors import SafetensorError

    try:
        if isinstance(asset.source, UrlSource):
            from cxr_diffusion.evaluation.inception import InceptionSpec, load_inception

            load_inception(path, InceptionSpec(asset.source.flavour, "pool"), torch.device("cpu"))
        elif isinstance(asset.source, HandSource):
            from cxr_diffusion.evaluation.xrv_densenet import load_xrv_densenet

            load_xrv_densenet(path, torch.device("cpu"))
    except SafetensorError as error:
        raise AssetError(f"{path}: not a readable safetensors file ({error})") from None


def _converted_from(path: Path) -> str | None:
    """The source sha256 that `convert-weights` wrote into a safetensors file's metadata, if any."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return (handle.metadata() or {}).get("source_sha256")
    except (SafetensorError, OSError):
        return None


def _place_weights(asset: Asset, source: UrlSource, check: Check, manifest_path: Path, root: Path) -> str:
    from cxr_diffusion.evaluation.inception_conversion import convert_inception_weights

    target = asset.path(root)
    if check.state == "unrecorded":
        if _converted_from(target) == source.sha256:
            _check_loads(asset, target)
            return _record(asset, manifest_path, root, f"recorded {asset.target} (converted from the pinned "
                                                       f"{source.filename} before)")
        raise AssetError(f"{asset.target} is there but was not converted from the pinned {source.filename}: "
                         "move it away and rerun `cxr-diffusion fetch`, or keep it with "
                         "`cxr-diffusion fetch --record-present`")
    published = target.parent / source.filename
    download.url_download(source.url, published, source.sha256)
    convert_inception_weights(published, target, source.flavour)
    return _record(asset, manifest_path, root, f"{source.filename} (sha256 verified) converted to {asset.target}")


def _place(asset: Asset, check: Check, manifest_path: Path, root: Path, echo: Callable[[str], None]) -> str:
    source = asset.source
    if isinstance(source, HubSource):
        echo(f"{asset.name}: fetching {source.describe()} into "
             f"{'the Hugging Face cache' if source.in_cache else asset.target}")
        target = None if source.in_cache else asset.path(root)
        # A stand-in stays usable until the real files are complete: they go to a folder beside it (resumable).
        local_dir = target.with_name(f".{target.name}.fetching") if check.state == "stand-in" else target
        path = download.hub_snapshot(source.repo_id, repo_type=source.repo_type, revision=source.revision,
                                     local_dir=local_dir, allow_patterns=source.allow_patterns)
        if source.in_cache:  # what doctor checks: a revision whose files the patterns miss is not the asset
            check_hub_folder(asset, Path(path))
            return f"in the Hugging Face cache ({path})"
        if local_dir != target:
            _swap_in(local_dir, target)
            return _record(asset, manifest_path, root, f"fetched into {asset.target}, replacing the stand-in")
        return _record(asset, manifest_path, root, f"fetched into {asset.target}")
    if isinstance(source, UrlSource):
        return _place_weights(asset, source, check, manifest_path, root)
    if check.state == "missing":
        raise AssetError(f"{asset.target} is not there; it can only be placed by hand")
    if check.state == "stand-in":
        raise AssetError(f"{asset.target} is a stand-in (random weights); the real one can only be placed by hand")
    if check.state == "mismatch":
        raise AssetError(f"{check.detail}; place it again by hand, or keep it with "
                         "`cxr-diffusion fetch --record-present`")
    _check_loads(asset, asset.path(root))
    return _record(asset, manifest_path, root, f"checked the tensors of {asset.target} and recorded it")


def _swap_in(folder: Path, target: Path) -> None:
    """Replace the stand-in folder ``target`` by the completed download ``folder``."""
    old = target.with_name(f".{target.name}.standin-old")
    shutil.rmtree(old, ignore_errors=True)
    target.replace(old)
    folder.replace(target)
    shutil.rmtree(old, ignore_errors=True)


def _record_present(asset: Asset, check: Check, manifest_path: Path, root: Path) -> str:
    if check.state == "stand-in":
        raise AssetError(f"{check.detail}; --record-present records only real assets (run `cxr-diffusion fetch` "
                         "for the real one)")
    if check.state in ("missing", "partial") or asset.target is None:
        raise AssetError(f"{check.detail}; --record-present records only what is in place")
    if isinstance(asset.source, HubSource):
        check_hub_folder(asset, asset.path(root))
    _check_loads(asset, asset.path(root))
    return _record(asset, manifest_path, root, f"recorded {asset.target} as it is now (it was {check.state})")


def fetch_assets(params: Params, root: str | Path = ".", *, record_present: bool = False,
                 echo: Callable[[str], None] = print) -> FetchReport:
    """Fetch (or with ``record_present``, only record) every asset ``params`` need; see the module docstring."""
    root = Path(root)
    manifest_path = root / params.fetch.manifest
    assets, report = needed_assets(params, root), FetchReport()
    if not assets:
        echo(NOTHING_NEEDED)
        return report
    overlap = overlapping_paths(params, assets, root)
    if overlap is not None:  # before anything is downloaded or replaced
        raise AssetError(overlap)
    manifest = read_manifest(manifest_path)
    for asset in assets:
        check = check_asset(asset, manifest, root)
        if check.state == "present":
            report.placed.append((asset, f"already in place: {check.detail}"))
            echo(f"{asset.name}: already in place: {check.detail}")
            continue
        try:
            if record_present:
                what = _record_present(asset, check, manifest_path, root)
            else:
                what = _place(asset, check, manifest_path, root, echo)
        except FETCH_ERRORS as error:
            # Hub errors span several lines, and a refusal can quote a downloaded file's name: one escaped line.
            reason = visible_text(error, 300) or type(error).__name__
            report.missing.append((asset, reason))
            echo(f"{asset.name}: could not place it: {reason}")
            continue
        manifest = read_manifest(manifest_path)
        if check.state in ("mismatch", "stale", "stand-in"):
            why = {"mismatch": "it had changed in place", "stale": "it had another source",
                   "stand-in": "it was a stand-in (random weights)"}[check.state]
            what += f"; {why}, so rerun what read it: {rerun_command(asset)}"
        report.placed.append((asset, what))
        echo(f"{asset.name}: {what}")
    if report.missing:
        echo(f"\nCould not place {len(report.missing)} of {len(assets)} assets. Rerun `cxr-diffusion fetch` where "
             "there is internet, or place each by hand:")
        for asset, reason in report.missing:
            echo(f"- {asset.name} ({reason})")
            echo(textwrap.indent(how_to_place(asset), "    "))
    else:
        echo(f"\nAll {len(assets)} assets are in place (record: {manifest_path}); "
             "check them with `cxr-diffusion doctor`.")
    return report

"""`cxr-diffusion doctor`: is every asset the params need in place and unchanged since fetch? And the fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cxr_diffusion.assets.catalog import (
    NOTHING_NEEDED, Asset, HandSource, HubSource, how_to_place, needed_assets, overlapping_paths, rerun_command,
)
from cxr_diffusion.assets.download import AssetError
from cxr_diffusion.assets.manifest import read_manifest
from cxr_diffusion.assets.status import Check, check_asset
from cxr_diffusion.config import Params
from cxr_diffusion.assets.standin_marker import MARKER_NAME, REPLACE_HINT
from cxr_diffusion.safe_text import visible_text

LABELS = {"stand-in": "stand-in (random weights)"}  # how a state is printed, where its name alone says too little


def diagnose(params: Params, root: str | Path = ".") -> list[tuple[Asset, Check]]:
    """Each needed asset with its state (reads files and the fetch record; downloads nothing)."""
    root = Path(root)
    assets = needed_assets(params, root)
    overlap = overlapping_paths(params, assets, root)
    if overlap is not None:
        raise AssetError(overlap)
    manifest = read_manifest(root / params.fetch.manifest)
    return [(asset, check_asset(asset, manifest, root)) for asset in assets]


def fix(asset: Asset, check: Check) -> str:
    """What to do about an asset that is not present and verified."""
    if check.state == "stand-in":
        if isinstance(asset.source, HandSource):
            return ("place the real one by hand over it (fetch cannot download it), then run `cxr-diffusion fetch` "
                    "to check and record it; stages that read the stand-in must then rerun:\n" + how_to_place(asset))
        by_hand = (f"a copy placed by hand must replace the whole folder, whose {MARKER_NAME} marks it a stand-in"
                   if isinstance(asset.source, HubSource) else "a real file placed by hand over it is recognised")
        return (f"{REPLACE_HINT}: it replaces the stand-in ({by_hand}); then rerun what read the stand-in: "
                f"{rerun_command(asset)}")
    if check.state in ("missing", "partial"):
        if isinstance(asset.source, HandSource):
            return "place it by hand (fetch cannot: see `from`):\n" + how_to_place(asset)
        return ("run `cxr-diffusion fetch` (it resumes interrupted downloads), or place it by hand:\n"
                + how_to_place(asset))
    if check.state == "unrecorded":
        return ("run `cxr-diffusion fetch`: it checks what is there and records its hashes (a hub folder is completed "
                "against the hub; a complete copy placed by hand is recorded offline with `cxr-diffusion fetch "
                "--record-present`)")
    rerun = rerun_command(asset)
    if check.state == "stale":
        return f"run `cxr-diffusion fetch` to fetch what the params name now, then rerun what reads it: {rerun}"
    return (f"the stages that read it may have run on either version. Restore the fetched copy with `cxr-diffusion "
            f"fetch`, or keep the change with `cxr-diffusion fetch --record-present`; then rerun them: {rerun}")


def run_doctor(params: Params, root: str | Path = ".", echo: Callable[[str], None] = print) -> int:
    """Print every needed asset's state and fix; 0 when all are present and verified, else 2.

    A state's detail quotes the asset folder and the fetch record (file names, a stand-in's label, the
    recorded source), so its line is shown through ``visible_text``, as `inspect` shows a folder's strings:
    one line per asset whatever those files hold, with no terminal sequence let through.
    """
    results = diagnose(params, root)
    if not results:
        echo(NOTHING_NEEDED)
        return 0
    for asset, check in results:
        state = LABELS.get(check.state, check.state)
        echo(visible_text(f"{asset.name} ({asset.param}): {state}: {check.detail}", limit=4000))
        echo(f"    read by: {', '.join(asset.stages)}")
        if check.state != "present":
            first, *rest = fix(asset, check).splitlines()
            echo(f"    fix: {first}")
            for line in rest:
                echo(f"         {line}")
    bad = [asset.name for asset, check in results if check.state != "present"]
    standins = [asset.name for asset, check in results if check.state == "stand-in"]
    if bad:
        echo(f"\n{len(bad)} of {len(results)} assets need attention: {', '.join(bad)}.")
        if standins:
            echo(f"{len(standins)} of them are stand-ins with random weights ({', '.join(standins)}): fine for a "
                 "rehearsal, meaningless for results.")
        return 2
    echo(f"\nAll {len(results)} assets are present and match the fetch record.")
    return 0

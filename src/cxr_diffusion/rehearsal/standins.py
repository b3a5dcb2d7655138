"""`cxr-diffusion standins`: random-weight stand-ins of every external asset the active params name, offline.

For a rehearsal of nih-512: the same architectures and file formats as the real assets, at the paths the
params name, so every stage, loader and conversion runs as it will on the real ones; only the numbers are
made up. What it makes (each only if the params need it, see ``assets.catalog.needed_assets``):

- ``dataset.nih_root``: a phantom NIH ChestX-ray14 folder (``rehearsal.nih_folder``), when dataset.source is nih
- ``clip.model``: CLIP ViT-L/14 with a prompt tokenizer and CLIP's image processor (``standin_models``)
- ``train.vae``: the SD VAE ft-MSE (``standin_models``)
- ``elixr.path``: an ELIXR-B snapshot for the NIH folder's images plus a few others (``standin_elixr``)
- ``evaluate.raddino``: RadDINO, a DINOv2 ViT-B/14 with its image processor (``standin_models``)
- ``evaluate.*_weights``: FID-Inception, torchvision Inception-v3, torchxrayvision DenseNet-121
  (``standin_weights``; the Inceptions go through the project's own conversion)

Every stand-in is labelled (``standin_marker``): ``STANDIN.json`` in a folder, ``<file>.standin.json`` next to
a file (and the label in its safetensors metadata); `doctor` reports it as a stand-in and `fetch` replaces it.
A folder is built in a temporary folder and swapped in whole, a file is moved into place, and the label is
written last: a stand-in with a complete label and the same settings is kept, anything else it made is
rebuilt, and a path that holds a real asset (no label) is never touched.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cxr_diffusion.errors import UserError
from cxr_diffusion.assets.catalog import (
    Asset, HandSource, HubSource, UrlSource, how_to_place, needed_assets, overlapping_paths,
)
from cxr_diffusion.config import Params, changed
from cxr_diffusion.io import sha256_file, write_json
from cxr_diffusion.assets.standin_marker import (
    MARKER_NAME, REPLACE_HINT, WARNING, label_safetensors, read_standin, sidecar_path,
)

FORMAT = 1  # of what the builders write; a change rebuilds every stand-in made before it
EXTRA_ELIXR_IDS = 8  # ELIXR rows for images the rehearsal does not hold, as the real snapshot has
WHAT = {
    "clip": "CLIP ViT-L/14 (as openai/clip-vit-large-patch14): config, random weights, a CLIP-format tokenizer "
            "learned from the params' prompts, CLIP's image processor",
    "vae": "SD VAE (as stabilityai/sd-vae-ft-mse): AutoencoderKL config, random weights",
    "elixr": "ELIXR-B img_emb snapshot (as Yasintuncer/nih-cxr14-elixr): datasets.json and 12 HDF5 shards of "
             "deterministic random [32, 768] embeddings, NOT ELIXR",
    "raddino": "RadDINO (as microsoft/rad-dino): Dinov2Model config, random weights, its image processor",
    "inception_fid": "FID-Inception (pt_inception-2015-12-05), random weights, converted by convert-weights",
    "inception_torchvision": "torchvision Inception-v3 (inception_v3_google), random weights, converted by "
                             "convert-weights",
    "xrv_densenet": "torchxrayvision DenseNet-121 (densenet121-res224-all) state dict, random weights",
}


class StandinError(UserError):
    """A stand-in could not be made (the message says which, why and what to do)."""


@dataclass(frozen=True)
class Made:
    name: str
    target: str
    action: str      # made | kept (a complete stand-in with the same settings was there)
    size: int        # bytes on disk
    seconds: float
    note: str


@dataclass(frozen=True)
class Overrides:
    """Smaller architectures, for tests only: the command always makes the real ones."""
    clip_config: object | None = None   # a transformers CLIPConfig
    vae_config: dict | None = None      # AutoencoderKL keyword arguments
    raddino_config: dict | None = None  # Dinov2Config keyword arguments


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _holds_files(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _resolve(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _refuse_real(path: Path, what: str, marker: str) -> None:
    if _holds_files(path) and read_standin(path) is None:
        raise StandinError(f"{path} ({what}) holds a real asset (files and no {marker}): `cxr-diffusion standins` "
                           f"never overwrites one; move it away or point {what} at another path")


def _targets(params: Params, root: Path) -> list[Asset]:
    assets = needed_assets(params, root)
    overlap = overlapping_paths(params, assets, root, writes_nih_root=params.dataset.source == "nih")
    if overlap is not None:  # a stand-in replaces its whole folder
        raise StandinError(overlap)
    for asset in assets:
        if asset.target is None:
            folder = "external/" + asset.source.repo_id.split("/")[-1]
            raise StandinError(f"{asset.param} names the hub id itself (the Hugging Face cache); a stand-in needs a "
                               f"local path: set {asset.param} to a folder such as {folder}")
        marker = MARKER_NAME if isinstance(asset.source, HubSource) else sidecar_path(asset.path(root)).name
        _refuse_real(asset.path(root), asset.param, marker)
    return assets


def _label(asset: Asset, settings: dict, command: str, seed: int) -> dict:
    replace = REPLACE_HINT if not isinstance(asset.source, HandSource) else \
        "place the real one by hand (fetch cannot download it):\n" + how_to_place(asset)
    warning = WARNING if asset.name != "elixr" else "random embeddings, NOT the real ELIXR"
    return {"standin": True, "warning": warning, "asset": asset.name, "param": asset.param, "target": asset.target,
            "what": WHAT[asset.name], "real": asset.source.describe(), "seed": seed, "settings": settings,
            "build": uuid.uuid4().hex, "made_by": command,
            "made_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "replace_with": replace}


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _make_folder(target: Path, label: dict, build: Callable[[Path], dict]) -> dict:
    from cxr_diffusion.io import atomic_directory

    with atomic_directory(target) as tmp:
        info = build(tmp)
        for weights in sorted(tmp.rglob("*.safetensors")):  # the label travels with the weights, too
            label_safetensors(weights, label)
        label = {**label, **info, "files": _files(tmp)}
        write_json(tmp / MARKER_NAME, label)  # last: the completion mark
    return label


def _make_file(target: Path, label: dict, build: Callable[[Path, Path, dict], dict]) -> dict:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent) as work:
        built = Path(work) / target.name
        info = build(built, Path(work), label)
        os.replace(built, target)
    label = {**label, **info, "sha256": sha256_file(target), "size": target.stat().st_size}
    write_json(sidecar_path(target), label)  # last: the completion mark
    return label


def _image_ids(nih_root: Path, seed: int) -> tuple[list[str], list[str]]:
    """(the NIH folder's images, read with the pipeline's own NIH reader; a few ids it does not hold)."""
    import numpy as np

    from cxr_diffusion.data.nih import index_nih_root
    from cxr_diffusion.rehearsal.standin_elixr import SHARDS

    index = index_nih_root(nih_root)
    present = sorted(index.image_paths["Image Index"])
    count = max(EXTRA_ELIXR_IDS, SHARDS - len(present))  # every shard holds at least one row
    others = np.random.default_rng([seed, 5]).choice(sorted(index.missing), size=count, replace=False)
    return present, sorted(str(i) for i in others)


def _nih_folder(params: Params, root: Path, images: int, seed: int, progress: bool) -> tuple[Made, Path]:
    if params.filter.include_list is None:
        raise StandinError("filter.include_list is null; the stand-in NIH folder picks its images from the "
                           "include list (reference/nih-512/filtered_nihcxr14.csv)")
    try:
        from cxr_diffusion.rehearsal.nih_folder import build_nih_folder
    except ImportError as error:
        raise StandinError(f"dataset.nih_root: the NIH folder builder is not available ({_one_line(error)})") from None
    nih_root = _resolve(root, params.dataset.nih_root)
    start = time.perf_counter()
    try:
        summary = build_nih_folder(nih_root, root / params.filter.include_list, count=images, seed=seed,
                                   progress=progress, classes=tuple(params.filter.classes))
    except (OSError, ValueError) as error:
        raise StandinError(f"dataset.nih_root: {_one_line(error)}") from None
    made = Made("nih_folder", str(nih_root), "kept" if summary.get("skipped") else "made", _size(nih_root),
                time.perf_counter() - start, f"{len(summary.get('ids', []))} phantom images in NIH's layout")
    return made, nih_root


@dataclass(frozen=True)
class _Recipe:
    settings: dict                   # what the stand-in depends on: the same settings keep a complete one
    build: Callable                  # folder: build(tmp) -> info; file: build(out, workdir, label) -> info
    folder: bool


def _recipe(asset: Asset, params: Params, seed: int, nih_root: Path | None, overrides: Overrides,
            progress: bool, echo: Callable[[str], None]) -> _Recipe:
    from cxr_diffusion.conditioning.prompts import prompt_for
    from cxr_diffusion.rehearsal import standin_elixr, standin_models, standin_weights

    settings: dict = {"format": FORMAT, "seed": seed}
    if asset.name == "clip":
        config = overrides.clip_config or standin_models.clip_config()
        prompts = standin_models.prompt_corpus(params.clip)

        def clip(tmp: Path) -> dict:
            info = standin_models.write_clip(tmp, prompts, seed, config, echo=echo)
            echo("    loading it with conditioning.clip (text and vision towers)")
            check = standin_models.check_clip(tmp, prompt_for("Effusion|Infiltration", params.clip))
            return {**info, "check": check, "prompt_corpus": len(prompts)}

        return _Recipe({**settings, "architecture": standin_models.clip_architecture(config),
                        "corpus_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}, clip, True)
    if asset.name == "vae":
        config = overrides.vae_config or standin_models.SD_VAE
        return _hub_model(settings, standin_models.vae_architecture(config),
                          lambda tmp: standin_models.write_vae(tmp, seed, config),
                          lambda tmp: standin_models.check_vae(tmp, params.image_size),
                          f"diffusion.latents.load_vae, encoding a {params.image_size}-px image", echo)
    if asset.name == "raddino":
        config = overrides.raddino_config or standin_models.RADDINO
        return _hub_model(settings, {"model": "Dinov2Model", **config},
                          lambda tmp: standin_models.write_raddino(tmp, seed, config),
                          lambda tmp: standin_models.check_raddino(tmp, params.image_size),
                          f"evaluation.raddino.load_raddino, embedding a {params.image_size}-px image", echo)
    if asset.name == "elixr":
        try:
            present, others = _image_ids(nih_root, seed)
        except ValueError as error:  # DataError: the NIH folder is not readable
            raise StandinError(f"elixr: {_one_line(error)}") from None
        ids = present + others

        def elixr(tmp: Path) -> dict:
            info = standin_elixr.write_elixr_snapshot(tmp, ids, seed, WHAT["elixr"], progress)
            return {**info, "check": _check_elixr(params, tmp, ids), "rehearsal_images": len(present),
                    "other_images": others}

        return _Recipe({**settings, "ids": len(ids), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()},
                       elixr, True)
    if isinstance(asset.source, UrlSource):
        flavour = asset.source.flavour
        return _Recipe({**settings, "flavour": flavour}, lambda out, workdir, label: standin_weights.write_inception(
            out, flavour, seed, workdir, label), False)
    return _Recipe(settings, lambda out, workdir, label: standin_weights.write_xrv_densenet(out, seed, label), False)


def _hub_model(settings: dict, architecture: dict, write: Callable[[Path], dict], check: Callable[[Path], dict],
               loaded_with: str, echo: Callable[[str], None]) -> _Recipe:
    """A hub model folder: written with random weights, then loaded back by the pipeline's own loader."""
    def build(tmp: Path) -> dict:
        info = write(tmp)
        echo(f"    loading it with {loaded_with}")
        return {**info, "check": check(tmp)}

    return _Recipe({**settings, "architecture": architecture}, build, True)


def make_standins(params: Params, root: str | Path = ".", *, images: int = 32, seed: int = 0,
                  command: str | None = None, progress: bool = True, echo: Callable[[str], None] = print,
                  overrides: Overrides = Overrides()) -> list[Made]:
    """Make (or keep) every stand-in ``params`` need, in pipeline order; see the module docstring.

    Everything that can be refused is checked before anything is made.
    """
    root = Path(root)
    command = command or f"cxr-diffusion standins --images {images} --seed {seed}"
    nih = params.dataset.source == "nih"
    if nih:
        _refuse_real(_resolve(root, params.dataset.nih_root), "dataset.nih_root", MARKER_NAME)
    assets = _targets(params, root)
    if any(asset.name == "elixr" for asset in assets):
        _check_elixr_params(params, nih)
    results: list[Made] = []
    nih_root = None
    if nih:
        echo(f"[nih_folder] {params.dataset.nih_root}: {images} phantom images in NIH's layout")
        made, nih_root = _nih_folder(params, root, images, seed, progress)
        results.append(made)
    for number, asset in enumerate(assets, start=1):
        target = asset.path(root)
        recipe = _recipe(asset, params, seed, nih_root, overrides, progress, echo)
        existing = read_standin(target)
        if existing is not None and existing["complete"] and existing.get("settings") == recipe.settings:
            echo(f"[{number}/{len(assets)}] {asset.name}: {asset.target} is already a complete stand-in with "
                 "these settings; kept")
            results.append(Made(asset.name, asset.target, "kept", _size(target), 0.0, _note(existing)))
            continue
        echo(f"[{number}/{len(assets)}] {asset.name}: making {WHAT[asset.name]} at {asset.target}")
        start = time.perf_counter()
        label = _label(asset, recipe.settings, command, seed)
        try:
            made = (_make_folder if recipe.folder else _make_file)(target, label, recipe.build)
        except (OSError, ValueError, RuntimeError) as error:
            raise StandinError(f"{asset.name} ({asset.param}): {_one_line(error)}") from None
        finally:
            gc.collect()  # the next stand-in may be as big: free this one's model first
        seconds = time.perf_counter() - start
        echo(f"    done in {seconds:.1f} s")
        results.append(Made(asset.name, asset.target, "made", _size(target), seconds, _note(made)))
    return results


def _check_elixr_params(params: Params, nih: bool) -> None:
    from cxr_diffusion.rehearsal.standin_elixr import DATASET, FEATURE, ROW_SHAPE

    if not nih:
        raise StandinError("elixr.path: the ELIXR stand-in holds the rehearsal's NIH images; it needs "
                           "dataset.source: nih (the stand-in NIH folder), not 'phantom'")
    elixr = params.elixr
    if (elixr.dataset, elixr.feature) != (DATASET, FEATURE) or elixr.shape not in (None, ROW_SHAPE):
        raise StandinError(f"elixr: the stand-in imitates {DATASET} / {FEATURE} {list(ROW_SHAPE)}; the params read "
                           f"{elixr.dataset} / {elixr.feature}" + (f" {list(elixr.shape)}" if elixr.shape else ""))


def _check_elixr(params: Params, folder: Path, ids: list[str]) -> dict:
    """Scan the snapshot with the pipeline's reader: every id once, rows of the published shape."""
    from cxr_diffusion.conditioning.elixr_files import scan_elixr_source

    source = scan_elixr_source(changed(params.elixr, path=str(folder)))
    found = [i for file in source.files for i in file.image_ids]
    shapes = {file.shape for file in source.files}
    if sorted(found) != sorted(ids) or len(shapes) != 1:
        raise ValueError(f"{folder}: the reader found {len(found)} ids in shapes {sorted(shapes)}, expected "
                         f"{len(ids)} of one shape")
    return {"layout": source.layout, "files": len(source.files), "row_shape": list(shapes.pop())}


def _note(label: dict) -> str:
    parameters = label.get("parameters")
    check = label.get("check", {})
    shape = ", ".join(f"{key} {value}" for key, value in check.items() if isinstance(value, list))
    return "; ".join(part for part in (f"{parameters / 1e6:.1f}M parameters" if parameters else
                                       (f"{label['images']} images" if "images" in label else ""), shape) if part)


def _human(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def format_table(results: list[Made]) -> str:
    """What was made or kept: target, size on disk, seconds and what its check found."""
    rows = [("asset", "target", "action", "size", "seconds", "checked")]
    rows += [(r.name, r.target, r.action, _human(r.size), f"{r.seconds:.1f}", r.note) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    total = sum(r.size for r in results)
    lines.append(f"{len(results)} stand-ins ({sum(r.action == 'made' for r in results)} made), {_human(total)}, "
                 f"{sum(r.seconds for r in results):.1f} s. Labelled STANDIN.json / *.standin.json: random weights, "
                 "NOT the real models; `cxr-diffusion fetch` replaces them with the real ones.")
    return "\n".join(lines)

"""What a hand-placed hub folder must hold to be recorded as its asset, checked from its content.

`fetch --record-present` records what a person placed. A folder passes only if it is the asset: CLIP's
``config.json`` says ``"model_type": "clip"``, the VAE's says ``"_class_name": "AutoencoderKL"``, RadDINO's
``"model_type": "dinov2"``, and each holds safetensors files that list tensors (a pickled ``.bin`` alone is refused:
this project never unpickles); a CLIP folder must also pass the embed stages' own check of each tower
(``conditioning.clip_folder.check_clip_tower``: a config its weights fill, every shard its index names), a RadDINO
folder the evaluate stage's check of its files (``evaluation.raddino_folder.check_raddino_folder``: settings in
range, weights that fill the network); an ELIXR
snapshot has a readable ``datasets.json`` offering the dataset ``elixr.dataset`` names, and HDF5 shards in its
folder. Anything else, such as ``/etc``, is refused before a file in it is hashed.
"""

from __future__ import annotations

from pathlib import Path

from cxr_diffusion.assets.catalog import Asset
from cxr_diffusion.assets.download import AssetError
from cxr_diffusion.assets.manifest import visible_files
from cxr_diffusion.io import JsonFileError, lies_inside, read_json
from cxr_diffusion.safe_text import visible_text
from cxr_diffusion.safetensors_header import SafetensorsHeader, SafetensorsHeaderError, read_safetensors_header

CONFIG_CLASS = {"clip": ("model_type", "clip"), "vae": ("_class_name", "AutoencoderKL"),
                "raddino": ("model_type", "dinov2")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The largest asset: the ELIXR-B snapshot's img_emb for all 112,120 NIH images (32 x 768 floats each) is ~11 GB;
# CLIP ViT-L/14 is 1.7 GB, the SD VAE 0.3 GB.
MAX_ASSET_BYTES = 64 << 30


def check_hub_folder(asset: Asset, folder: Path) -> None:
    """Raise ``AssetError`` unless ``folder`` holds ``asset`` (see the module docstring)."""
    where = asset.target or str(folder)  # an asset kept in the Hugging Face cache has no target of its own
    if not folder.is_dir():
        raise AssetError(f"{where} is not a folder; {asset.param} must name the downloaded folder")
    files = visible_files(folder)
    for path in files:  # everything recorded is hashed: nothing may be read from elsewhere
        if not lies_inside(path, folder):
            raise AssetError(f"{path}: lies outside {where} (it links to {path.resolve()}); copy the file itself "
                             f"in")
    total = sum(path.stat().st_size for path in files)
    if total > MAX_ASSET_BYTES:  # checked before a byte is hashed: a sparse file of terabytes costs no disk
        raise AssetError(f"{where} holds {total / 2**30:,.1f} GiB, more than the {MAX_ASSET_BYTES >> 30} GiB of "
                         f"any asset this project reads; is it the right folder?")
    if asset.name == "elixr":
        from cxr_diffusion.conditioning.elixr_index import read_snapshot_index
        from cxr_diffusion.data.nih import DataError

        try:
            offered, _ = read_snapshot_index(folder)
        except DataError as error:
            raise AssetError(f"{where} is not an ELIXR snapshot: {error}") from None
        dataset = _selected_dataset(asset)
        if dataset is not None and dataset not in offered:
            raise AssetError(f"{where}: its datasets.json offers {sorted(offered)}, not {dataset} "
                             f"(elixr.dataset); download the snapshot again")
        if dataset is not None:
            _check_shards(asset, folder, dataset)
        return
    key, expected = CONFIG_CLASS[asset.name]
    config_path = folder / "config.json"
    fix = (f"{asset.param} must name a download of {asset.source.describe()}" if asset.target else
           f"download {asset.source.describe()} again (`cxr-diffusion fetch`)")
    try:
        config = read_json(config_path, fix)
    except FileNotFoundError:
        raise AssetError(f"{where} has no config.json, so it is not a {asset.name} folder; {fix}") from None
    except JsonFileError as error:
        raise AssetError(str(error)) from None
    if config.get(key) != expected:
        raise AssetError(f"{config_path}: {key} is {visible_text(repr(config.get(key)), 60)}, not {expected!r}; {fix}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
        why = f"only pickled weights ({', '.join(pickled[:3])}), which this project never loads" if pickled else \
            "no weights"
        raise AssetError(f"{where} holds {why}; download its .safetensors files ({fix})")
    for path in weights:
        header = _header_or_none(path)
        if header is None or not header.tensors:
            raise AssetError(f"{path}: not a safetensors file holding tensors; download it again ({fix})")
        problem = header.problem(path.stat().st_size)
        if problem:
            raise AssetError(f"{path}: {problem}: truncated or damaged; download it again ({fix})")
    if asset.name == "clip":  # the embed stages' own check of each tower: a folder recorded here is one they load
        from transformers import CLIPTextModel, CLIPVisionModelWithProjection

        from cxr_diffusion.conditioning.clip_folder import ClipFolderError, check_clip_tower

        for tower in (CLIPTextModel, CLIPVisionModelWithProjection):
            try:
                check_clip_tower(folder, tower)
            except ClipFolderError as error:
                raise AssetError(f"{where} is not a CLIP the embed stages can load ({tower.__name__}): "
                                 f"{error}; {fix}") from None
    if asset.name == "raddino":  # the evaluate stage's own check: a folder recorded here is one it can load
        from cxr_diffusion.evaluation.raddino_folder import RadDinoFolderError, check_raddino_folder

        try:
            check_raddino_folder(folder)
        except RadDinoFolderError as error:
            raise AssetError(f"{where} is not a RadDINO checkpoint the evaluate stage can load: {error}; "
                             f"{fix}") from None


def _check_shards(asset: Asset, folder: Path, dataset: str) -> None:
    """The dataset's shards lie inside the snapshot (the reader's own rule) and each opens as HDF5."""
    import h5py

    from cxr_diffusion.conditioning.elixr_files import find_snapshot_shards
    from cxr_diffusion.data.nih import DataError

    try:
        shards = find_snapshot_shards(folder, dataset)
    except DataError as error:
        raise AssetError(f"{asset.target}: {error}") from None
    for shard in shards:
        try:
            h5py.File(shard, "r").close()
        except OSError:
            raise AssetError(f"{shard}: not an HDF5 file; download the snapshot again") from None


def _header_or_none(path: Path) -> SafetensorsHeader | None:
    """``path``'s safetensors header, or None for anything that is not one (a folder, a FIFO, other bytes)."""
    try:
        return read_safetensors_header(path) if path.is_file() else None
    except SafetensorsHeaderError:
        return None


def _selected_dataset(asset: Asset) -> str | None:
    """The snapshot dataset the params read, from the download patterns (``<dataset>/*``)."""
    patterns = getattr(asset.source, "allow_patterns", None) or ()
    return next((pattern[:-2] for pattern in patterns if pattern.endswith("/*")), None)

"""What a hand-placed hub folder must hold to be recorded as its asset, checked from its content.

`fetch --record-present` records what a person placed. A folder passes only if it is the asset: CLIP's
``config.json`` says ``"model_type": "clip"``, the VAE's says ``"_class_name": "AutoencoderKL"``, and both
hold safetensors weights (a pickled ``.bin`` alone is refused: this project never unpickles); an ELIXR
snapshot has a readable ``datasets.json`` with at least one dataset. Anything else, such as ``/etc``, is
refused before a file in it is hashed.
"""

from __future__ import annotations

from pathlib import Path

from cxr_diffusion.assets.catalog import Asset
from cxr_diffusion.assets.download import AssetError
from cxr_diffusion.io import JsonFileError, read_json
from cxr_diffusion.safe_text import visible_text

CONFIG_CLASS = {"clip": ("model_type", "clip"), "vae": ("_class_name", "AutoencoderKL")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_hub_folder(asset: Asset, folder: Path) -> None:
    """Raise ``AssetError`` unless ``folder`` holds ``asset`` (see the module docstring)."""
    if not folder.is_dir():
        raise AssetError(f"{asset.target} is not a folder; {asset.param} must name the downloaded folder")
    if asset.name == "elixr":
        from cxr_diffusion.conditioning.elixr_files import read_snapshot_index
        from cxr_diffusion.data.nih import DataError

        try:
            read_snapshot_index(folder)
        except DataError as error:
            raise AssetError(f"{asset.target} is not an ELIXR snapshot: {error}") from None
        return
    key, expected = CONFIG_CLASS[asset.name]
    config_path = folder / "config.json"
    fix = f"{asset.param} must name a download of {asset.source.describe()}"
    try:
        config = read_json(config_path, fix)
    except FileNotFoundError:
        raise AssetError(f"{asset.target} has no config.json, so it is not a {asset.name} folder; {fix}") from None
    except JsonFileError as error:
        raise AssetError(str(error)) from None
    if config.get(key) != expected:
        raise AssetError(f"{config_path}: {key} is {visible_text(repr(config.get(key)), 60)}, not {expected!r}; {fix}")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
        why = f"only pickled weights ({', '.join(pickled[:3])}), which this project never loads" if pickled else \
            "no weights"
        raise AssetError(f"{asset.target} holds {why}; download its .safetensors files ({fix})")

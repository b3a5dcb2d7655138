"""Which external assets the active params need: where each goes, where it comes from, who reads it.

A hub asset goes to the local folder its param names (clip.model, train.vae, elixr.path, evaluate.raddino), filled from the
hub id in the `fetch` section. A param that *is* that hub id keeps the files in the Hugging Face cache,
where the loaders find them by id. The evaluation weights are published files with pinned hashes, converted
once to safetensors; the torchxrayvision DenseNet can only be read by unpickling, so it is placed by hand.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cxr_diffusion.config import Params
from cxr_diffusion.safe_text import shown_value


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None               # None: the latest
    repo_type: Literal["model", "dataset"] = "model"
    allow_patterns: tuple[str, ...] | None = None  # None: every file of the repository
    in_cache: bool = False             # the param is the hub id itself: the files live in the Hugging Face cache

    def describe(self) -> str:
        return f"hub {self.repo_type} {self.repo_id} (revision {self.revision or 'latest'})"


@dataclass(frozen=True)
class UrlSource:
    url: str
    filename: str   # the published file, kept next to the converted target
    sha256: str     # the full digest of the published file
    flavour: Literal["fid", "torchvision"]  # `convert-weights --flavour`

    def describe(self) -> str:
        return f"{self.url} (sha256 {self.sha256})"


@dataclass(frozen=True)
class HandSource:
    published: str  # what is published and why it cannot be fetched for you

    def describe(self) -> str:
        return self.published


@dataclass(frozen=True)
class Asset:
    name: str
    param: str                  # the params key that names where it goes
    target: str | None          # that key's value as written (relative to the repository root); None: HF cache
    source: HubSource | UrlSource | HandSource
    stages: tuple[str, ...]     # the DVC stages that read it (rerun them when it changes)

    def path(self, root: Path) -> Path:
        assert self.target is not None, f"{self.name} lives in the Hugging Face cache, not at a path"
        return Path(root) / Path(self.target).expanduser()  # as the loaders read it


# Full sha256 digests of the two published Inception checkpoints. torch.hub's check_hash only verifies the
# 8 hex digits in each file name; these full digests are recorded identically by several public projects
# that verify these exact files, and each starts with its file name's prefix (tests check that).
FID_INCEPTION = UrlSource(
    # pytorch-fid's FID_WEIGHTS_URL: the release asset it downloads (its `fid_weights` release tag).
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    filename="pt_inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    flavour="fid",
)
TORCHVISION_INCEPTION = UrlSource(
    # torchvision's Inception_V3_Weights.IMAGENET1K_V1.
    url="https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    filename="inception_v3_google-0cc3c7bd.pth",
    sha256="0cc3c7bd75056d25e46cba549dc184522069b81e9787eff6df84f397bd52a5ef",
    flavour="torchvision",
)
XRV_DENSENET = HandSource(
    "torchxrayvision's densenet121-res224-all, published only as a pickled whole model: unpickle it once in a "
    "throwaway environment with torchxrayvision and save its state dict as safetensors (this project never unpickles)"
)
NOTHING_NEEDED = ("The active params need no external asset (clip.model: demo, train.space: pixel, elixr.path, "
                  "evaluate.raddino and the evaluate weights: null): everything is made in the pipeline, offline.")
# What the loaders read (they load safetensors only): the rest of a hub repository is never downloaded.
CLIP_PATTERNS = ("*.json", "*.txt", "*.safetensors")  # config, tokenizer (vocab.json, merges.txt), processor, weights
VAE_PATTERNS = ("*.json", "*.safetensors")
# RadDINO's repository also holds a DINO head, a backbone for the DINOv2 code and its training image list: only the
# transformers checkpoint is read.
RADDINO_PATTERNS = ("config.json", "preprocessor_config.json", "model.safetensors")


def _per_branch(stage: str, params: Params) -> tuple[str, ...]:
    return tuple(f"{stage}@{branch}" for branch in params.branches)


def _hub(value: str, repo_id: str, revision: str | None, root: Path, **kwargs) -> tuple[str | None, HubSource]:
    """(target, source): the HF cache when the param is the hub id itself and no such folder exists."""
    in_cache = value == repo_id and not (Path(root) / value).is_dir()
    return (None if in_cache else value), HubSource(repo_id, revision, in_cache=in_cache, **kwargs)


def needed_assets(params: Params, root: str | Path = ".") -> list[Asset]:
    """The external assets ``params`` need, in pipeline order; empty for the offline default profile."""
    root, fetch, assets = Path(root), params.fetch, []
    if params.clip.model != "demo":
        target, source = _hub(params.clip.model, fetch.clip_repo, fetch.clip_revision, root,
                              allow_patterns=CLIP_PATTERNS)
        assets.append(Asset("clip", "clip.model", target, source,
                            ("embed_clip_text", "embed_clip_vision", *_per_branch("train", params))))
    if params.train.space == "latent":
        target, source = _hub(params.train.vae, fetch.vae_repo, fetch.vae_revision, root, allow_patterns=VAE_PATTERNS)
        assets.append(Asset("vae", "train.vae", target, source,
                            ("encode_latents", *_per_branch("train", params), *_per_branch("sample", params))))
    if params.elixr.path is not None:
        source = HubSource(fetch.elixr_repo, fetch.elixr_revision, "dataset",
                           allow_patterns=("datasets.json", f"{params.elixr.dataset}/*"))
        assets.append(Asset("elixr", "elixr.path", params.elixr.path, source, ("embed_elixr",)))
    evaluate = _per_branch("evaluate", params)
    if params.evaluate.raddino is not None:
        target, source = _hub(params.evaluate.raddino, fetch.raddino_repo, fetch.raddino_revision, root,
                              allow_patterns=RADDINO_PATTERNS)
        assets.append(Asset("raddino", "evaluate.raddino", target, source, evaluate))
    for name, param, value, source in (
            ("inception_fid", "evaluate.inception_weights", params.evaluate.inception_weights, FID_INCEPTION),
            ("inception_torchvision", "evaluate.reference_inception_weights",
             params.evaluate.reference_inception_weights, TORCHVISION_INCEPTION),
            ("xrv_densenet", "evaluate.xrv_weights", params.evaluate.xrv_weights, XRV_DENSENET)):
        if value is not None:
            assets.append(Asset(name, param, value, source, evaluate))
    return assets


def overlapping_paths(params: Params, assets: list[Asset], root: str | Path = ".", *,
                      writes_nih_root: bool = False) -> str | None:
    """Why the paths the params give the assets, the fetch record and the NIH download cannot all be used, or
    None: two that are the same path (``~`` expanded and links followed, as the readers do), or one inside the
    other. Placing or making an asset replaces its whole folder (with whatever else lies in it), and a record
    inside an asset's folder changes the asset it records. The NIH download is only read, but for the stand-in
    NIH folder (``writes_nih_root``): assets and the record may lie inside it, not it inside them."""
    named = [(asset.param, asset.target) for asset in assets if asset.target is not None]
    named.append(("fetch.manifest", params.fetch.manifest))
    if params.dataset.source == "nih" and params.dataset.nih_root:
        named.append(("dataset.nih_root", params.dataset.nih_root))
    places = [(param, value, Path(os.path.realpath(Path(root) / Path(value).expanduser()))) for param, value in named]
    for number, (first, first_value, first_place) in enumerate(places):
        for second, second_value, second_place in places[number + 1:]:
            if first_place == second_place:
                how = "name the same path"
            elif first_place in second_place.parents or second_place in first_place.parents:
                inside_nih = (second == "dataset.nih_root" and second_place in first_place.parents)
                if inside_nih and not writes_nih_root:
                    continue
                how = "nest (one lies inside the other)"
            else:
                continue
            return (f"{first} ({shown_value(first_value)}) and {second} ({shown_value(second_value)}) {how}: "
                    f"placing one would replace or change the other; give each a path of its own, outside the "
                    f"others' folders")
    return None


def rerun_command(asset: Asset) -> str:
    """The DVC command that reruns what read ``asset`` (DVC does not hash files outside the pipeline)."""
    return f"dvc repro -f -s {' '.join(asset.stages)} && dvc repro"


def hand_command(asset: Asset) -> str:
    """The shell command that places ``asset`` by hand (run it on a machine with internet)."""
    source = asset.source
    if isinstance(source, HubSource):
        parts = ["hf", "download", source.repo_id]
        if source.repo_type != "model":
            parts += ["--repo-type", source.repo_type]
        if source.revision:
            parts += ["--revision", source.revision]
        for pattern in source.allow_patterns or ():
            parts += ["--include", pattern]
        if asset.target is not None:
            parts += ["--local-dir", asset.target]
        return shlex.join(parts)
    target = Path(asset.target)
    if isinstance(source, UrlSource):
        published = str(target.parent / source.filename)
        return (f"curl -L --create-dirs -o {shlex.quote(published)} {shlex.quote(source.url)} && "
                f"echo '{source.sha256}  {published}' | sha256sum -c -")
    code = ("import torchxrayvision as xrv; from safetensors.torch import save_file; "
            'm = xrv.models.DenseNet(weights="densenet121-res224-all"); '
            f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {json.dumps(str(target))})")
    return (f"mkdir -p {shlex.quote(str(target.parent))} && python3 -m venv /tmp/xrv-export && "
            "/tmp/xrv-export/bin/pip install torchxrayvision safetensors && "
            f"/tmp/xrv-export/bin/python -c {shlex.quote(code)}")


def how_to_place(asset: Asset) -> str:
    """Where ``asset`` comes from, where it goes and the command that places it, for people without `fetch`."""
    where = "the Hugging Face cache" if asset.target is None else asset.target
    then = {
        HubSource: ("where there is internet; copy the folder here, then `cxr-diffusion fetch --record-present` "
                    "records it" if asset.target is not None else
                    "where this machine's Hugging Face cache (HF_HOME) is reachable; the loaders read it by id"),
        UrlSource: "then `cxr-diffusion fetch` checks it and converts it to safetensors, with no download",
        HandSource: "then `cxr-diffusion fetch` checks its tensors and records it",
    }[type(asset.source)]
    return (f"from: {asset.source.describe()}\n"
            f"to:   {where} ({asset.param})\n"
            f"run:  {hand_command(asset)}\n"
            f"      {then}")

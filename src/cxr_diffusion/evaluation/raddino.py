"""RadDINO distances: the feature space CheXGenBench ranks synthetic chest X-rays by.

``microsoft/rad-dino`` is a DINOv2 ViT-B/14 trained self-supervised on chest X-rays (transformers'
``Dinov2Model``). The numbers follow CheXGenBench's ``metrics/fid.py``, step by step, so a run can be placed
beside its leaderboard (on other data: it uses MIMIC-CXR):

1. each image as RGB, resized to 299x299 by PIL's bilinear filter, as ``ToTensor()`` floats in [0, 1], then
   ``(x * 255).to(torch.uint8)`` (truncated, not rounded: the bytes its extractor sees);
2. the model's own image processor from its ``preprocessor_config.json`` (for rad-dino: bicubic resize of the
   shortest edge to 518, centre crop 518, rescale, normalise);
3. the CLS token after the final layer norm (``pooler_output``, 768-d), computed in fp32;
4. FD between Gaussians fitted to generated and real test features (float64, unbiased covariances: what
   torchmetrics' ``FrechetInceptionDistance`` with this extractor computes); KID with the cubic polynomial
   kernel over 100 subsets of min(n_generated, n_real) images each; precision, recall, density and coverage
   with k = 5 neighbours.

Without ``evaluate.raddino`` each value is null with the reason and how to enable it, never estimated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cxr_diffusion.config import EvaluateConfig
from cxr_diffusion.data.nih import DataError
from cxr_diffusion.evaluation.distances import frechet_distance, kernel_inception_distance
from cxr_diffusion.evaluation.closeness import prdc_metrics
from cxr_diffusion.evaluation.raddino_folder import (
    CONFIG, PROCESSOR, RESIZE, WEIGHTS, RadDinoFolderError, check_raddino_folder,
)
from cxr_diffusion.evaluation.weights import full_fp32

KID_SUBSETS = 100  # torchmetrics' KernelInceptionDistance default, which CheXGenBench keeps
PRDC_K = 5         # CheXGenBench's nearest_k
HOW_TO_ENABLE = ("fetch microsoft/rad-dino where there is internet (`cxr-diffusion fetch` with evaluate.raddino "
                 "set to a folder such as external/rad-dino, or `hf download microsoft/rad-dino`) and set "
                 "params evaluate.raddino (docs/evaluation.md, 'RadDINO distances')")


@dataclass
class RadDino:
    processor: object      # transformers' image processor of the checkpoint
    model: torch.nn.Module  # transformers' Dinov2Model

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


def load_raddino(source: str, device: torch.device, revision: str | None = None) -> RadDino:
    """The checkpoint at ``source`` (a folder, or a hub id in the local Hugging Face cache at ``revision``, the pin
    `cxr-diffusion fetch` downloaded: evaluate never downloads) and its image processor, in fp32 on ``device``. Its files are checked first (``check_raddino_folder``: regular
    files inside the folder, settings within bounds, weights that fill the network exactly), so a bad file is one
    line naming it, before anything is built."""
    from safetensors import SafetensorError
    from transformers import BitImageProcessorPil, Dinov2Model

    folder = raddino_folder(source, revision)
    where = source if Path(source) == folder else f"{source} (in the Hugging Face cache at {folder})"
    fix = (f"point it at a folder holding microsoft/rad-dino's {CONFIG}, {PROCESSOR} and {WEIGHTS} (`cxr-diffusion "
           f"fetch` places it), or set it to null")
    try:
        checked = check_raddino_folder(folder)
    except RadDinoFolderError as error:
        raise DataError(f"evaluate.raddino: {where} could not be loaded as microsoft/rad-dino: {error}; {fix}") from None
    # The PIL-based processor, which CheXGenBench's pinned transformers (4.50.3) gave by default (transformers 5's
    # torch-based one resizes differently), made from the checked settings alone.
    processor = BitImageProcessorPil(**checked.processor)
    try:
        model, report = Dinov2Model.from_pretrained(str(folder), config=checked.config, use_safetensors=True,
                                                    local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, ImportError, SafetensorError) as error:  # a file changed since the check, unreadable
        # bytes, or a config key asking for a package this environment lacks
        raise DataError(f"evaluate.raddino: {where} could not be loaded as microsoft/rad-dino "
                        f"({' '.join(str(error).split())[:300]}); {fix}") from None
    left = [name for key in ("missing_keys", "unexpected_keys", "mismatched_keys") for name in report.get(key) or ()]
    if left:  # the header check should have refused these: never compute distances in a partly random network
        raise DataError(f"evaluate.raddino: {where} could not be loaded as microsoft/rad-dino: {WEIGHTS} does not "
                        f"fill the network (e.g. {', '.join(map(str, left[:3]))}); {fix}")
    return RadDino(processor, model.to(device=device, dtype=torch.float32).eval())


def raddino_folder(source: str, revision: str | None = None) -> Path:
    """``source`` as a folder: itself, or for a hub id its snapshot at ``revision`` (None: the cache's ``main``) in the
    local Hugging Face cache (never the network: a missing checkpoint is said at once, not after minutes of
    retries)."""
    from cxr_diffusion.assets.download import AssetError, hub_snapshot

    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"evaluate.raddino: {source} is a file, not a folder; point it at the folder holding "
                        f"microsoft/rad-dino's {CONFIG}, {PROCESSOR} and {WEIGHTS}, or set it to null")
    try:
        return hub_snapshot(source, allow_patterns=(CONFIG, PROCESSOR, WEIGHTS), revision=revision,
                            local_files_only=True)
    except (OSError, ValueError, AssetError):  # not in the cache, or not even a valid hub id
        pinned = f" at revision {revision}" if revision else ""
        raise DataError(f"evaluate.raddino: {source} is not a folder and not in the Hugging Face cache{pinned} (evaluate "
                        f"never downloads); run `cxr-diffusion fetch` where there is internet, or set "
                        f"evaluate.raddino to null") from None


def chexgenbench_bytes(pixel_values: torch.Tensor) -> torch.Tensor:
    """PreparedImages pixels ((n, c, s, s) in [-1, 1]) as the uint8 (n, 3, 299, 299) batch CheXGenBench's
    extractors receive: PIL RGB, bilinear resize to 299x299, ToTensor, then ``(x * 255).to(torch.uint8)``."""
    batch = []
    for image in pixel_values:
        gray = ((image[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        rgb = Image.fromarray(gray).convert("RGB").resize((RESIZE, RESIZE), Image.BILINEAR)
        as_float = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).to(torch.float32).div(255)  # ToTensor's value
        batch.append((as_float * 255).to(torch.uint8))
    return torch.stack(batch)


@torch.no_grad()
def raddino_features(raddino: RadDino, images: Dataset, batch_size: int, description: str) -> np.ndarray:
    """The (n, 768) CLS features of every image of ``images`` (a PreparedImages split), in order."""
    device, parts = raddino.model.device, []
    with full_fp32():
        for batch in tqdm(_batches(images, batch_size), total=-(-len(images) // batch_size),  # type: ignore[arg-type]
                          desc=description, leave=False):
            inputs = raddino.processor(images=chexgenbench_bytes(batch), return_tensors="pt")
            output = raddino.model(pixel_values=inputs["pixel_values"].to(device, torch.float32))
            parts.append(output.pooler_output.float().cpu().numpy())
    return np.concatenate(parts).astype(np.float64)


def _batches(images: Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
        yield batch["pixel_values"]


def raddino_distances(generated: np.ndarray, real: np.ndarray, seed: int) -> dict:
    """FD, KID (mean and std over subsets) and PRDC of generated vs real RadDINO features, as CheXGenBench
    computes them (see the module docstring); k is capped by the set sizes on tiny runs."""
    subset = min(len(generated), len(real))
    kid, kid_std = kernel_inception_distance(generated, real, subset_size=subset, subsets=KID_SUBSETS, seed=seed)
    prdc = prdc_metrics(real, generated, PRDC_K)  # k capped by the set sizes on tiny runs
    k = prdc.pop("k")
    return {"fd": frechet_distance(generated, real), "kid": kid, "kid_std": kid_std, **prdc, "prdc_k": k,
            "kid_subset": subset}


def raddino_metrics(config: EvaluateConfig, generated: Dataset, real_test: Dataset, seed: int,
                    device: torch.device, revision: str | None = None) -> dict:
    """RadDINO FD, KID and PRDC of the generations against the real test split, with their settings; every
    value null with the reason when ``evaluate.raddino`` is not set. ``revision``: the hub pin of a hub-id
    ``evaluate.raddino`` (``fetch.raddino_revision``)."""
    if config.raddino is None:
        reason = f"no RadDINO configured (offline default); to enable it, {HOW_TO_ENABLE}"
        return {key: None for key in ("fd", "kid", "precision", "recall", "density", "coverage")} | {
            "details": {"reason": reason}}
    raddino = load_raddino(config.raddino, device, revision)
    generated_features = raddino_features(raddino, generated, config.inception_batch_size, "RadDINO (generated)")
    real_features = raddino_features(raddino, real_test, config.inception_batch_size, "RadDINO (real test)")
    if not (np.isfinite(generated_features).all() and np.isfinite(real_features).all()):
        raise DataError(f"evaluate.raddino: {config.raddino} gives features that are not finite (NaN or inf), so its "
                        f"{WEIGHTS} is damaged; download microsoft/rad-dino again (`cxr-diffusion fetch`)")
    distances = raddino_distances(generated_features, real_features, seed)
    details = {
        "features": f"RadDINO CLS token after the final layer norm (pooler_output), {raddino.width}-d",
        "preprocessing": f"RGB, bilinear resize to {RESIZE}x{RESIZE}, uint8, then the checkpoint's image processor "
                         f"(CheXGenBench's recipe)",
        "real": "test split", "n_real": len(real_features), "n_generated": len(generated_features),
        "kid_subsets": KID_SUBSETS, "kid_subset": distances.pop("kid_subset"), "prdc_k": distances.pop("prdc_k"),
        "kid_std": distances.pop("kid_std"), "precision": "fp32, no TF32", "model": _described(config.raddino),
    }
    return {**distances, "details": details}


def _described(source: str) -> str:
    """The checkpoint as the report should name it: a folder's path (and a stand-in's label), or a hub id."""
    from cxr_diffusion.assets.standin_marker import read_standin

    path = Path(source)
    if path.is_dir() and read_standin(path) is not None:
        return f"{source} (a random-weight stand-in, NOT RadDINO)"
    return source

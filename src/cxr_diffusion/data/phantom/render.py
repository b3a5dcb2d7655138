"""Render one phantom study: normal anatomy + finding signs -> an 8-bit chest radiograph.

The scene is drawn at a moderate internal resolution (128 or 256 px) and resized to the output
size, where fine quantum-like grain is added so that large outputs are not just blurry upsamples.
Randomness is split by purpose: the patient seed fixes the anatomy across follow-ups, the study
seed (from the image index) fixes positioning and exposure, and each finding has its own seed,
so adding a finding never reshuffles the rest of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr_diffusion.data.phantom.anatomy import (
    build_chest,
    positioning_grid,
    sample_patient_anatomy,
    view_setup,
)
from cxr_diffusion.data.phantom.assets import PhantomAssets
from cxr_diffusion.data.phantom.findings import (
    anatomy_changes,
    check_findings,
    draw_findings,
    plan_finding,
    stable_seed,
)

# Density at which the film is fully white: a little above the mediastinum plus spine.
WHITE_DENSITY = 1.5


@dataclass(frozen=True)
class PhantomStudy:
    image_index: str  # e.g. "00000001_000.png"
    patient_id: int
    follow_up: int
    findings: tuple[str, ...]  # NIH finding names; () means "No Finding"
    view: str  # "PA" or "AP"
    age: int
    gender: str  # "M" or "F"


@dataclass(frozen=True)
class Exposure:
    """Per-study acquisition: how the patient stood and how the film was exposed."""

    rotation_deg: float
    shift: tuple[float, float]
    scale: float
    film_speed: float  # steepness of the density -> brightness curve
    window: tuple[float, float]
    gamma: float
    blur_px: float  # at the internal resolution
    grain: float  # noise standard deviation in [0, 1] brightness units at 1024 px


def sample_exposure(rng: np.random.Generator, view: str) -> Exposure:
    portable = view == "AP"
    # Portable films are less carefully positioned, less collimated and noisier.
    rotation = rng.normal(0.0, 2.5 if portable else 1.5)
    shift = (float(rng.normal(0, 0.015)), float(rng.normal(0.0, 0.02) + (0.02 if portable else 0.0)))
    return Exposure(
        rotation_deg=float(np.clip(rotation, -6, 6)),
        shift=shift,
        scale=float(rng.uniform(1.0, 1.08) if portable else rng.uniform(0.95, 1.04)),
        film_speed=float(rng.uniform(1.0, 1.3) if portable else rng.uniform(1.2, 1.6)),
        window=(float(rng.uniform(0.0, 0.06)), float(rng.uniform(0.92, 1.0))),
        gamma=float(rng.uniform(0.9, 1.25)),
        blur_px=float(rng.uniform(0.2, 0.6)),
        grain=float(rng.uniform(0.03, 0.05) if portable else rng.uniform(0.015, 0.035)),
    )


def _internal_resolution(size: int) -> int:
    return 128 if size <= 128 else 256


def _render_density(study: PhantomStudy, assets: PhantomAssets, resolution: int, seed: int,
                    exposure: Exposure, study_seed: int) -> np.ndarray:
    patient_rng = np.random.default_rng(stable_seed("patient", seed, study.patient_id))
    anatomy = sample_patient_anatomy(patient_rng, len(assets.lung_masks), study.gender)
    plans = [plan_finding(name, study_seed, assets.box_stats) for name in sorted(set(study.findings))]
    grid = positioning_grid(resolution, exposure.rotation_deg, exposure.shift, exposure.scale)
    chest = build_chest(anatomy, assets.lung_masks[anatomy.mask_index], view_setup(study.view),
                        anatomy_changes(plans), grid)
    signs = draw_findings(plans, chest.geometry)
    lung = chest.geometry.lung
    # The heart and every fluid/tissue finding displace lung air; markings show only where air is.
    filled = np.clip(chest.heart + signs.fill, 0.0, 1.0)
    aerated = 1.0 - filled
    markings = chest.vessels * lung * aerated * (1.0 - signs.suppress)
    return (chest.tissue + chest.bone + markings - chest.air * aerated
            - signs.air + signs.density)


def render_study(study: PhantomStudy, assets: PhantomAssets, size: int, seed: int) -> np.ndarray:
    """uint8 grayscale (size, size) image. Deterministic in (study, size, seed)."""
    check_findings(study.findings)
    view_setup(study.view)  # validates the view before any work
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    study_seed = stable_seed("study", seed, study.image_index)
    study_rng = np.random.default_rng(study_seed)
    exposure = sample_exposure(study_rng, study.view)
    resolution = _internal_resolution(size)
    density = _render_density(study, assets, resolution, seed, exposure, study_seed)

    # Film response: brightness saturates with density, which is why ribs fade over the heart.
    k = exposure.film_speed
    brightness = (1.0 - np.exp(-k * np.maximum(density, 0.0))) / (1.0 - np.exp(-k * WHITE_DENSITY))
    low, high = exposure.window
    brightness = np.clip((brightness - low) / (high - low), 0.0, 1.0) ** exposure.gamma
    brightness = ndimage.gaussian_filter(brightness.astype(np.float32), exposure.blur_px * resolution / 256)

    image = Image.fromarray(brightness, "F").resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(image, dtype=np.float32)
    # Quantum mottle: per-pixel grain, weaker on small outputs where a pixel averages more photons.
    grain_rng = np.random.default_rng(stable_seed("grain", study_seed, size))
    sigma = exposure.grain * np.sqrt(min(size, 1024) / 1024.0)
    noise = grain_rng.standard_normal((size, size), dtype=np.float32)
    out = out + noise * (sigma * (0.35 + 0.65 * out))
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)

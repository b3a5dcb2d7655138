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
from scipy import ndimage, special

from cxr_diffusion.data.phantom.anatomy import (
    ChestLayers,
    build_chest,
    positioning_grid,
    sample_patient_anatomy,
    view_setup,
)
from cxr_diffusion.data.phantom.assets import PhantomAssets
from cxr_diffusion.data.phantom.findings import (
    FindingLayers,
    anatomy_changes,
    check_findings,
    draw_findings,
    plan_finding,
    stable_seed,
)

_NORMAL_QUANTILES = special.ndtri((np.arange(256) + 0.5) / 256).astype(np.float32)

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
    # Portable films are less carefully positioned. Positioning varies less between studies than
    # anatomy between patients, so a patient's follow-ups stay recognisably alike.
    rotation = rng.normal(0.0, 1.5 if portable else 0.8)
    shift = (float(rng.normal(0, 0.008)), float(rng.normal(0.0, 0.01) + (0.015 if portable else 0.0)))
    return Exposure(
        rotation_deg=float(np.clip(rotation, -4, 4)),
        shift=shift,
        scale=float(rng.uniform(1.0, 1.05) if portable else rng.uniform(0.98, 1.02)),
        film_speed=float(rng.uniform(1.0, 1.3) if portable else rng.uniform(1.2, 1.6)),
        window=(float(rng.uniform(0.0, 0.06)), float(rng.uniform(0.92, 1.0))),
        gamma=float(rng.uniform(0.9, 1.25)),
        blur_px=float(rng.uniform(0.2, 0.6)),
        grain=float(rng.uniform(0.03, 0.05) if portable else rng.uniform(0.015, 0.035)),
    )


def _internal_resolution(size: int) -> int:
    return 128 if size <= 128 else 256


@dataclass(frozen=True)
class Scene:
    """Everything drawn for one study before it is exposed onto film (for rendering and tests)."""

    chest: ChestLayers
    signs: FindingLayers
    exposure: Exposure
    study_seed: int

    def density(self) -> np.ndarray:
        lung = self.chest.geometry.lung
        # The heart and every fluid/tissue finding displace lung air; markings show only where air is.
        aerated = 1.0 - np.clip(self.chest.heart + self.signs.fill, 0.0, 1.0)
        markings = self.chest.vessels * lung * aerated * (1.0 - self.signs.suppress)
        return (self.chest.tissue + self.chest.bone + markings - self.chest.air * aerated
                - self.signs.air + self.signs.density)


def build_scene(study: PhantomStudy, assets: PhantomAssets, resolution: int, seed: int) -> Scene:
    """The study's anatomy and finding layers at ``resolution`` (validates the study first)."""
    check_findings(study.findings)
    setup = view_setup(study.view)
    study_seed = stable_seed("study", seed, study.image_index)
    exposure = sample_exposure(np.random.default_rng(study_seed), study.view)
    patient_rng = np.random.default_rng(stable_seed("patient", seed, study.patient_id))
    anatomy = sample_patient_anatomy(patient_rng, len(assets.lung_masks), study.gender)
    plans = [plan_finding(name, study_seed, assets.box_stats) for name in sorted(set(study.findings))]
    grid = positioning_grid(resolution, exposure.rotation_deg, exposure.shift, exposure.scale)
    chest = build_chest(anatomy, assets.lung_masks[anatomy.mask_index], setup, anatomy_changes(plans), grid)
    return Scene(chest=chest, signs=draw_findings(plans, chest.geometry), exposure=exposure, study_seed=study_seed)


def render_study(study: PhantomStudy, assets: PhantomAssets, size: int, seed: int) -> np.ndarray:
    """uint8 grayscale (size, size) image. Deterministic in (study, size, seed)."""
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    resolution = _internal_resolution(size)
    scene = build_scene(study, assets, resolution, seed)
    exposure, density = scene.exposure, scene.density()

    # Film response: brightness saturates with density, which is why ribs fade over the heart.
    k = exposure.film_speed
    brightness = (1.0 - np.exp(-k * np.maximum(density, 0.0))) / (1.0 - np.exp(-k * WHITE_DENSITY))
    low, high = exposure.window
    brightness = np.clip((brightness - low) / (high - low), 0.0, 1.0) ** exposure.gamma
    brightness = ndimage.gaussian_filter(brightness.astype(np.float32), exposure.blur_px * resolution / 256)

    image = Image.fromarray(brightness, "F").resize((size, size), Image.Resampling.BICUBIC)
    out = np.array(image, dtype=np.float32)
    # Quantum mottle: per-pixel grain, stronger where the film is bright (fewer photons got
    # through), weaker on small outputs where a pixel averages more photons. In place: at 1024 px
    # every temporary costs milliseconds.
    grain_rng = np.random.default_rng(stable_seed("grain", scene.study_seed, size))
    sigma = 255.0 * exposure.grain * np.sqrt(min(size, 1024) / 1024.0)
    # Gaussian grain through a 256-entry table of normal quantiles: a third of the cost of
    # drawing normals directly, and 8-bit output cannot show the difference.
    noise = np.take(_NORMAL_QUANTILES, np.frombuffer(grain_rng.bytes(size * size), np.uint8)).reshape(size, size)
    out *= 255.0
    noise *= out * (0.65 * sigma / 255.0) + 0.35 * sigma
    out += noise
    out += 0.5
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)

"""The phantom renderer: real assets load, rendering is deterministic, and each finding shows."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from cxr_diffusion.data.phantom.assets import (
    PhantomAssets,
    finding_box_stats,
    load_phantom_assets,
    nih_metadata_csv,
)
from cxr_diffusion.data.phantom.findings import NIH_FINDINGS
from cxr_diffusion.data.phantom.render import PhantomStudy, build_scene, render_study

SIZE = 64


@pytest.fixture(scope="module")
def assets() -> PhantomAssets:
    return load_phantom_assets()


def study(findings: tuple[str, ...] = (), patient_id: int = 7, follow_up: int = 0, view: str = "PA",
          image_index: str | None = None) -> PhantomStudy:
    index = image_index or f"{patient_id:08d}_{follow_up:03d}.png"
    return PhantomStudy(image_index=index, patient_id=patient_id, follow_up=follow_up, findings=findings,
                        view=view, age=55, gender="M")


def render(assets: PhantomAssets, s: PhantomStudy, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return render_study(s, assets, size, seed).astype(np.float32)


def with_and_without(assets: PhantomAssets, finding: str, patient_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The same study (same positioning and exposure) rendered with and without one finding."""
    index = f"{patient_id:08d}_000.png"
    healthy = render(assets, study((), patient_id, image_index=index))
    sick = render(assets, study((finding,), patient_id, image_index=index))
    return sick, healthy


def region(image: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
    n = image.shape[0]
    return image[int(rows[0] * n):int(rows[1] * n), int(cols[0] * n):int(cols[1] * n)]


# --- assets -------------------------------------------------------------------------------------


def test_real_lung_masks_load_as_boolean_squares(assets: PhantomAssets) -> None:
    masks = assets.lung_masks
    assert masks.dtype == bool and masks.shape[1:] == (256, 256)
    assert masks.shape[0] > 400, f"only {masks.shape[0]} usable lung masks"
    coverage = masks.mean(axis=(1, 2))
    assert coverage.min() >= 0.05 and coverage.max() <= 0.70


def test_box_stats_cover_the_eight_nih_box_findings_in_unit_coordinates() -> None:
    stats = finding_box_stats()
    assert set(stats) == {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                          "Pneumonia", "Pneumothorax"}
    for box in stats.values():
        assert len(box) > 50
        assert box.centers.min() >= 0 and box.centers.max() <= 1
        assert box.sizes.min() > 0 and box.sizes.max() <= 1


def test_nih_metadata_csv_is_the_v2020_table() -> None:
    with gzip.open(nih_metadata_csv(), "rt") as handle:
        header = handle.readline().strip()
        rows = sum(1 for _ in handle)
    assert header.startswith("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age")
    assert rows == 112_120


# --- rendering basics ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 1024])
def test_output_is_a_uint8_square_of_the_requested_size(assets: PhantomAssets, size: int) -> None:
    image = render_study(study(("Effusion",)), assets, size, 0)
    assert image.dtype == np.uint8 and image.shape == (size, size)
    assert image.std() > 20, "a chest X-ray has contrast"


def test_same_inputs_render_identical_images(assets: PhantomAssets) -> None:
    s = study(("Nodule", "Effusion"))
    assert np.array_equal(render_study(s, assets, SIZE, 3), render_study(s, assets, SIZE, 3))


def test_different_seeds_render_different_images(assets: PhantomAssets) -> None:
    s = study()
    assert np.abs(render(assets, s, seed=0) - render(assets, s, seed=1)).mean() > 5


def test_lungs_are_dark_and_mediastinum_and_border_as_on_a_radiograph(assets: PhantomAssets) -> None:
    image = render(assets, study(), size=128)
    lungs = np.concatenate([region(image, (0.3, 0.5), (0.22, 0.36)).ravel(),
                            region(image, (0.3, 0.5), (0.66, 0.78)).ravel()])
    mediastinum = region(image, (0.3, 0.6), (0.47, 0.53))
    corner = region(image, (0.0, 0.05), (0.0, 0.05))
    assert lungs.mean() + 60 < mediastinum.mean(), "air is dark, mediastinum is dense"
    assert corner.mean() < 30, "outside the body is black"


def _layout(image: np.ndarray) -> np.ndarray:
    """A coarse, exposure-normalised 16 x 16 view: where things are, not how bright the film is."""
    coarse = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((16, 16), Image.Resampling.BOX), float)
    return (coarse - coarse.mean()) / coarse.std()


def test_same_patient_keeps_the_same_anatomy_across_follow_ups(assets: PhantomAssets) -> None:
    patients = (11, 12, 13, 14, 15)
    same = [np.abs(_layout(render(assets, study((), p, 0))) - _layout(render(assets, study((), p, 4)))).mean()
            for p in patients]
    other = [np.abs(_layout(render(assets, study((), p, 0))) - _layout(render(assets, study((), p + 100, 0)))).mean()
             for p in patients]
    assert np.mean(same) < 0.6 * np.mean(other), (same, other)


def test_normal_heart_is_under_half_the_chest_width_on_pa(assets: PhantomAssets) -> None:
    ratios = [build_scene(study((), p), assets, 128, 0).chest.geometry.cardiothoracic_ratio for p in range(40, 46)]
    assert max(ratios) < 0.5, ratios


def test_ap_view_magnifies_the_heart(assets: PhantomAssets) -> None:
    for p in range(40, 44):
        pa = build_scene(study((), p, view="PA"), assets, 128, 0).chest.geometry
        ap = build_scene(study((), p, view="AP"), assets, 128, 0).chest.geometry
        assert ap.cardiothoracic_ratio > pa.cardiothoracic_ratio * 1.05


def test_pa_and_ap_films_of_one_patient_differ(assets: PhantomAssets) -> None:
    index = "00000021_000.png"
    pa = render(assets, study((), 21, view="PA", image_index=index))
    ap = render(assets, study((), 21, view="AP", image_index=index))
    assert np.abs(_layout(pa) - _layout(ap)).mean() > 0.1


# --- findings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("finding", NIH_FINDINGS)
def test_every_finding_changes_the_image(assets: PhantomAssets, finding: str) -> None:
    sick, healthy = with_and_without(assets, finding, patient_id=31)
    changed = (np.abs(sick - healthy) > 20).sum()
    assert changed >= 8, f"{finding} changes only {changed} pixels at 64x64"


def test_cardiomegaly_makes_the_heart_over_half_the_chest_width(assets: PhantomAssets) -> None:
    for p in range(40, 46):
        ratio = build_scene(study(("Cardiomegaly",), p), assets, 128, 0).chest.geometry.cardiothoracic_ratio
        assert ratio > 0.5, (p, ratio)


def test_cardiomegaly_whitens_the_lower_lung_beside_the_heart(assets: PhantomAssets) -> None:
    sick, healthy = with_and_without(assets, "Cardiomegaly", patient_id=32)
    beside_heart = ((0.5, 0.72), (0.58, 0.8))
    assert region(sick, *beside_heart).mean() > region(healthy, *beside_heart).mean() + 15


def test_effusion_whitens_a_lung_base(assets: PhantomAssets) -> None:
    sick, healthy = with_and_without(assets, "Effusion", patient_id=33)
    whiter = sick - healthy
    assert (region(whiter, (0.45, 0.85), (0.05, 0.95)) > 20).mean() > 0.03, "a basal opacity"
    assert (region(whiter, (0.05, 0.3), (0.05, 0.95)) > 20).mean() < 0.01, "the apices stay clear"


def test_pneumothorax_darkens_part_of_one_lung(assets: PhantomAssets) -> None:
    sick, healthy = with_and_without(assets, "Pneumothorax", patient_id=34)
    darker = healthy - sick
    assert (darker > 15).mean() > 0.02, "a visible air space"
    assert darker.mean() > 0


def test_emphysema_makes_the_lungs_darker(assets: PhantomAssets) -> None:
    sick, healthy = with_and_without(assets, "Emphysema", patient_id=35)
    lungs = ((0.25, 0.55), (0.15, 0.85))
    assert region(sick, *lungs).mean() < region(healthy, *lungs).mean() - 5


def test_nodule_is_a_small_bright_spot_still_visible_at_64px(assets: PhantomAssets) -> None:
    sick, healthy = with_and_without(assets, "Nodule", patient_id=36)
    brighter = sick - healthy
    spot = brighter > 0.5 * brighter.max()
    assert brighter.max() > 40
    assert 7 <= spot.sum() <= 60, f"nodule covers {spot.sum()} px at 64x64"


def test_mass_is_larger_than_a_nodule(assets: PhantomAssets) -> None:
    nodule, healthy = with_and_without(assets, "Nodule", patient_id=37)
    mass, _ = with_and_without(assets, "Mass", patient_id=37)
    assert ((mass - healthy) > 30).sum() > 2 * ((nodule - healthy) > 30).sum()


def test_multi_label_study_shows_each_of_its_findings(assets: PhantomAssets) -> None:
    index = "00000038_000.png"
    both = render(assets, study(("Effusion", "Mass"), 38, image_index=index))
    effusion = render(assets, study(("Effusion",), 38, image_index=index))
    mass = render(assets, study(("Mass",), 38, image_index=index))
    assert np.abs(both - effusion).mean() > 1.0 and np.abs(both - mass).mean() > 1.0


def test_unknown_finding_raises_a_value_error_naming_it(assets: PhantomAssets) -> None:
    with pytest.raises(ValueError, match="Pneumonitis"):
        render_study(study(("Effusion", "Pneumonitis")), assets, SIZE, 0)


def test_unknown_view_raises_a_value_error_naming_it(assets: PhantomAssets) -> None:
    with pytest.raises(ValueError, match="LL"):
        render_study(study(view="LL"), assets, SIZE, 0)

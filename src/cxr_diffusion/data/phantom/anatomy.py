"""The normal chest of one patient, drawn as X-ray attenuation ("density") layers.

Everything analytic is evaluated on per-pixel *patient coordinates* (X right, Y down, the chest
roughly spanning [0, 1]), which the renderer derives from the pixel grid through the study's
positioning (rotation, shift, magnification). Drawing in patient coordinates means no layer is
ever resampled after the fact, and the body continues naturally past the image edge. Only the
real lung mask is a raster; it is registered onto the patient's lung box with one affine warp.

Units: density 1.0 is roughly the full soft-tissue thickness of the mid chest. Air in the lungs
subtracts from it, bone adds to it; the renderer turns density into film brightness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

MIDLINE = 0.5

# Density constants. The soft tissue core/rim split makes the chest a rounded cylinder rather
# than a flat slab, which is what gives real films their bright centre and darker flanks.
TISSUE_RIM = 0.2
TISSUE_CORE = 0.5
LUNG_AIR = 0.45
HEART_EXTRA = 0.10
SPINE_HALF_WIDTH = 0.034
MAX_HEART_RATIO = 0.66
HEART_TILT = 0.55  # radians from horizontal, apex pointing down to the image right


@dataclass(frozen=True)
class PatientAnatomy:
    """Per-patient constants: drawn once from (patient_id, seed), shared by every follow-up."""

    mask_index: int
    lung_x0: float
    lung_x1: float
    lung_apex: float
    lung_base: float
    chest_wall: float  # soft tissue + rib thickness lateral to the lungs
    heart_ratio: float  # cardiothoracic ratio of the normal heart on a PA film
    heart_aspect: float  # short over long axis of the cardiac ellipse
    rib_spacing: float
    rib_tilt: float
    bone_density: float
    aortic_knob: float
    female: bool
    vessel_seed: int
    texture_seed: int


@dataclass(frozen=True)
class ViewSetup:
    """How the projection changes the anatomy (PA = posteroanterior standing, AP = portable)."""

    heart_magnification: float
    inspiration: float  # lung height relative to a full PA inspiration
    clavicle_rise: float  # how far above the PA position the clavicles project
    clavicle_slope: float  # lateral end height above the sternal end
    scapula_overlap: bool


PA_VIEW = ViewSetup(heart_magnification=1.0, inspiration=1.0, clavicle_rise=0.0, clavicle_slope=0.085,
                    scapula_overlap=False)
# AP: the heart sits far from the detector so it is magnified; supine/portable patients take a
# shallower breath; the beam angle throws the clavicles up and flat; arms are not rotated
# forward, so the scapulae project over the lungs.
AP_VIEW = ViewSetup(heart_magnification=1.12, inspiration=0.88, clavicle_rise=0.075, clavicle_slope=0.015,
                    scapula_overlap=True)


def view_setup(view: str) -> ViewSetup:
    if view == "PA":
        return PA_VIEW
    if view == "AP":
        return AP_VIEW
    raise ValueError(f"view must be 'PA' or 'AP', got {view!r}")


@dataclass(frozen=True)
class AnatomyChanges:
    """How findings deform the normal anatomy (defaults: no change)."""

    heart_scale: float = 1.0
    heart_ratio_floor: float = 0.0  # smallest cardiothoracic ratio on a PA film (cardiomegaly)
    # Fraction of lung height by which each hemidiaphragm rises: (image-left, image-right).
    diaphragm_raise: tuple[float, float] = (0.0, 0.0)
    inflation: float = 1.0
    flat_diaphragm: bool = False
    lucency: float = 0.0  # extra lung air, as a fraction of normal
    vessel_scale: float = 1.0


def sample_patient_anatomy(rng: np.random.Generator, n_masks: int, gender: str) -> PatientAnatomy:
    width = rng.uniform(0.62, 0.77)
    centre = MIDLINE + rng.normal(0.0, 0.012)
    apex = rng.uniform(0.07, 0.13)
    return PatientAnatomy(
        mask_index=int(rng.integers(n_masks)),
        lung_x0=centre - width / 2,
        lung_x1=centre + width / 2,
        lung_apex=apex,
        lung_base=apex + rng.uniform(0.58, 0.72),
        chest_wall=rng.uniform(0.045, 0.085),
        heart_ratio=rng.uniform(0.40, 0.47),
        heart_aspect=rng.uniform(0.6, 0.7),
        rib_spacing=rng.uniform(0.060, 0.068),
        rib_tilt=rng.uniform(0.8, 1.2),
        bone_density=rng.uniform(0.8, 1.15),
        aortic_knob=rng.uniform(0.02, 0.03),
        female=gender == "F",
        vessel_seed=int(rng.integers(2**31)),
        texture_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class Grid:
    """Patient coordinates of every pixel, and the affine that produced them."""

    X: np.ndarray  # float32 (R, R)
    Y: np.ndarray
    pixel_to_patient: np.ndarray  # 3x3: [X, Y, 1] = M @ [col, row, 1] (pixel units)

    @property
    def resolution(self) -> int:
        return self.X.shape[0]

    @property
    def pixel_size(self) -> float:
        """Patient units covered by one pixel."""
        return float(np.hypot(self.pixel_to_patient[0, 0], self.pixel_to_patient[1, 0]))

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """Patient coordinates (n, 2) -> pixel coordinates (n, 2)."""
        inverse = np.linalg.inv(self.pixel_to_patient)
        homogeneous = np.c_[points, np.ones(len(points))]
        return (homogeneous @ inverse.T)[:, :2]


def positioning_grid(resolution: int, rotation_deg: float, shift: tuple[float, float], scale: float) -> Grid:
    """Pixel -> patient coordinates for a patient rotated/shifted/magnified about the image centre."""
    theta = np.deg2rad(rotation_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    # image = c + scale * Rot(theta) (patient - c) + shift, inverted:
    rot_inv = np.array([[cos, sin], [-sin, cos]]) / scale
    centre = np.array([0.5, 0.5])
    to_normal = np.array([[1.0 / resolution, 0, 0.5 / resolution], [0, 1.0 / resolution, 0.5 / resolution],
                          [0, 0, 1]])
    inverse = np.eye(3)
    inverse[:2, :2] = rot_inv
    inverse[:2, 2] = centre - rot_inv @ (centre + np.asarray(shift))
    matrix = inverse @ to_normal
    cols, rows = np.meshgrid(np.arange(resolution, dtype=np.float32), np.arange(resolution, dtype=np.float32))
    X = (matrix[0, 0] * cols + matrix[0, 1] * rows + matrix[0, 2]).astype(np.float32)
    Y = (matrix[1, 0] * cols + matrix[1, 1] * rows + matrix[1, 2]).astype(np.float32)
    return Grid(X, Y, matrix)


@dataclass(frozen=True)
class ChestGeometry:
    """Where things are, for findings to place their signs. Sides are image sides."""

    grid: Grid
    lung: np.ndarray  # float32 soft lung field in [0, 1]
    heart: np.ndarray  # float32 soft heart + mediastinum silhouette; lung behind it is hidden
    left_side: np.ndarray  # bool: patient X left of the midline (the patient's right lung)
    lung_box_left: tuple[float, float, float, float]  # x0, x1, apex, base (patient coordinates)
    lung_box_right: tuple[float, float, float, float]
    hilum_left: tuple[float, float]
    hilum_right: tuple[float, float]
    heart_box: tuple[float, float, float, float]  # x0, x1, top, bottom
    thorax: tuple[float, float]  # inner margins of the ribs at the widest point (x)
    midline: float

    @property
    def cardiothoracic_ratio(self) -> float:
        """Widest heart diameter over widest inner thoracic diameter (normal PA < 0.5)."""
        return (self.heart_box[1] - self.heart_box[0]) / (self.thorax[1] - self.thorax[0])


@dataclass
class ChestLayers:
    """Density layers of the normal chest; the renderer combines them with the finding layers."""

    tissue: np.ndarray  # soft tissue, mediastinum, heart
    bone: np.ndarray
    air: np.ndarray  # lung air (subtracted), already shaped by lung depth
    vessels: np.ndarray  # lung markings (added where lung is aerated)
    heart: np.ndarray  # soft heart silhouette in [0, 1]; it displaces lung air
    geometry: ChestGeometry


# ---------------------------------------------------------------------------------------------
# Lung field from the real mask


def blur(image: np.ndarray, sigma: float, pixel: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` in patient units. Wide blurs run on a reduced copy: the
    result is smooth anyway, and it is ten times cheaper."""
    sigma_px = sigma / pixel
    if sigma_px < 3:
        return ndimage.gaussian_filter(image.astype(np.float32, copy=False), sigma_px)
    factor = 4 if sigma_px >= 8 else 2
    small = Image.fromarray(image.astype(np.float32, copy=False), "F").reduce(factor)
    small = ndimage.gaussian_filter(np.asarray(small), sigma_px / factor)
    return np.asarray(Image.fromarray(small, "F").resize(image.shape[::-1], Image.Resampling.BILINEAR))


def _fill_polygons(grid: Grid, polygons: list[np.ndarray]) -> np.ndarray:
    """The soft-edged union of filled polygons given in patient coordinates."""
    canvas = Image.new("F", (grid.resolution, grid.resolution), 0.0)
    draw = ImageDraw.Draw(canvas)
    for points in polygons:
        draw.polygon([tuple(p) for p in grid.to_pixels(points)], fill=1.0)
    return ndimage.gaussian_filter(np.asarray(canvas, dtype=np.float32), 0.003 / grid.pixel_size)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1


def _split_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's two lungs as separate float images: (image-left lung, image-right lung)."""
    labels, count = ndimage.label(mask)
    if count < 2:
        half = mask.shape[1] // 2
        left = mask.copy()
        left[:, half:] = False
        return left.astype(np.float32), (mask & ~left).astype(np.float32)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    first, second = np.argsort(areas)[-2:]
    cols = np.arange(mask.shape[1])
    centroid = [float((labels == k).sum(axis=0) @ cols) / areas[k] for k in (first, second)]
    left_label, right_label = (first, second) if centroid[0] < centroid[1] else (second, first)
    return (labels == left_label).astype(np.float32), (labels == right_label).astype(np.float32)


def _warp_mask(lung_image: np.ndarray, grid: Grid, box: tuple[int, int, int, int],
               lung_box: tuple[float, float, float, float]) -> np.ndarray:
    """Resample a mask image so the mask's bounding box lands on ``lung_box`` (patient coordinates)."""
    mx0, mx1, my0, my1 = box
    x0, x1, apex, base = lung_box
    patient_to_mask = np.array([[(mx1 - mx0) / (x1 - x0), 0, mx0 - x0 * (mx1 - mx0) / (x1 - x0)],
                                [0, (my1 - my0) / (base - apex), my0 - apex * (my1 - my0) / (base - apex)],
                                [0, 0, 1]])
    m = patient_to_mask @ grid.pixel_to_patient
    size = grid.resolution
    warped = Image.fromarray(lung_image, "F").transform(
        (size, size), Image.Transform.AFFINE, tuple(m[:2].ravel()), resample=Image.Resampling.BILINEAR)
    return np.asarray(warped, dtype=np.float32)


def _medial_dome(lung_right: np.ndarray) -> float:
    """Height of the image-right lung's base a quarter of its width from the midline, as a
    fraction of the mask's lung box height (0 = apex row, 1 = lowest lung row)."""
    rows = np.flatnonzero(lung_right.any(axis=1))
    cols = np.flatnonzero(lung_right.any(axis=0))
    column = lung_right[:, cols[0] + (cols[-1] - cols[0]) // 4]
    lowest = np.flatnonzero(column > 0.5)
    top, bottom = rows[0], rows[-1] + 1
    # The mask box spans both lungs, so measure against the union box (same rows as the pair).
    value = (lowest[-1] + 1 - top) / (bottom - top) if len(lowest) else 0.85
    return float(np.clip(value, 0.7, 1.0))


def _medial_borders(mask: np.ndarray, box: tuple[int, int, int, int], top: float,
                    bottom: float) -> tuple[float, float]:
    """Medial borders of both lungs between two heights, as fractions of the mask box width.

    The real mask already outlines the upper mediastinum; reading its borders puts the aortic
    knob and the SVC line where this mask's lungs end.
    """
    mx0, mx1, my0, my1 = box
    rows = mask[my0 + int(top * (my1 - my0)): my0 + int(bottom * (my1 - my0)), mx0:mx1]
    width = mx1 - mx0
    centre = width // 2
    left_cols = [np.flatnonzero(row[:centre]) for row in rows]
    right_cols = [np.flatnonzero(row[centre:]) for row in rows]
    left = [cols[-1] for cols in left_cols if len(cols)]
    right = [cols[0] + centre for cols in right_cols if len(cols)]
    left_border = (np.min(left) if left else 0.42 * width) / width
    right_border = (np.max(right) if right else 0.6 * width) / width
    return float(left_border), float(right_border)


# ---------------------------------------------------------------------------------------------
# Bones (density units)


def _smooth_band(distance: np.ndarray, half_width: float | np.ndarray, edge: float) -> np.ndarray:
    """1 inside |distance| < half_width, falling to 0 over ``edge`` (anti-aliased band)."""
    return np.clip((half_width - np.abs(distance)) / edge + 0.5, 0.0, 1.0)


def _step(value: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased 0 -> 1 step where ``value`` crosses zero."""
    return np.clip(value / edge + 0.5, 0.0, 1.0)


def _ribs(X: np.ndarray, Y: np.ndarray, anatomy: PatientAnatomy, wall_half: float, apex: float,
          stretch: float, edge: float) -> np.ndarray:
    """Posterior rib arcs with bright cortical margins, and fainter anterior ribs.

    Each family is drawn at once through a phase field: a pixel's height above the rib path,
    divided by the rib period, gives which rib it lies on and where within it.
    """
    d_abs = np.abs(X - MIDLINE)
    reach = np.clip((d_abs - SPINE_HALF_WIDTH) / (wall_half - SPINE_HALF_WIDTH), 0.0, 1.2)
    spacing = anatomy.rib_spacing * stretch
    # Posterior ribs leave the spine slightly upwards, then arc down to the lateral wall.
    posterior_path = anatomy.rib_tilt * (-0.07 * reach + 0.2 * reach**2)
    # Lower ribs are set further apart: stretch the phase a little with depth.
    depth = np.maximum(Y - (apex - 0.04) - posterior_path, 0.0)
    phase = depth / spacing * (1.0 - 0.06 * depth / 0.6)
    index = np.floor(phase)
    dist = (phase - index - 0.5) * spacing
    half = 0.21 * spacing * (1.0 + 0.25 * reach)
    band = _smooth_band(dist, half, edge)
    cortex = _smooth_band(np.abs(dist) - 0.82 * half, 0.16 * half, edge)
    visible = (index < 10) & (reach > 0.0) & (reach < 1.06)
    fade = np.clip((1.06 - reach) / 0.1, 0, 1)
    posterior = np.where(visible, (0.055 * band + 0.045 * cortex) * fade, 0.0)
    # Anterior ribs run from the lateral wall steeply down towards the sternum, ending where
    # the (invisible) costal cartilage begins.
    anterior_path = 0.11 * anatomy.rib_tilt + 0.2 * (1.0 - reach)
    phase_a = (Y - (apex + 0.02) - anterior_path) / (spacing * 1.1)
    index_a = np.floor(phase_a)
    dist_a = (phase_a - index_a - 0.5) * spacing
    band_a = _smooth_band(dist_a, 0.17 * spacing, 1.5 * edge)
    visible_a = (index_a >= 0) & (index_a < 6) & (reach > 0.4) & (reach < 1.0)
    anterior = np.where(visible_a, 0.03 * band_a * np.clip((reach - 0.4) / 0.15, 0, 1), 0.0)
    return (posterior + anterior).astype(np.float32)


def _clavicles(X: np.ndarray, Y: np.ndarray, apex: float, view: ViewSetup, edge: float) -> np.ndarray:
    d_abs = np.abs(X - MIDLINE)
    t = (d_abs - 0.04) / 0.3
    sternal_y = apex + 0.085 - view.clavicle_rise
    centre = sternal_y - view.clavicle_slope * t - 0.012 * np.sin(2 * np.pi * t)
    half = 0.017 + 0.004 * np.cos(np.pi * t) + 0.006 * np.clip(1 - t * 6, 0, 1)
    band = _smooth_band(Y - centre, half, edge)
    ends = np.clip(t * 15, 0, 1) * np.clip((1 - t) * 10, 0, 1)
    cortex = _smooth_band(np.abs(Y - centre) - 0.8 * half, 0.2 * half, edge)
    return ((0.12 * band + 0.05 * cortex) * ends).astype(np.float32)


def _spine(X: np.ndarray, Y: np.ndarray, edge: float) -> np.ndarray:
    dx = X - MIDLINE
    column = _smooth_band(dx, SPINE_HALF_WIDTH * (1 + 0.5 * np.clip(Y - 0.3, 0, 1)), 2 * edge)
    period = 0.05 + 0.012 * np.clip(Y, 0, 1)
    phase = (Y / period) % 1.0
    # Vertebral bodies with bright endplates and darker disc spaces, pedicles as paired ovals.
    disc = _smooth_band(phase - 0.5, 0.08, 0.05)
    endplate = _smooth_band(np.abs(phase - 0.5) - 0.11, 0.035, 0.05)
    pedicles = np.exp(-(((np.abs(dx) - 0.024) / 0.009) ** 2 + ((phase - 0.22) / 0.13) ** 2))
    spinous = np.exp(-((dx / 0.007) ** 2 + ((phase - 0.72) / 0.18) ** 2))
    vertebra = column * (0.07 - 0.035 * disc + 0.03 * endplate) + 0.035 * pedicles + 0.025 * spinous
    return vertebra.astype(np.float32)


def _scapulae(X: np.ndarray, Y: np.ndarray, apex: float, wall_half: float, view: ViewSetup,
              edge: float) -> np.ndarray:
    d_abs = np.abs(X - MIDLINE)
    # The medial border slopes outwards going down; in AP it lies over the lung.
    medial = wall_half - (0.12 if view.scapula_overlap else 0.01) + 0.07 * (Y - apex) / 0.35
    tip = apex + 0.36
    vertical = _step(Y - (apex - 0.04), edge) * _step(tip - Y, 4 * edge)
    blade = _step(d_abs - medial, 2 * edge) * vertical
    border = _smooth_band(d_abs - medial - 0.007, 0.006, edge) * vertical
    return (0.04 * blade + 0.04 * border).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Lung markings


@dataclass(frozen=True)
class Trunk:
    """The first segment of a branching tree, in patient coordinates."""

    start: tuple[float, float]
    heading: float  # radians, 0 = towards image right, pi/2 = down
    length: float
    width: float


def draw_branches(grid: Grid, trunks: list[Trunk], rng: np.random.Generator, generations: int) -> np.ndarray:
    """Binary-branching tubes that taper and fade each generation (vessels, bronchi).

    Returns a float image at the grid's resolution, 1.0 along the trunks.
    """
    size = grid.resolution
    pixel = grid.pixel_size
    canvas = Image.new("F", (size, size), 0.0)
    draw = ImageDraw.Draw(canvas)
    # Grow breadth-first as arrays of segments: (start x, start y, heading, length, width, strength).
    level = np.array([[*t.start, t.heading, t.length, t.width, 1.0] for t in trunks], dtype=np.float64)
    for generation in range(generations + 1):
        ends = level[:, :2] + level[:, 3:4] * np.c_[np.cos(level[:, 2]), np.sin(level[:, 2])]
        starts_px = grid.to_pixels(level[:, :2])
        ends_px = grid.to_pixels(ends)
        for p0, p1, width, strength in zip(starts_px, ends_px, level[:, 4], level[:, 5]):
            draw.line([tuple(p0), tuple(p1)], fill=float(strength), width=max(1, int(round(width / pixel))))
        if generation == generations:
            break
        n = len(level)
        turns = rng.uniform(0.2, 0.5, size=(n, 2)) * np.array([-1.0, 1.0])
        shrink = rng.uniform(0.65, 0.85, size=(n, 2))
        children = np.empty((2 * n, 6))
        children[:, :2] = np.repeat(ends, 2, axis=0)
        children[:, 2] = np.repeat(level[:, 2], 2) + turns.ravel()
        children[:, 3] = np.repeat(level[:, 3], 2) * shrink.ravel()
        children[:, 4] = np.repeat(level[:, 4], 2) * 0.75
        children[:, 5] = np.repeat(level[:, 5], 2) * 0.82
        level = children
    return ndimage.gaussian_filter(np.asarray(canvas, dtype=np.float32), 0.004 / pixel)


def _vessel_tree(anatomy: PatientAnatomy, hila: list[tuple[float, float]], grid: Grid) -> np.ndarray:
    """Pulmonary vessels radiating from the hila, tapering towards the periphery."""
    rng = np.random.default_rng(anatomy.vessel_seed)
    trunks = []
    for (hx, hy), outward in zip(hila, (-1.0, 1.0)):
        # Trunks fan out upwards, laterally and down into the base (gravity: bigger at the base).
        for angle in np.linspace(-0.45 * np.pi, 0.45 * np.pi, 7):
            direction = angle + rng.normal(0, 0.1)
            heading = np.pi - direction if outward < 0 else direction
            downward = np.sin(heading) > 0
            trunks.append(Trunk((hx, hy), float(heading), rng.uniform(0.06, 0.085) * (1.1 if downward else 0.9),
                                0.011 if downward else 0.008))
    return draw_branches(grid, trunks, rng, generations=4)


# ---------------------------------------------------------------------------------------------


def build_chest(anatomy: PatientAnatomy, lung_mask: np.ndarray, view: ViewSetup, changes: AnatomyChanges,
                grid: Grid) -> ChestLayers:
    """All normal-anatomy density layers of one study, on the study's pixel grid, section by section."""
    X, Y = grid.X, grid.Y
    pixel = grid.pixel_size
    edge = 1.2 * pixel  # anti-aliasing width for analytic edges
    lungs = _lungs(anatomy, lung_mask, view, changes, grid)
    half_width = (anatomy.lung_x1 - anatomy.lung_x0) / 2
    wall_half = half_width + 0.015  # inner rib margin
    lung_left_box = (anatomy.lung_x0, MIDLINE, anatomy.lung_apex, lungs.bases[0])
    lung_right_box = (MIDLINE, anatomy.lung_x1, anatomy.lung_apex, lungs.bases[1])

    # Lungs hold most air centrally; little at the apex, the angles and along the mediastinum.
    depth = blur(lungs.lung, 0.05, pixel)
    air = lungs.lung * (0.3 + 0.95 * depth) * LUNG_AIR * (1.0 + changes.lucency)

    torso, body, tissue = _body(anatomy, grid, lungs.bases, half_width + anatomy.chest_wall, edge)
    heart = _heart(anatomy, view, changes, grid, lung_mask, lungs, wall_half, edge)
    # Below the dome the heart merges with the equally dense abdomen.
    tissue = tissue + HEART_EXTRA * np.maximum(heart.depth, 0.4 * heart.silhouette) * _step(
        heart.bottom + 0.01 - Y, 0.03)
    tissue = _airways_and_stomach(tissue, anatomy, grid, lungs, body, edge)

    # Ribs read faintly outside the lungs: against soft tissue they have little contrast.
    near_lung = np.clip(blur(lungs.lung * (1 - heart.shadow), 0.02, pixel) * 1.5, 0, 1)
    rib_stretch = view.inspiration * changes.inflation
    bones = anatomy.bone_density * (
        _ribs(X, Y, anatomy, wall_half, anatomy.lung_apex, rib_stretch, edge) * torso * (0.3 + 0.7 * near_lung)
        + _clavicles(X, Y, anatomy.lung_apex, view, edge)
        + _spine(X, Y, edge) * body
        + _scapulae(X, Y, anatomy.lung_apex, wall_half, view, edge) * torso
    )
    hila = [(MIDLINE - 0.085, anatomy.lung_apex + 0.3 * lungs.height / 0.62),
            (MIDLINE + 0.09, anatomy.lung_apex + 0.28 * lungs.height / 0.62)]
    vessels = _lung_vessels(anatomy, changes, grid, hila)

    geometry = ChestGeometry(
        grid=grid, lung=lungs.lung.astype(np.float32), heart=heart.shadow.astype(np.float32),
        left_side=lungs.left_side, lung_box_left=lung_left_box, lung_box_right=lung_right_box,
        hilum_left=hila[0], hilum_right=hila[1], heart_box=heart.box,
        thorax=(MIDLINE - wall_half, MIDLINE + wall_half),
        midline=MIDLINE,
    )
    return ChestLayers(tissue=tissue.astype(np.float32), bone=bones.astype(np.float32),
                       air=air.astype(np.float32), vessels=vessels, heart=heart.shadow.astype(np.float32),
                       geometry=geometry)


@dataclass(frozen=True)
class _Lungs:
    lung: np.ndarray            # the warped lung masks, smoothed
    bases: list[float]          # each hemidiaphragm's height
    height: float               # apex to base, after inspiration and inflation
    box: tuple                  # the source mask's bounding box
    right: np.ndarray           # the patient's left lung (image right), unwarped: the heart rests on its dome
    left_side: np.ndarray       # image-left half of the grid


def _lungs(anatomy: PatientAnatomy, lung_mask: np.ndarray, view: ViewSetup, changes: AnatomyChanges,
           grid: Grid) -> _Lungs:
    """Each real lung warped on its own, so each hemidiaphragm can move independently."""
    X, Y = grid.X, grid.Y
    pixel = grid.pixel_size
    d_abs = np.abs(X - MIDLINE)
    left_side = X < MIDLINE
    box = _mask_box(lung_mask)
    height = (anatomy.lung_base - anatomy.lung_apex) * view.inspiration * changes.inflation
    bases = [anatomy.lung_apex + height * (1.0 - raise_) for raise_ in changes.diaphragm_raise]
    boxes = [(anatomy.lung_x0, anatomy.lung_x1, anatomy.lung_apex, base) for base in bases]
    lung_left, lung_right = _split_lungs(lung_mask)
    lung = _warp_mask(lung_left, grid, box, boxes[0]) + _warp_mask(lung_right, grid, box, boxes[1])
    if changes.flat_diaphragm:
        # Hyperinflation pushes the domes flat: clip them with an almost horizontal line.
        flat = np.where(left_side, bases[0], bases[1]) - 0.06 * height + 0.01 * d_abs
        lung = lung * _step(flat - Y, 3 * pixel)
    lung = ndimage.gaussian_filter(np.clip(lung, 0, 1), 0.0035 / pixel)
    return _Lungs(lung, bases, height, box, lung_right, left_side)


def _body(anatomy: PatientAnatomy, grid: Grid, bases: list[float], body_half: float, edge: float):
    """A rounded torso under sloping shoulders, the neck above, the arms at the sides: (torso, body, tissue)."""
    X, Y = grid.X, grid.Y
    d_abs = np.abs(X - MIDLINE)
    shoulder_top = anatomy.lung_apex - 0.12 + 0.13 * np.clip((d_abs - 0.09) / 0.38, 0, 1) ** 1.4
    # The flanks widen from the axillae to the lower ribs, then narrow to the waist.
    flank = body_half + 0.06 * np.clip((anatomy.lung_apex + 0.1 - Y) / 0.25, 0, 1) \
        - 0.025 * np.clip((anatomy.lung_base - Y) / 0.4, 0, 1) - 0.03 * np.clip((Y - anatomy.lung_base - 0.05) / 0.3, 0, 1)
    torso = _step(flank - d_abs, 3 * edge) * _step(Y - shoulder_top, 3 * edge)
    torso = blur(torso, 0.012, grid.pixel_size)  # rounds the shoulders, softens the skin line
    neck = _step(0.085 - d_abs, 3 * edge)
    body = np.maximum(torso, neck)
    thickness = np.sqrt(np.clip(1.0 - (d_abs / (body_half + 0.05)) ** 2, 0.0, 1.0))
    tissue = body * (TISSUE_RIM + TISSUE_CORE * thickness)
    if anatomy.female:
        # Breast soft tissue over the lower lateral chest, sharpest along its lower edge.
        for sign, base in ((-1, bases[0]), (1, bases[1])):
            r = np.hypot((X - (MIDLINE + sign * 0.23)) / 0.17, (Y - (base - 0.06)) / 0.11)
            tissue = tissue + 0.07 * np.clip((1.0 - r) / 0.25, 0, 1) * (Y > base - 0.2)
    # Upper abdomen below the domes is solid organ, a little denser than the chest wall.
    base_here = bases[0] + (bases[1] - bases[0]) * np.clip((X - MIDLINE) / 0.2 + 0.5, 0, 1)
    below = np.clip((Y - base_here + 0.03) / 0.06, 0, 1)
    tissue = tissue + 0.06 * torso * below
    return torso, body, tissue


@dataclass(frozen=True)
class _Heart:
    shadow: np.ndarray          # the cardiomediastinal silhouette with the aortic knob
    depth: np.ndarray           # thickest in the middle
    silhouette: np.ndarray
    bottom: float
    box: tuple                  # (x0, x1, top, bottom) of the heart above the dome


def _heart(anatomy: PatientAnatomy, view: ViewSetup, changes: AnatomyChanges, grid: Grid, lung_mask: np.ndarray,
           lungs: _Lungs, wall_half: float, edge: float) -> _Heart:
    """An ellipse whose long axis runs from the right atrium (upper image-left) down to the apex (lower
    image-right), sized by its cardiothoracic ratio with about a third of it right of the midline, joined to
    the vascular pedicle. It hides the lung behind it. AP magnification and findings enlarge it."""
    X, Y = grid.X, grid.Y
    bases, height = lungs.bases, lungs.height
    span = anatomy.lung_x1 - anatomy.lung_x0
    pa_ratio = max(anatomy.heart_ratio * changes.heart_scale, changes.heart_ratio_floor)
    # Even a huge heart leaves the costophrenic angles clear on these films.
    heart_width = min(pa_ratio * view.heart_magnification, MAX_HEART_RATIO) * 2 * wall_half
    heart_x = MIDLINE + 0.02 + 0.14 * heart_width
    cos, sin = np.cos(HEART_TILT), np.sin(HEART_TILT)
    aspect = anatomy.heart_aspect
    long_axis = heart_width / 2 / np.sqrt(cos**2 + aspect**2 * sin**2)
    short_axis = aspect * long_axis
    half_height = np.sqrt(long_axis**2 * sin**2 + short_axis**2 * cos**2)
    # The heart rests on the medial part of the left dome, well above the lateral angle.
    heart_bottom = anatomy.lung_apex + _medial_dome(lungs.right) * (bases[1] - anatomy.lung_apex)
    heart_y = heart_bottom - 0.6 * half_height
    along = ((X - heart_x) * cos + (Y - heart_y) * sin) / long_axis
    across = (-(X - heart_x) * sin + (Y - heart_y) * cos) / short_axis
    # Thickest in the middle, so the heart reads as a rounded organ rather than a flat plate.
    heart_depth = np.sqrt(np.clip(1.0 - (along**2 + across**2), 0.0, 1.0))

    # Upper mediastinum: the aortic knob bulges to the patient's left, the SVC border to the right.
    upper_left, upper_right = _medial_borders(lung_mask, lungs.box, 0.2, 0.35)
    knob_x = anatomy.lung_x0 + np.clip(upper_right, 0.5, 0.65) * span - 0.5 * anatomy.aortic_knob
    knob_y = anatomy.lung_apex + 0.17 * height / 0.62
    svc_x = anatomy.lung_x0 + np.clip(upper_left, 0.35, 0.5) * span + 0.01
    knob = _step(anatomy.aortic_knob - np.hypot(X - knob_x, (Y - knob_y) * 0.9), 1.5 * edge)

    # Cardiomediastinal silhouette: the heart above the dome joined to the vascular pedicle, so
    # the heart borders run up into the mediastinum with a waist, instead of ending in a ball.
    t = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    ellipse_x = heart_x + long_axis * np.cos(t) * cos - short_axis * np.sin(t) * sin
    ellipse_y = heart_y + long_axis * np.cos(t) * sin + short_axis * np.sin(t) * cos
    outline = np.c_[ellipse_x, np.minimum(ellipse_y, heart_bottom + 0.03)]
    pedicle = np.array([[svc_x, knob_y - 0.06], [knob_x, knob_y - 0.06], [knob_x + 0.01, heart_y],
                        [svc_x - 0.01, heart_y]])
    silhouette = _fill_polygons(grid, [outline, pedicle])
    box = (float(ellipse_x[ellipse_y <= heart_bottom].min()), float(ellipse_x[ellipse_y <= heart_bottom].max()),
           heart_y - half_height, heart_bottom)
    return _Heart(np.maximum(silhouette, knob), heart_depth, silhouette, heart_bottom, box)


def _airways_and_stomach(tissue: np.ndarray, anatomy: PatientAnatomy, grid: Grid, lungs: _Lungs, body: np.ndarray,
                         edge: float) -> np.ndarray:
    """``tissue`` less the air of the trachea and main bronchi, then of the stomach bubble."""
    X, Y = grid.X, grid.Y
    # Trachea and main bronchi: an air column down the midline to the carina.
    carina_y = anatomy.lung_apex + 0.19 * lungs.height / 0.62
    trachea = _smooth_band(X - MIDLINE, 0.017, 2 * edge) * np.clip((carina_y - Y) / 0.02, 0, 1)
    for sign in (-1, 1):
        centre = MIDLINE + sign * 0.75 * (Y - carina_y)
        trachea = trachea + _smooth_band(X - centre, 0.01, 2 * edge) * (Y > carina_y) * (Y < carina_y + 0.07)
    tissue = tissue - 0.11 * np.clip(trachea, 0, 1) * body

    # Gas in the stomach fundus under the left (image-right) dome.
    bubble_y = lungs.bases[1] + 0.035
    bubble = _step(1 - np.hypot((X - (MIDLINE + 0.17)) / 0.055, (Y - bubble_y) / 0.03), 0.15)
    return tissue - 0.12 * bubble * _step(bubble_y + 0.008 - Y, edge)


def _lung_vessels(anatomy: PatientAnatomy, changes: AnatomyChanges, grid: Grid, hila: list) -> np.ndarray:
    """The vessel tree from both hila, the hilar shadows, and a fine mottle of the lung texture."""
    X = grid.X
    vessels = _vessel_tree(anatomy, hila, grid)
    for hx_, hy_ in hila:  # the hilar shadows themselves: pulmonary arteries and nodes
        vessels = vessels + 0.6 * np.exp(-(((X - hx_) / 0.03) ** 2 + ((grid.Y - hy_) / 0.055) ** 2))
    texture_rng = np.random.default_rng(anatomy.texture_seed)
    mottle = ndimage.gaussian_filter(texture_rng.standard_normal((96, 96)).astype(np.float32), 1.2)
    mottle = np.asarray(Image.fromarray(mottle / (mottle.std() + 1e-6), "F").resize(X.shape[::-1], Image.Resampling.BILINEAR))
    return (0.13 * changes.vessel_scale * vessels + 0.018 * mottle).astype(np.float32)

"""Radiological signs of the 14 NIH ChestX-ray14 findings, drawn onto a phantom chest.

A finding acts in two steps. ``plan_finding`` draws everything random about it once (side,
severity, and, where the NIH expert boxes cover the finding, a real box position and size), so
that the anatomy change and the drawn sign agree. Then a finding may deform the anatomy
(``anatomy_changes``: an enlarged heart, a raised hemidiaphragm, hyperinflation) and draw its sign
(``draw_findings``) into four density layers the renderer combines with the normal chest:

- ``fill``: fraction of lung air replaced by fluid or tissue (effusion, consolidation, masses);
- ``air``: extra air, darker than normal lung (pneumothorax, bullae, hernia gas);
- ``density``: extra attenuation that is not tied to lung air (pleural lines, reticulation);
- ``suppress``: fraction of lung markings removed (no vessels beyond a pneumothorax).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr_diffusion.data.phantom.anatomy import AnatomyChanges, ChestGeometry, Trunk, blur, draw_branches
from cxr_diffusion.data.phantom.assets import FindingBoxStats

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")

# Findings without NIH expert boxes borrow the boxes of the closest covered finding.
_BOX_SOURCE = {"Consolidation": "Pneumonia", "Pleural_Thickening": "Effusion"}
# Where the lungs sit on the NIH 1024 x 1024 release images, roughly (from the expert boxes):
# maps a real box into the phantom's lung box.
_NIH_LUNG_X = (0.10, 0.90)
_NIH_LUNG_Y = (0.10, 0.85)


def check_findings(findings: tuple[str, ...]) -> None:
    unknown = [name for name in findings if name not in NIH_FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding name(s) {unknown}; expected NIH names from {list(NIH_FINDINGS)} "
                         "(use an empty tuple for 'No Finding')")


def stable_seed(*parts: object) -> int:
    """A seed from strings/ints that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class FindingPlan:
    """Every random choice about one finding in one study."""

    name: str
    severity: float  # 0 = mildest still-visible sign, 1 = florid
    side: int  # 0 = image left (patient right), 1 = image right
    bilateral: bool
    box_center: tuple[float, float]  # NIH-normalised image coordinates
    box_size: tuple[float, float]
    seed: int


def plan_finding(name: str, study_seed: int, box_stats: dict[str, FindingBoxStats]) -> FindingPlan:
    rng = np.random.default_rng(stable_seed(study_seed, name))
    source = box_stats.get(_BOX_SOURCE.get(name, name))
    if source is not None and len(source):
        center, size = source.sample(rng)
    else:
        center, size = np.array([rng.choice([0.3, 0.7]), 0.5]), np.array([0.2, 0.2])
    side = int(center[0] >= 0.5)
    return FindingPlan(name=name, severity=float(rng.uniform(0.0, 1.0)), side=side,
                       bilateral=bool(rng.random() < 0.3), box_center=(float(center[0]), float(center[1])),
                       box_size=(float(size[0]), float(size[1])), seed=int(rng.integers(2**63)))


# ---------------------------------------------------------------------------------------------
# Anatomy changes


def anatomy_changes(plans: list[FindingPlan]) -> AnatomyChanges:
    heart, heart_floor, inflation, lucency, vessels = 1.0, 0.0, 1.0, 0.0, 1.0
    raise_ = [0.0, 0.0]
    flat = False
    for plan in plans:
        s = plan.severity
        if plan.name == "Cardiomegaly":
            heart *= 1.24 + 0.2 * s
            heart_floor = 0.53 + 0.1 * s  # cardiothoracic ratio past 0.5 whatever the patient's baseline
        elif plan.name == "Edema":
            heart *= 1.08  # most oedema on these films is cardiogenic
        elif plan.name == "Atelectasis":
            raise_[plan.side] = max(raise_[plan.side], 0.09 + 0.07 * s)  # volume loss pulls the dome up
        elif plan.name == "Emphysema":
            inflation *= 1.10 + 0.07 * s
            flat = True
            lucency += 0.15 + 0.12 * s
            vessels *= 0.45  # pruned peripheral vessels
            heart *= 0.9  # long narrow "tear-drop" heart
        elif plan.name == "Fibrosis":
            inflation *= 0.94
    return AnatomyChanges(heart_scale=heart, heart_ratio_floor=heart_floor, diaphragm_raise=(raise_[0], raise_[1]), inflation=inflation,
                          flat_diaphragm=flat, lucency=lucency, vessel_scale=vessels)


# ---------------------------------------------------------------------------------------------
# Drawing


@dataclass
class FindingLayers:
    fill: np.ndarray
    air: np.ndarray
    density: np.ndarray
    suppress: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "FindingLayers":
        return cls(*(np.zeros(shape, np.float32) for _ in range(4)))


@dataclass
class _Canvas:
    """The geometry plus lazily computed helpers shared by all findings of one study."""

    geometry: ChestGeometry
    layers: FindingLayers
    _depth: np.ndarray | None = field(default=None, repr=False)
    _depth_key: float = field(default=float("nan"), repr=False)

    @property
    def X(self) -> np.ndarray:
        return self.geometry.grid.X

    @property
    def Y(self) -> np.ndarray:
        return self.geometry.grid.Y

    @property
    def pixel(self) -> float:
        return self.geometry.grid.pixel_size

    @property
    def edge(self) -> float:
        return 1.5 * self.pixel

    def lung_depth(self) -> np.ndarray:
        """Distance of each pixel from the edge of the still-aerated lung, in patient units.

        Lung hidden by the heart or already filled by an earlier finding does not count, so a
        nodule drawn after an effusion lands where it can still be seen.
        """
        key = float(self.layers.fill.sum())
        if self._depth is None or key != self._depth_key:
            visible = self.geometry.lung * (1.0 - self.geometry.heart) * (1.0 - np.clip(self.layers.fill, 0, 1)) > 0.5
            self._depth = (ndimage.distance_transform_edt(visible) * self.pixel).astype(np.float32)
            self._depth_key = key
        return self._depth

    def side_mask(self, side: int) -> np.ndarray:
        return self.geometry.left_side if side == 0 else ~self.geometry.left_side

    def lung_box(self, side: int) -> tuple[float, float, float, float]:
        return self.geometry.lung_box_left if side == 0 else self.geometry.lung_box_right

    def box_to_patient(self, plan: FindingPlan) -> tuple[np.ndarray, np.ndarray]:
        """The plan's NIH box centre and size, mapped onto this chest's lung box."""
        x0 = self.geometry.lung_box_left[0]
        x1 = self.geometry.lung_box_right[1]
        apex = self.geometry.lung_box_left[2]
        base = max(self.geometry.lung_box_left[3], self.geometry.lung_box_right[3])
        sx = (x1 - x0) / (_NIH_LUNG_X[1] - _NIH_LUNG_X[0])
        sy = (base - apex) / (_NIH_LUNG_Y[1] - _NIH_LUNG_Y[0])
        cx, cy = plan.box_center
        centre = np.array([x0 + (cx - _NIH_LUNG_X[0]) * sx, apex + (cy - _NIH_LUNG_Y[0]) * sy])
        size = np.array([plan.box_size[0] * sx, plan.box_size[1] * sy])
        return centre, size

    def inside_lung(self, point: np.ndarray, side: int, margin: float) -> np.ndarray:
        """The nearest point to ``point`` that lies at least ``margin`` inside the lung of ``side``."""
        depth = self.lung_depth()
        for wanted in (margin, margin / 2, self.pixel):
            ok = (depth >= wanted) & self.side_mask(side)
            if ok.any():
                break
        else:
            return point
        rows, cols = np.nonzero(ok)
        dist = (self.X[rows, cols] - point[0]) ** 2 + (self.Y[rows, cols] - point[1]) ** 2
        best = int(np.argmin(dist))
        return np.array([self.X[rows[best], cols[best]], self.Y[rows[best], cols[best]]])

    def noise(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        """Smooth zero-mean unit-variance noise with blobs about ``scale`` across."""
        # Drawn at a fixed 128 grid so a study looks the same at every render resolution.
        coarse = ndimage.gaussian_filter(rng.standard_normal((128, 128)).astype(np.float32), scale * 128 / 2.5)
        coarse /= coarse.std() + 1e-6
        # Sample in patient coordinates so the texture moves with the patient.
        cols = np.clip(self.X * 127.0, 0, 127)
        rows = np.clip(self.Y * 127.0, 0, 127)
        return ndimage.map_coordinates(coarse, [rows, cols], order=1, mode="nearest").astype(np.float32)


def _soft_disk(c: _Canvas, centre: np.ndarray, radius: np.ndarray | float, edge: float) -> np.ndarray:
    dist = np.hypot(c.X - centre[0], c.Y - centre[1])
    return np.clip((radius - dist) / edge + 0.5, 0.0, 1.0)


def _lobulated_radius(c: _Canvas, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    angle = np.arctan2(c.Y - centre[1], c.X - centre[0])
    wobble = sum(rng.uniform(0.02, 0.08) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return radius * (1.0 + wobble)


def _draw_atelectasis(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Plate-like (discoid) atelectasis: a thick, nearly horizontal linear band in the mid/lower
    # zone; the dome on that side is raised by the volume loss (see anatomy_changes).
    centre, size = c.box_to_patient(plan)
    _, _, apex, base = c.lung_box(plan.side)
    x0, x1 = c.lung_box(plan.side)[:2]
    # Keep the whole plate inside the lung: it is only visible against aerated lung.
    centre[0] = np.clip(centre[0], x0 + 0.4 * (x1 - x0), x1 - 0.4 * (x1 - x0))
    centre[1] = np.clip(centre[1], apex + 0.45 * (base - apex), base - 0.08)
    centre = c.inside_lung(centre, plan.side, 0.06)
    length = float(np.clip(size[0], 0.16, 0.24))
    thickness = 0.011 + 0.007 * plan.severity
    outward = -1.0 if plan.side == 0 else 1.0
    angle = outward * rng.uniform(0.05, 0.3)  # lateral end lower, as plates follow the fissures
    dx, dy = c.X - centre[0], c.Y - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    taper = np.clip(1.0 - (np.abs(along) / (length / 2)) ** 4, 0, 1)
    band = np.clip((thickness * taper - np.abs(across)) / c.edge + 0.5, 0, 1) * np.clip(taper * 8, 0, 1)
    haze = np.exp(-(across / (3 * thickness)) ** 2) * taper
    c.layers.fill += band + 0.35 * haze * (1 - band)


def _draw_effusion(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Fluid layers dependently and climbs the lateral wall: a basal opacity whose upper edge is
    # a concave meniscus, blunting the costophrenic angle and hiding the dome.
    sides = (0, 1) if plan.bilateral else (plan.side,)
    for side in sides:
        x0, x1, apex, base = c.lung_box(side)
        height = base - apex
        fraction = float(np.clip(0.18 + 0.5 * plan.box_size[1], 0.24, 0.45)) * (0.8 + 0.2 * plan.severity)
        if side != plan.side:
            fraction *= rng.uniform(0.55, 0.85)
        lateral = np.clip((np.abs(c.X - 0.5) - 0.05) / (x1 - x0 - 0.05), 0, 1)
        surface = base - fraction * height - 0.2 * height * lateral**2.5
        # The layer thins towards the meniscus, so the opacity fades upwards rather than stops.
        fluid = np.clip((c.Y - surface) / (0.07 * height), 0, 1) ** 0.7 * c.side_mask(side)
        c.layers.fill += fluid
        # Fluid in the posterior recess also whitens the dome and the angle below the lung edge.
        near_lung = np.clip(blur(c.geometry.lung, 0.012, c.pixel) * 2, 0, 1)
        c.layers.density += 0.06 * fluid * near_lung


def _draw_pneumothorax(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # The lung falls away from the chest wall towards the hilum/base: beyond its edge a thin
    # white visceral pleural line, then black air with no vessels.
    side = plan.side
    base = c.lung_box(side)[3]
    keep = 0.84 - 0.16 * plan.severity
    anchor = np.array([0.5 + (-0.08 if side == 0 else 0.08), base - 0.05])
    lung_side = c.geometry.lung * c.side_mask(side)
    grid = c.geometry.grid
    anchor_px = grid.to_pixels(anchor[None])[0]
    # Pixel-space affine: sample the lung at anchor + (q - anchor) / keep.
    a = 1.0 / keep
    matrix = (a, 0.0, anchor_px[0] * (1 - a), 0.0, a, anchor_px[1] * (1 - a))
    size = lung_side.shape[0]
    collapsed = np.asarray(Image.fromarray(lung_side.astype(np.float32), "F").transform(
        (size, size), Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR), dtype=np.float32)
    space = np.clip(lung_side - collapsed, 0, 1)
    gy, gx = np.gradient(ndimage.gaussian_filter(collapsed, 0.7))
    line = np.clip(np.hypot(gx, gy) * 2.5, 0, 1) * (ndimage.gaussian_filter(space, 2.0) > 0.05)
    c.layers.suppress += space
    c.layers.air += 0.22 * space
    c.layers.density += 0.16 * line
    c.layers.fill += 0.15 * collapsed  # the collapsed lung is less aerated, a little whiter


def _draw_nodule(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Small, round, well defined. The floor of 0.058 keeps it >= 3.7 px wide at 64 x 64.
    centre, size = c.box_to_patient(plan)
    diameter = float(np.clip(np.mean(size), 0.058, 0.085)) * (0.9 + 0.15 * plan.severity)
    centre = c.inside_lung(centre, plan.side, diameter * 0.7)
    disk = _soft_disk(c, centre, diameter / 2, 2 * c.edge)
    c.layers.fill += 0.9 * disk


def _draw_mass(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    centre, size = c.box_to_patient(plan)
    diameter = float(np.clip(np.mean(size), 0.11, 0.22)) * (0.85 + 0.25 * plan.severity)
    centre = c.inside_lung(centre, plan.side, diameter * 0.45)
    radius = _lobulated_radius(c, centre, diameter / 2, rng)
    disk = _soft_disk(c, centre, radius, 2 * c.edge)
    c.layers.fill += 0.9 * disk


def _patchy(c: _Canvas, centre: np.ndarray, size: np.ndarray, rng: np.random.Generator, blob: float,
            threshold: float) -> np.ndarray:
    envelope = np.exp(-(((c.X - centre[0]) / (size[0] / 2)) ** 2 + ((c.Y - centre[1]) / (size[1] / 2)) ** 2))
    texture = c.noise(rng, blob)
    return np.clip((texture - threshold) * 1.2 + 1.6 * envelope - 0.6, 0, 1) * envelope


def _draw_infiltration(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Patchy, ill-defined, fluffy opacities, often in more than one zone.
    centre, size = c.box_to_patient(plan)
    size = np.clip(size, 0.14, 0.3) * (0.9 + 0.3 * plan.severity)
    regions = [(centre, plan.side)]
    if plan.bilateral:
        regions.append((np.array([1.0 - centre[0], centre[1] + rng.uniform(-0.08, 0.08)]), 1 - plan.side))
    for point, side in regions:
        point = c.inside_lung(point, side, 0.05)
        patches = _patchy(c, point, size, rng, blob=0.035, threshold=0.1)
        c.layers.fill += (0.6 + 0.3 * plan.severity) * patches * c.side_mask(side)


def _lobar_region(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An opacity region filling part of a lobe: soft outside, cut straight along a fissure."""
    centre, size = c.box_to_patient(plan)
    size = np.clip(size, 0.16, 0.32)
    centre = c.inside_lung(centre, plan.side, 0.06)
    shape = np.exp(-(((c.X - centre[0]) / (size[0] / 1.7)) ** 2 + ((c.Y - centre[1]) / (size[1] / 1.7)) ** 2))
    # The fissure makes one border sharp: above it for a lower-lobe process, below for an upper.
    fissure_y = centre[1] + (-1 if rng.random() < 0.5 else 1) * size[1] * 0.35
    upper = fissure_y > centre[1]
    cut = np.clip(((fissure_y - c.Y) if upper else (c.Y - fissure_y)) / c.edge + 0.5, 0, 1)
    return np.clip(shape * 1.4, 0, 1) * cut * c.side_mask(plan.side), centre


def _draw_pneumonia(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    region, _ = _lobar_region(c, plan, rng)
    texture = np.clip(0.75 + 0.35 * c.noise(rng, 0.03), 0, 1)
    c.layers.fill += (0.55 + 0.3 * plan.severity) * region * texture


def _draw_consolidation(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Dense and homogeneous, with dark branching air bronchograms inside.
    region, centre = _lobar_region(c, plan, rng)
    c.layers.fill += 0.95 * region
    hilum = np.array(c.geometry.hilum_left if plan.side == 0 else c.geometry.hilum_right)
    heading = float(np.arctan2(centre[1] - hilum[1], centre[0] - hilum[0]))
    # Bronchi enter the opacity from its hilar side and branch outwards.
    start = centre - 0.06 * np.array([np.cos(heading), np.sin(heading)])
    trunks = [Trunk((float(start[0]), float(start[1])), heading + rng.normal(0, 0.3), 0.05, 0.009)
              for _ in range(2)]
    bronchi = draw_branches(c.geometry.grid, trunks, rng, generations=2)
    c.layers.air += 0.3 * np.clip(bronchi, 0, 1) * region


def _draw_edema(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Bilateral perihilar "bat wing" haze fading towards the periphery, plus Kerley B lines.
    amount = 0.5 + 0.35 * plan.severity
    texture = np.clip(0.85 + 0.25 * c.noise(rng, 0.04), 0, 1.2)
    for hx, hy in (c.geometry.hilum_left, c.geometry.hilum_right):
        wing = np.exp(-(((c.X - hx) / 0.15) ** 2 + ((c.Y - hy) / 0.19) ** 2))
        c.layers.fill += amount * wing * texture
    for side in (0, 1):
        x0, x1, _, base = c.lung_box(side)
        wall = x0 if side == 0 else x1
        for _ in range(5):
            y = base - rng.uniform(0.03, 0.15)
            inward = 1.0 if side == 0 else -1.0
            start = wall + inward * 0.005
            on_line = np.clip((0.0035 - np.abs(c.Y - y)) / c.edge + 0.5, 0, 1)
            span = (inward * (c.X - start) > 0) & (inward * (c.X - start) < 0.05)
            c.layers.density += 0.12 * on_line * span * c.geometry.lung


def _draw_emphysema(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Hyperinflation, flat domes, lucency and pruning are anatomy changes; add apical bullae.
    for side in (0, 1):
        x0, x1, apex, _ = c.lung_box(side)
        centre = np.array([(x0 + x1) / 2 + rng.uniform(-0.05, 0.05), apex + rng.uniform(0.06, 0.14)])
        centre = c.inside_lung(centre, side, 0.05)
        radius = rng.uniform(0.035, 0.06)
        bulla = _soft_disk(c, centre, radius, 3 * c.edge)
        wall = np.clip(1 - np.abs(np.hypot(c.X - centre[0], c.Y - centre[1]) - radius) / (1.2 * c.edge), 0, 1)
        c.layers.air += 0.05 * bulla
        c.layers.suppress += bulla
        c.layers.density += 0.05 * wall


def _draw_fibrosis(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Coarse reticular (net-like) lines, worst at the periphery and the bases.
    texture = c.noise(rng, 0.02)
    lines = np.clip(1.0 - np.abs(texture) / 0.35, 0, 1) ** 2
    depth = c.lung_depth()
    apex = c.geometry.lung_box_left[2]
    base = max(c.geometry.lung_box_left[3], c.geometry.lung_box_right[3])
    basal = np.clip((c.Y - (apex + 0.35 * (base - apex))) / (0.3 * (base - apex)), 0, 1)
    peripheral = np.exp(-depth / 0.07) * (depth > 0)
    weight = basal * (0.4 + 0.6 * peripheral) * c.geometry.lung
    c.layers.density += (0.2 + 0.12 * plan.severity) * lines * weight
    c.layers.fill += 0.3 * weight


def _draw_hernia(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # Hiatus hernia: a round retrocardiac mass just above the diaphragm holding a gas bubble,
    # often with an air-fluid level.
    bottom = c.geometry.heart_box[3]
    centre = np.array([0.5 + rng.uniform(0.0, 0.03), bottom - rng.uniform(0.05, 0.08)])
    radius = 0.06 + 0.025 * plan.severity
    sac = _soft_disk(c, centre, radius, c.edge)
    gas_level = centre[1] + rng.uniform(-0.1, 0.35) * radius
    gas = _soft_disk(c, centre, radius * 0.8, c.edge) * np.clip((gas_level - c.Y) / c.edge + 0.5, 0, 1)
    rim = np.clip(1 - np.abs(np.hypot(c.X - centre[0], c.Y - centre[1]) - radius) / (1.5 * c.edge), 0, 1)
    c.layers.density += 0.05 * sac + 0.02 * rim
    c.layers.air += 0.3 * gas


def _draw_pleural_thickening(c: _Canvas, plan: FindingPlan, rng: np.random.Generator) -> None:
    # A band of soft tissue lining the lateral chest wall and capping the apex.
    depth = c.lung_depth()
    sides = (0, 1) if plan.bilateral else (plan.side,)
    thickness = (0.022 + 0.015 * plan.severity) * (1.0 + 0.3 * c.noise(rng, 0.06))
    for side in sides:
        x0, x1, apex, base = c.lung_box(side)
        lateral = np.clip((np.abs(c.X - 0.5) - 0.45 * (x1 - x0)) / 0.03, 0, 1)
        apical = np.clip((apex + 0.12 - c.Y) / 0.03, 0, 1)
        extent = np.clip((base - 0.08 - c.Y) / 0.05, 0, 1)
        band = np.clip((thickness - depth) / c.edge + 0.5, 0, 1) * (depth > 0)
        c.layers.fill += band * np.maximum(lateral * extent, apical) * c.side_mask(side)


# Drawing order: diffuse and basal processes first, focal lesions last, so a focal lesion is
# placed in lung that is still aerated and stays visible.
_DRAWERS: dict[str, Callable[[_Canvas, FindingPlan, np.random.Generator], None]] = {
    "Cardiomegaly": lambda c, plan, rng: None,  # the heart itself is enlarged in anatomy_changes
    "Emphysema": _draw_emphysema,
    "Edema": _draw_edema,
    "Effusion": _draw_effusion,
    "Pneumothorax": _draw_pneumothorax,
    "Fibrosis": _draw_fibrosis,
    "Pleural_Thickening": _draw_pleural_thickening,
    "Hernia": _draw_hernia,
    "Consolidation": _draw_consolidation,
    "Pneumonia": _draw_pneumonia,
    "Infiltration": _draw_infiltration,
    "Atelectasis": _draw_atelectasis,
    "Mass": _draw_mass,
    "Nodule": _draw_nodule,
}
assert set(_DRAWERS) == set(NIH_FINDINGS), "every NIH finding needs exactly one drawer"


def draw_findings(plans: list[FindingPlan], geometry: ChestGeometry) -> FindingLayers:
    canvas = _Canvas(geometry, FindingLayers.empty(geometry.lung.shape))
    for plan in sorted(plans, key=lambda p: list(_DRAWERS).index(p.name)):
        _DRAWERS[plan.name](canvas, plan, np.random.default_rng(plan.seed))
    layers = canvas.layers
    np.clip(layers.fill, 0.0, 1.0, out=layers.fill)
    np.clip(layers.suppress, 0.0, 1.0, out=layers.suppress)
    return layers

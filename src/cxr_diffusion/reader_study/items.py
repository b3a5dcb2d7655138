"""The images of a reader study: real test images and each branch's generations, picked with a seed.

Each origin (a test image's id) is used at most once in a study: a clip_vision or ELIXR generation is
conditioned on its real image's embedding and can resemble it, so a reader who saw both side by side
could tell them apart by comparison rather than by judging realism.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cxr_diffusion.data.shards import PreparedImages
from cxr_diffusion.diffusion.grid import tensor_to_pil
from cxr_diffusion.reader_study.errors import ReaderStudyError
from cxr_diffusion.reader_study.labels import REAL
from cxr_diffusion.safe_text import visible_text


@dataclass(frozen=True)
class StudyItem:
    """One image to show: its pixels and the truth that goes only into the answer key."""

    pixels: np.ndarray  # 2-D uint8 grayscale, any size
    source: str  # REAL or a branch name ("clip_text", "clip_vision", "elixr")
    labels: tuple[str, ...]  # class names: true labels (real) or the requested ones (generated)
    origin_id: str  # the dataset's image id (a generation carries its source image's id)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != np.uint8 or 0 in self.pixels.shape:
            raise ReaderStudyError(f"image {self.origin_id!r} ({self.source}): pixels must be a non-empty 2-D "
                                   f"uint8 array, got shape {self.pixels.shape} of {self.pixels.dtype}")


def item_from_example(example: dict, classes: Sequence[str], source: str) -> StudyItem:
    """A ``PreparedImages`` example (pixel_values in [-1, 1], 0/1 labels per class) as a study item."""
    labels = tuple(name for name, value in zip(classes, example["labels"].tolist()) if value >= 0.5)
    pixels = np.asarray(tensor_to_pil(example["pixel_values"]))
    return StudyItem(pixels=pixels, source=source, labels=labels, origin_id=str(example["image_index"]))


def source_counts(branches: Sequence[str], count: int, real_fraction: float | None) -> dict[str, int]:
    """How many items each source gets: equal shares by default, or ``real_fraction`` real and the rest
    shared equally by the branches. Remainders go to the sources listed first (real, then branches)."""
    if not branches:
        raise ReaderStudyError("a reader study needs generated images of at least one branch; none were given")
    if count < 2:
        raise ReaderStudyError(f"a reader study needs at least 2 items, got count={count}")
    if real_fraction is None:
        shares = _split(count, 1 + len(branches))
        return dict(zip([REAL, *branches], shares))
    if not 0.0 < real_fraction < 1.0:
        raise ReaderStudyError(f"real_fraction must be between 0 and 1 (exclusive), got {real_fraction}")
    real = min(max(round(count * real_fraction), 1), count - 1)
    return {REAL: real, **dict(zip(branches, _split(count - real, len(branches))))}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def select_items(real: PreparedImages, generated: Mapping[str, PreparedImages], count: int,
                 real_fraction: float | None, seed: int) -> list[StudyItem]:
    """``count`` items drawn with ``seed``: real test images and generations of each branch (see
    ``source_counts``), no two from the same origin. Listed by source; the kit shuffles them."""
    counts = source_counts(list(generated), count, real_fraction)
    for branch, images in generated.items():
        if tuple(images.classes) != tuple(real.classes):
            raise ReaderStudyError(f"{branch} images have classes {list(images.classes)}, the real ones "
                                   f"{list(real.classes)}; sample them again from the same prepared data")
        outside = sorted(set(images.image_indices) - set(real.image_indices))
        if outside:  # each generation is named after the test image whose condition it used
            raise ReaderStudyError(f"{branch}: {len(outside)} generation(s) named after no image of the real test "
                                   f"split (first: {visible_text(outside[0], 80)}); sample them again from the same "
                                   f"prepared data (dvc repro -f sample@{branch})")
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    picked: dict[str, list[int]] = {}
    # Branches first: their generations cover only the first sample.count test images, the real split all.
    for source in [*generated, REAL]:
        images = real if source == REAL else generated[source]
        chosen = []
        for index in rng.permutation(len(images)).tolist():
            if len(chosen) == counts[source]:
                break
            if images.image_indices[index] not in used:
                chosen.append(index)
                used.add(images.image_indices[index])
        if len(chosen) < counts[source]:
            raise ReaderStudyError(
                f"{source}: {counts[source]} images wanted but only {len(chosen)} of its {len(images)} come from "
                f"an image no other source already uses (each origin is shown once); lower reader_study.count "
                f"or raise sample.count (the generations come from its first test images)")
        picked[source] = chosen
    items = [item_from_example((real if source == REAL else generated[source])[index], real.classes, source)
             for source in [REAL, *generated] for index in picked[source]]
    for item in items:
        if item.source != REAL and item.pixels.min() == item.pixels.max():
            raise ReaderStudyError(f"{item.source}: its generation for {item.origin_id} is one flat gray level "
                                   f"({int(item.pixels[0, 0])}), the output of a broken model, not an image to "
                                   f"judge; check the model and its samples (dvc repro sample@{item.source})")
    return items

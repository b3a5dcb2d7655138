"""Figures people can judge: small generations enlarged without smoothing, rows and columns labelled."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr_diffusion.sampling.figures import (
    LABEL_WIDTH, MIN_WIDTH, caption, one_row_per_finding, originals_vs_generated,
)


def tiles(count: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(count)]


def test_small_tiles_are_enlarged_by_a_whole_factor_with_every_pixel_a_sharp_block():
    originals, generated = tiles(6), tiles(6, seed=1)
    figure = originals_vs_generated(originals, generated, ["Effusion|Infiltration"] * 6)
    assert figure.width >= MIN_WIDTH and figure.mode == "L"
    pixels = np.asarray(figure)
    block = pixels[4:4 + 128, LABEL_WIDTH:LABEL_WIDTH + 128]  # the first real tile, enlarged 4x
    expected = np.kron(np.asarray(originals[0]), np.ones((4, 4), dtype=np.uint8))
    np.testing.assert_array_equal(block, expected)  # nearest neighbour: no value that was not in the tile


def test_a_figure_of_one_tiny_column_is_still_at_least_512_px_wide():
    figure = one_row_per_finding(tiles(2, size=8), ["Effusion", "No Finding"])
    assert figure.width >= MIN_WIDTH
    assert figure.height >= 2 * 128  # square tiles grow with the width


def test_large_tiles_are_kept_at_their_own_size():
    originals = tiles(2, size=512)
    figure = originals_vs_generated(originals, tiles(2, size=512, seed=1), ["No Finding", "Mass"])
    assert figure.width == LABEL_WIDTH + 2 * (512 + 4) + 4


def test_labels_are_drawn_in_the_label_column_and_under_each_column():
    figure = np.asarray(originals_vs_generated(tiles(3), tiles(3, seed=1), ["Effusion", "Mass", "No Finding"]))
    assert (figure[:128, :LABEL_WIDTH] < 128).any()  # "real" drawn in ink
    below = figure[4 + 2 * (128 + 4):4 + 2 * (128 + 4) + 16, LABEL_WIDTH:]
    assert (below < 128).any()  # the findings captions


def test_a_caption_lists_the_nih_findings():
    assert caption("Effusion|Infiltration") == "Effusion, Infiltration" and caption("") == "-"

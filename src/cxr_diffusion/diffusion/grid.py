"""Image grids for people to look at (sample grids, original vs generated)."""

from __future__ import annotations

import math

import torch
from PIL import Image


def tensor_to_pil(pixel_values: torch.Tensor) -> Image.Image:
    """A (channels, H, W) image in [-1, 1] (replicated grayscale) as an 8-bit grayscale PIL image."""
    return Image.fromarray(((pixel_values.mean(0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def image_grid(images: list[Image.Image], rows: int | None = None, pad: int = 2) -> Image.Image:
    """Tile same-sized images row-major into one grayscale PNG-ready image, with thin black gutters."""
    if not images:
        return Image.new("L", (1, 1))
    rows = rows or int(math.sqrt(len(images)))
    columns = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("L", (columns * (width + pad) + pad, rows * (height + pad) + pad))
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid.paste(image.convert("L"), (pad + column * (width + pad), pad + row * (height + pad)))
    return grid

"""Figures for people: originals beside generations, and one row per finding, large enough to judge.

Small images (the default trains at 32 px) are enlarged by a whole factor with nearest-neighbour resampling,
so every pixel the model made is shown as a sharp block and nothing is smoothed in or out; a figure is at
least ``MIN_WIDTH`` pixels wide. Each row says what it holds (``real`` or ``generated``, or the finding its
prompt asked for), and each column of an originals-vs-generations figure is captioned with the findings
of its source image: the labels the generation was conditioned on, directly (text) or through that image
(vision, ELIXR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # px: smaller tiles are enlarged by the smallest whole factor that reaches this
MIN_WIDTH = 512  # px: the narrowest figure written
GUTTER = 4
FONT_SIZE = 14
LINE = FONT_SIZE + 4
LABEL_WIDTH = 150  # the row-label column
INK, PAPER, RULE = 0, 255, 200


@dataclass(frozen=True)
class Row:
    label: str
    tiles: list[Image.Image]


@dataclass(frozen=True)
class Block:
    """Rows of tiles in the same columns, and an optional caption under each column."""

    rows: list[Row]
    captions: list[str] | None = None


def originals_vs_generated(originals: list[Image.Image], generated: list[Image.Image], findings: list[str],
                           per_row: int = 6) -> Image.Image:
    """Blocks of ``per_row`` columns: the real image above its generation, captioned with its findings."""
    blocks = [Block([Row("real", originals[start:start + per_row]), Row("generated", generated[start:start + per_row])],
                    [caption(labels) for labels in findings[start:start + per_row]])
              for start in range(0, len(originals), per_row)]
    return labelled_figure(blocks)


def one_row_per_finding(images: list[Image.Image], findings: list[str]) -> Image.Image:
    """``images`` row-major, an equal share per finding, each row labelled with the finding its prompt asked for."""
    per_row = len(images) // max(len(findings), 1)
    return labelled_figure([Block([Row(caption(name), images[i * per_row:(i + 1) * per_row])
                                   for i, name in enumerate(findings)])])


def caption(labels: str) -> str:
    """NIH's "Effusion|Infiltration" as "Effusion, Infiltration"."""
    return ", ".join(part for part in str(labels).split("|") if part) or "-"


def labelled_figure(blocks: list[Block]) -> Image.Image:
    """One grayscale image: every block's rows of enlarged tiles behind their labels, captions below."""
    tiles = [tile for block in blocks for row in block.rows for tile in row.tiles]
    if not tiles:
        return Image.new("L", (MIN_WIDTH, LINE), PAPER)
    tile_width, tile_height = tiles[0].size
    factor = max(1, math.ceil(MIN_TILE / max(1, min(tile_width, tile_height))))
    columns = max(len(row.tiles) for block in blocks for row in block.rows)
    tiles_width = MIN_WIDTH - LABEL_WIDTH - (columns + 1) * GUTTER  # what the tiles must fill to reach MIN_WIDTH
    factor = max(factor, math.ceil(tiles_width / (columns * tile_width)))
    cell_width, cell_height = tile_width * factor, tile_height * factor
    font = _font()
    caption_lines = [[_wrapped(text, cell_width, font) for text in block.captions or []] for block in blocks]
    caption_heights = [max((len(lines) for lines in captions), default=0) * LINE for captions in caption_lines]
    width = LABEL_WIDTH + columns * (cell_width + GUTTER) + GUTTER
    height = sum(len(block.rows) * (cell_height + GUTTER) + caption + 2 * GUTTER
                 for block, caption in zip(blocks, caption_heights)) + GUTTER
    figure = Image.new("L", (width, height), PAPER)
    draw = ImageDraw.Draw(figure)
    y = GUTTER
    for block, captions, caption_height in zip(blocks, caption_lines, caption_heights):
        for row in block.rows:
            for line_number, text in enumerate(_wrapped(row.label, LABEL_WIDTH - 2 * GUTTER, font)):
                draw.text((GUTTER, y + line_number * LINE), text, fill=INK, font=font)
            for column, tile in enumerate(row.tiles):
                enlarged = tile.convert("L").resize((cell_width, cell_height), Image.Resampling.NEAREST)
                figure.paste(enlarged, (LABEL_WIDTH + column * (cell_width + GUTTER), y))
            y += cell_height + GUTTER
        for column, lines in enumerate(captions):
            for line_number, text in enumerate(lines):
                draw.text((LABEL_WIDTH + column * (cell_width + GUTTER), y + line_number * LINE), text, fill=INK,
                          font=font)
        y += caption_height + GUTTER
        draw.line([(GUTTER, y), (width - GUTTER, y)], fill=RULE)
        y += GUTTER
    return figure


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow's built-in scalable font (FreeType)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrapped(text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a longer word is cut)."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        while font.getlength(word) > width and len(word) > 1:
            cut = max(1, int(len(word) * width / font.getlength(word)) - 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines

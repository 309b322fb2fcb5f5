"""Grids with legends, as AUTOMATIC1111's `image_grid` and `draw_grid_annotations` draw them (torch-free, PIL):
the X/Y/Z plot's axes and the Prompt matrix's parts.

``layout_grid(images, rows)``
    Images in a grid of `rows` rows; each cell is as large as the largest image, smaller ones are centred.
``draw_grid_annotations(grid, cell_w, cell_h, hor_texts, ver_texts, margin=0)``
    The grid with a band of column labels above it and a column of row labels at its left, `margin` pixels
    between the cells. Each label is a list of `GridAnnotation` lines; inactive lines are grey and struck
    through (A1111's prompt matrix uses them). Text is wrapped to the width it has and shrunk when a word is wider.
``combination_labels(parts)``
    The Prompt matrix's legends: which variable parts each column and row has.

The font is PIL's built-in default font, at a size that scales with the cells ((width + height) / 25, as A1111,
at least 10 pixels);
no font file is read or downloaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_ACTIVE = (0, 0, 0)
TEXT_INACTIVE = (153, 153, 153)
MIN_FONT_SIZE = 10  # A1111's (w + h) / 25 is unreadable for small cells; labels still shrink to fit their width


@dataclass
class GridAnnotation:
    text: str = ""
    is_active: bool = True
    size: tuple[int, int] = field(default=(0, 0), repr=False)
    allowed_width: int = field(default=0, repr=False)


@lru_cache(maxsize=64)
def get_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's default font at `size` pixels (a scalable font with FreeType; the fixed bitmap font without)."""
    try:
        return ImageFont.load_default(size=max(1, int(size)))
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def layout_grid(images: list[Image.Image], rows: int, background=BACKGROUND) -> Image.Image:
    """`images` in `rows` rows (A1111's image_grid with explicit rows): cells the size of the largest image."""
    if not images:
        raise ValueError("a grid needs at least one image")
    rows = max(1, min(rows, len(images)))
    cols = -(-len(images) // rows)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), background)
    for i, im in enumerate(images):
        dx, dy = (w - im.width) // 2, (h - im.height) // 2
        grid.paste(im.convert("RGB"), (i % cols * w + dx, i // cols * h + dy))
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, line_length: int) -> list[str]:
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=font) <= line_length:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def draw_grid_annotations(grid: Image.Image, cell_w: int, cell_h: int, hor_texts: list[list[GridAnnotation]],
                          ver_texts: list[list[GridAnnotation]], margin: int = 0) -> Image.Image:
    """A new image: `grid` (cells of cell_w x cell_h) with column labels above, row labels left, margins between.

    `hor_texts` has one entry per column, `ver_texts` one per row. With no row text at all there is no left band;
    with no column text no top band.
    """
    cols, rows = grid.width // cell_w, grid.height // cell_h
    if cols != len(hor_texts):
        raise ValueError(f"bad number of horizontal texts: {len(hor_texts)}; must be {cols}")
    if rows != len(ver_texts):
        raise ValueError(f"bad number of vertical texts: {len(ver_texts)}; must be {rows}")

    fontsize = max(MIN_FONT_SIZE, (cell_w + cell_h) // 25)
    line_spacing = fontsize // 2
    font = get_font(fontsize)
    has_row_text = any(line.text for lines in ver_texts for line in lines)
    pad_left = cell_w * 3 // 4 if has_row_text else 0

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    hor = [_prepare(measure, lines, font, cell_w) for lines in hor_texts]
    ver = [_prepare(measure, lines, font, pad_left) for lines in ver_texts]

    hor_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing for lines in hor]
    ver_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing * len(lines) for lines in ver]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + line_spacing * 2

    result = Image.new("RGB", (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1)),
                       BACKGROUND)
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((cell_w * col, cell_h * row, cell_w * (col + 1), cell_h * (row + 1)))
            result.paste(cell, (pad_left + (cell_w + margin) * col, pad_top + (cell_h + margin) * row))

    draw = ImageDraw.Draw(result)
    for col in range(cols):
        x = pad_left + (cell_w + margin) * col + cell_w / 2
        y = pad_top / 2 - hor_heights[col] / 2
        _draw_lines(draw, x, y, hor[col], fontsize, line_spacing)
    for row in range(rows):
        x = pad_left / 2
        y = pad_top + (cell_h + margin) * row + cell_h / 2 - ver_heights[row] / 2
        _draw_lines(draw, x, y, ver[row], fontsize, line_spacing)
    return result


def _prepare(measure: ImageDraw.ImageDraw, lines: list[GridAnnotation], font, allowed_width: int) -> list[GridAnnotation]:
    """The label's lines wrapped to `allowed_width`, each with its measured size."""
    out = []
    for line in lines:
        for text in _wrap(measure, line.text, font, allowed_width):
            wrapped = GridAnnotation(text, line.is_active)
            left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
            wrapped.size = (right - left, bottom - top)
            wrapped.allowed_width = allowed_width
            out.append(wrapped)
    return out


def _draw_lines(draw: ImageDraw.ImageDraw, x: float, y: float, lines: list[GridAnnotation], fontsize: int,
                line_spacing: int) -> None:
    for line in lines:
        size, font = fontsize, get_font(fontsize)
        while size > 1 and draw.textlength(line.text, font=font) > line.allowed_width:
            size -= 1
            font = get_font(size)
        color = TEXT_ACTIVE if line.is_active else TEXT_INACTIVE
        draw.multiline_text((x, y + line.size[1] / 2), line.text, font=font, fill=color, anchor="mm", align="center")
        if not line.is_active:
            draw.line((x - line.size[0] // 2, y + line.size[1] // 2, x + line.size[0] // 2, y + line.size[1] // 2),
                      fill=color, width=4)
        y += line.size[1] + line_spacing


def combination_labels(parts: list[str]) -> tuple[list[list[GridAnnotation]], list[list[GridAnnotation]]]:
    """A1111's prompt-matrix legends for the variable `parts`: the first half labels the columns, the rest the rows;
    cell (row r, column c) holds part i when bit i of its combination is set (inactive parts are struck through)."""
    boundary = math.ceil(len(parts) / 2)
    horizontal, vertical = parts[:boundary], parts[boundary:]
    columns = [[GridAnnotation(text, pos & (1 << i) != 0) for i, text in enumerate(horizontal)]
               for pos in range(1 << len(horizontal))]
    rows = [[GridAnnotation(text, pos & (1 << i) != 0) for i, text in enumerate(vertical)]
            for pos in range(1 << len(vertical))]
    return columns, rows

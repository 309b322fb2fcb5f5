"""Grids with legends (A1111's annotated grids, as Prompt matrix and X/Y/Z plot draw them), torch-free, with PIL.

`annotated_grid` lays out a grid of equal cells with optional margins between them, writes each column's labels
above it and each row's labels to its left. A label is active (black) or inactive (grey, struck through), as
A1111 shows which prompt parts a cell has.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

ACTIVE = (0, 0, 0)
INACTIVE = (153, 153, 153)


@dataclass(frozen=True)
class GridLabel:
    text: str
    active: bool = True


@lru_cache(maxsize=16)
def legend_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans when the system has it, else Pillow's built-in scalable font."""
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> list[str]:
    """Lines of `text` that fit in `max_width` pixels (long words are cut)."""
    if not text:
        return [""]
    average = max(1.0, draw.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    width = max(1, int(max_width / average))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        lines.extend(textwrap.wrap(paragraph, width=width, break_long_words=True) or [""])
    return lines


def _block(draw, labels: list[GridLabel], font, max_width: int, spacing: int) -> list[tuple[str, bool]]:
    return [(line, label.active) for label in labels for line in _wrap(draw, label.text, font, max_width)]


def _draw_block(draw, lines: list[tuple[str, bool]], center_x: float, top: float, font, line_height: int) -> None:
    for i, (line, active) in enumerate(lines):
        width = draw.textlength(line, font=font)
        x, y = center_x - width / 2, top + i * line_height
        draw.text((x, y), line, font=font, fill=ACTIVE if active else INACTIVE)
        if not active and line:
            mid = y + line_height * 0.55
            draw.line((x, mid, x + width, mid), fill=INACTIVE, width=max(1, line_height // 12))


def annotated_grid(grid: Image.Image, cell_width: int, cell_height: int, column_labels: list[list[GridLabel]],
                   row_labels: list[list[GridLabel]], margin: int = 0) -> Image.Image:
    """`grid` (cells of `cell_width` x `cell_height`, as `backend.core.images.image_grid` lays them out) redrawn on
    white with `margin` pixels between cells, `column_labels[c]` above column c and `row_labels[r]` left of row r.
    Empty label lists leave no room for legends on that side."""
    cols, rows = grid.width // cell_width, grid.height // cell_height
    font_size = max(10, (cell_width + cell_height) // 25)
    font = legend_font(font_size)
    line_height = int(font_size * 1.25)
    spacing = font_size // 2
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    has_rows = any(label.text for labels in row_labels for label in labels)
    has_cols = any(label.text for labels in column_labels for label in labels)
    pad_left = cell_width * 3 // 4 if has_rows else 0
    col_blocks = [_block(scratch, labels, font, cell_width, spacing) for labels in column_labels[:cols]]
    row_blocks = [_block(scratch, labels, font, max(1, pad_left - spacing), spacing) for labels in row_labels[:rows]]
    pad_top = (max((len(b) for b in col_blocks), default=0) * line_height + spacing * 2) if has_cols else 0

    result = Image.new("RGB", (grid.width + pad_left + margin * (cols - 1),
                               grid.height + pad_top + margin * (rows - 1)), "white")
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((col * cell_width, row * cell_height, (col + 1) * cell_width, (row + 1) * cell_height))
            result.paste(cell, (pad_left + col * (cell_width + margin), pad_top + row * (cell_height + margin)))
    draw = ImageDraw.Draw(result)
    if has_cols:
        for col, lines in enumerate(col_blocks):
            center = pad_left + col * (cell_width + margin) + cell_width / 2
            top = pad_top / 2 - len(lines) * line_height / 2
            _draw_block(draw, lines, center, top, font, line_height)
    if has_rows:
        for row, lines in enumerate(row_blocks):
            center_y = pad_top + row * (cell_height + margin) + cell_height / 2
            _draw_block(draw, lines, pad_left / 2, center_y - len(lines) * line_height / 2, font, line_height)
    return result


def combination_labels(parts: list[str]) -> tuple[list[list[GridLabel]], list[list[GridLabel]]]:
    """A1111's prompt-matrix legends for the variable `parts`: the first half labels the columns, the rest the rows;
    cell (row r, column c) holds part i when bit i of its combination is set."""
    boundary = math.ceil(len(parts) / 2)
    horizontal, vertical = parts[:boundary], parts[boundary:]
    columns = [[GridLabel(text, pos & (1 << i) != 0) for i, text in enumerate(horizontal)]
               for pos in range(1 << len(horizontal))]
    rows = [[GridLabel(text, pos & (1 << i) != 0) for i, text in enumerate(vertical)]
            for pos in range(1 << len(vertical))]
    return columns, rows

"""Patch-size maps: images with their adaptive patches coloured by size, laid out on one sheet
with token counts and a legend.

Base-size patches show the photo as it is, without grid lines, so the content stays readable.
Coarse patches show the photo as a duotone in their size's colour, outlined one pixel wide: the
photo's brightness only picks a shade between a dark and a light version of the colour, so each
size keeps its hue over black space, white walls and the grey letterbox padding alike.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .layout import PatchLayout
from .outputs import atomic_write

__all__ = ["COARSE_COLORS", "PICTURE_SUFFIXES", "PatchMap", "patch_map", "patch_map_sheet", "picture_formats", "save_picture"]

# Colours of the coarse patch sizes (2x, 4x, 8x, 16x the base patch): hues far apart that keep
# their identity from dark to light (no yellow or orange, which turn olive or brown when dark).
COARSE_COLORS = ((20, 120, 255), (215, 40, 185), (20, 170, 70), (225, 45, 45))
DUOTONE_DARK, DUOTONE_LIGHT = 0.6, 0.45  # darkest shade: colour x 0.6; lightest: 45% colour, 55% white
TILE_GAP = 10  # px between tiles and around the sheet
FONT_SIZE = 14
LINE_HEIGHT = 19
SWATCH = 13


@dataclass
class PatchMap:
    """One image's patch map.

    Attributes:
        name: image name, shown in the caption.
        picture: the map as a PIL image, ``size x size`` for a square canvas.
        counts: ``{patch side in px: tokens of that size}`` for every size of the schedule.
        dense_tokens: tokens of the dense model (base-size cells of the canvas).
    """

    name: str
    picture: object
    counts: dict[int, int]
    dense_tokens: int

    @property
    def tokens(self) -> int:
        return sum(self.counts.values())


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as err:
        raise ImportError("drawing patch maps needs pillow: pip install 'apt-dense[demo]'") from err
    return Image, ImageDraw, ImageFont


def patch_map(
    image: torch.Tensor, layout: PatchLayout, index: int, patch_sizes: Sequence[int], name: str = "", size: int = 320
) -> PatchMap:
    """Draw image ``index`` of ``layout`` at display size.

    Args:
        image: ``(3, H, W)`` raw 0..255 pixels the layout was built from.
        layout: the batch's :class:`PatchLayout`; its ``cell_level`` / ``cell_to_token`` are read.
        patch_sizes: the schedule's sizes ``(p, 2p, 4p, ...)``; ``patch_sizes[0]`` is the cell size.
        size: width in px of the picture (height follows the aspect ratio). Lines are drawn at
            this size, so they stay one pixel wide.
    """
    Image, _, _ = _pil()
    levels = len(patch_sizes) - 1
    if levels > len(COARSE_COLORS):
        raise ValueError(f"patch maps have colours for {len(COARSE_COLORS)} coarse patch sizes, got "
                         f"{levels} ({list(patch_sizes[1:])}); use fewer patch sizes")
    _, h, w = image.shape
    out_w, out_h = size, max(1, round(size * h / w))
    rgb = image.permute(1, 2, 0).clamp(0, 255).round().byte().cpu().numpy()
    photo = np.asarray(Image.fromarray(rgb).resize((out_w, out_h), Image.Resampling.LANCZOS), dtype=np.float32)

    # Level and token of the cell under every output pixel (nearest cell).
    cell = patch_sizes[0]
    rows = np.minimum(np.arange(out_h) * h // out_h // cell, layout.grid_size[0] - 1)
    cols = np.minimum(np.arange(out_w) * w // out_w // cell, layout.grid_size[1] - 1)
    level = layout.cell_level[index].cpu().numpy()[np.ix_(rows, cols)]
    token = layout.cell_to_token[index].cpu().numpy()[np.ix_(rows, cols)]

    # Coarse patches as a duotone of the photo in their colour: the photo's brightness picks a
    # shade between a dark and a light version of the colour, so the content stays visible and
    # the hue never reaches black or white.
    palette = np.array(((0, 0, 0),) + COARSE_COLORS[:levels], dtype=np.float32)
    fill = palette[level]
    gray = (photo @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0)[..., None]
    dark, light = DUOTONE_DARK * fill, DUOTONE_LIGHT * fill + (1 - DUOTONE_LIGHT) * 255.0
    coarse = level > 0
    out = np.where(coarse[..., None], dark + (light - dark) * gray, photo)

    # One-pixel outlines between patches, drawn on the coarse side only, in a darker shade of it.
    edge = np.zeros_like(coarse)
    for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        differs = token[a] != token[b]
        edge[a] |= differs & coarse[a]
        edge[b] |= differs & coarse[b] & ~coarse[a]
    out[edge] *= 0.65

    counts = np.bincount(layout.token_level[layout.token_image == index].cpu().numpy(), minlength=levels + 1)
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    return PatchMap(name, picture, dict(zip(patch_sizes, counts.tolist())), layout.grid_size[0] * layout.grid_size[1])


# Suffixes of the picture files the tools write (sheets, generated images), where PIL can save them.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def picture_formats() -> dict[str, str]:
    """``{suffix: PIL format}`` for the :data:`PICTURE_SUFFIXES` this PIL build can write."""
    Image, _, _ = _pil()
    Image.init()
    registered = Image.registered_extensions()
    return {suffix: registered[suffix] for suffix in PICTURE_SUFFIXES if registered.get(suffix) in Image.SAVE}


def save_picture(picture, path: str | os.PathLike, **options) -> None:
    """Write a PIL image to ``path`` whole or not at all, in the format its suffix names
    (``options``: the format's, e.g. ``quality=95`` for JPEG)."""
    path = Path(path)
    with atomic_write(path) as f:
        picture.save(f, format=picture_formats()[path.suffix.lower()], **options)


def _font(size: int):
    _, _, ImageFont = _pil()
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only its small fixed-size bitmap font
        return ImageFont.load_default()


def _swatch(draw, x: int, y: int, color: tuple[int, int, int] | None) -> None:
    """A filled square, or an outlined empty one for base patches (``color`` None)."""
    box = [x, y, x + SWATCH - 1, y + SWATCH - 1]
    if color is None:
        draw.rectangle(box, fill=(255, 255, 255), outline=(90, 90, 90))
    else:
        draw.rectangle(box, fill=color, outline=tuple(int(0.65 * c) for c in color))


_NO_SWATCH = "no swatch"


def _flow(draw, items: Sequence[tuple[object, str]], font, width: int) -> list[list[tuple[object, str, int]]]:
    """Legend items ``(swatch colour, label)`` laid out left to right and wrapped to ``width``:
    rows of ``(colour, label, x)``. Items whose colour is ``_NO_SWATCH`` are plain text."""
    rows: list[list[tuple[object, str, int]]] = [[]]
    x = TILE_GAP
    for color, label in items:
        item_w = round(draw.textlength(label, font=font)) + 16 + (0 if color is _NO_SWATCH else SWATCH + 4)
        if rows[-1] and x + item_w > width:
            rows.append([])
            x = TILE_GAP
        rows[-1].append((color, label, x))
        x += item_w
    return rows


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines that fit ``width`` px (a single long word stays whole)."""
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines[-1] else word
        if lines[-1] and draw.textlength(candidate, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def _fit(draw, name: str, rest: str, font, width: int) -> str:
    """``name + rest``, the name shortened with an ellipsis until the text fits ``width`` px."""
    text = name + rest
    while len(name) > 1 and draw.textlength(text, font=font) > width:
        name = name[:-1]
        text = name + "…" + rest
    return text


def patch_map_sheet(maps: Sequence[PatchMap], columns: int, title: str | None = None, notes: Sequence[str] = ()):
    """Patch maps in a grid, each captioned with its token counts, above a legend.

    Each caption reads ``name: kept / dense tokens (percent)`` and, below it, the tokens of each
    patch size next to that size's colour. The legend names the colour of every patch size,
    then ``notes`` (e.g. what the grey letterbox band is).

    Returns:
        a PIL RGB image ``TILE_GAP + columns * (tile + TILE_GAP)`` px wide (``tile``: the width of
        the pictures, which must all be the same size); the legend fills its bottom rows of
        ``LINE_HEIGHT`` px, above a ``TILE_GAP`` margin.
    """
    Image, ImageDraw, _ = _pil()
    if not maps:
        raise ValueError("no patch maps to lay out")
    tile_w, tile_h = maps[0].picture.size
    if any(m.picture.size != (tile_w, tile_h) for m in maps):
        raise ValueError("patch maps on one sheet must have one size; draw them with the same size and canvas")
    columns = max(1, min(columns, len(maps)))
    grid_rows = -(-len(maps) // columns)
    sizes = list(maps[0].counts)
    font, small = _font(FONT_SIZE), _font(FONT_SIZE - 1)
    width = TILE_GAP + columns * (tile_w + TILE_GAP)

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(None, f"{sizes[0]} px (photo as is)")]
    items += [(COARSE_COLORS[k], f"{s} px") for k, s in enumerate(sizes[1:])]
    items.append((_NO_SWATCH, f"one token per patch; dense: one per {sizes[0]} px cell ({maps[0].dense_tokens})"))
    items += [(_NO_SWATCH, note) for note in notes]
    legend_rows = _flow(measure, items, small, width)
    title_lines = _wrap(measure, title, font, width - 2 * TILE_GAP) if title else []
    title_h = len(title_lines) * LINE_HEIGHT + 6 if title else 0
    caption_h = 2 * LINE_HEIGHT + 2
    cell_h = caption_h + tile_h + TILE_GAP
    legend_top = TILE_GAP + title_h + grid_rows * cell_h
    height = legend_top + len(legend_rows) * LINE_HEIGHT + TILE_GAP

    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(title_lines):
        draw.text((TILE_GAP, TILE_GAP + j * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    for i, m in enumerate(maps):
        r, c = divmod(i, columns)
        x, y = TILE_GAP + c * (tile_w + TILE_GAP), TILE_GAP + title_h + r * cell_h
        rest = f": {m.tokens} / {m.dense_tokens} tokens ({m.tokens / m.dense_tokens:.0%})"
        draw.text((x, y), _fit(draw, m.name, rest, font, tile_w), fill=(0, 0, 0), font=font)
        cx = x
        for k, count in enumerate(m.counts.values()):
            _swatch(draw, cx, y + LINE_HEIGHT + 3, COARSE_COLORS[k - 1] if k else None)
            draw.text((cx + SWATCH + 4, y + LINE_HEIGHT + 1), str(count), fill=(60, 60, 60), font=small)
            cx += SWATCH + 16 + round(draw.textlength(str(count), font=small))
        sheet.paste(m.picture, (x, y + caption_h))
    for j, row in enumerate(legend_rows):
        y = legend_top + j * LINE_HEIGHT
        for color, label, x in row:
            if color is _NO_SWATCH:
                draw.text((x, y), label, fill=(60, 60, 60), font=small)
            else:
                _swatch(draw, x, y + 2, color)
                draw.text((x + SWATCH + 4, y), label, fill=(0, 0, 0), font=small)
    return sheet

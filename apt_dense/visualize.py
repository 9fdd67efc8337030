"""Patch-size maps drawn over images."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .layout import PatchLayout

__all__ = ["LEVEL_COLORS", "draw_patch_map", "image_grid"]

# base, 2x, 4x, 8x, 16x patches
LEVEL_COLORS = ((230, 57, 70), (255, 183, 3), (42, 157, 143), (69, 123, 157), (131, 56, 236))


def draw_patch_map(image: torch.Tensor, layout: PatchLayout, index: int, patch_size: int, alpha: float = 0.35):
    """A PIL image: ``image`` ``(3, H, W)`` raw 0..255 with every patch of image ``index`` of
    ``layout`` tinted by its size and outlined."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as err:
        raise ImportError("drawing patch maps needs pillow: pip install 'apt-dense[demo]'") from err
    rgb = image.permute(1, 2, 0).clamp(0, 255).byte().cpu().numpy()
    tint = np.zeros_like(rgb, dtype=np.float32)
    mine = layout.token_image == index
    cells = (layout.token_cell[mine] * patch_size).tolist()
    levels = layout.token_level[mine].tolist()
    for (r, c), k in zip(cells, levels):
        side = patch_size << k
        tint[r : r + side, c : c + side] = LEVEL_COLORS[min(k, len(LEVEL_COLORS) - 1)]
    blended = (rgb * (1 - alpha) + tint * alpha).astype(np.uint8)
    picture = Image.fromarray(blended)
    draw = ImageDraw.Draw(picture)
    for (r, c), k in zip(cells, levels):
        side = patch_size << k
        draw.rectangle([c, r, c + side - 1, r + side - 1], outline=(255, 255, 255))
    return picture


def image_grid(pictures: Sequence, columns: int, tile: int, captions: Sequence[str] | None = None):
    """Pictures resized to ``tile`` px wide, laid out in a grid with optional captions."""
    from PIL import Image, ImageDraw

    rows = -(-len(pictures) // columns)
    caption_h = 18 if captions else 0
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, columns)
        y = r * (tile + caption_h)
        sheet.paste(picture.resize((tile, tile)), (c * tile, y + caption_h))
        if captions:
            draw.text((c * tile + 4, y + 3), captions[i], fill=(0, 0, 0))
    return sheet

"""Stage 3: adaptive patch embedding and position embeddings per token.

A level-``k`` patch (side ``p 2^k``) is embedded as

    E(area_resize(x, p)) + detail(Down^k(E(sub-patches)))

with ``E`` the host's own patch embedding (``proj``, conv ``p x p`` stride ``p``), exact area
averaging for the resize, ``Down`` a learned 2x2 stride-2 conv applied ``k`` times, and
``detail`` a zero-initialised linear layer: at initialisation a large patch's token is its
resize-only embedding, so a pretrained ViT starts out unharmed.

Absolute position embeddings follow the same rule: a large patch takes the area mean of the
embeddings of the cells it covers (:func:`position_embeddings`). The pretrained grid is first
resized to the cells as the host does it: detectron2's ``get_abs_pos`` (to the padded grid), or
transformers' DINOv2 (:func:`dinov2_pos_grid`, to the image's own cells; padding cells repeat the
edge).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import PatchLayout

__all__ = [
    "AdaptivePatchEmbed", "position_embeddings", "grid_position_embeddings", "abs_pos_grid", "dinov2_pos_grid",
    "gather_level_maps",
]


def gather_level_maps(maps: list[torch.Tensor], layout: PatchLayout, shared: bool = False) -> torch.Tensor:
    """Pick every token's vector from per-level maps.

    Args:
        maps: ``maps[k]`` is ``(B, Hc / 2^k, Wc / 2^k, C)`` for ``k = 0..K``.
        shared: the maps are ``(1, ...)``, shared by all images (position embeddings). Said, not
            read from the shape: a traced batch size is a symbol that must not be compared to 1.
    Returns:
        ``(N, C)`` in token order.
    """
    table = torch.cat([m.flatten(0, 2) for m in maps])
    level = layout.token_level
    # Per-level offsets and sizes from Python ints: no small host-to-device copies (each would
    # stall a CUDA stream).
    offset = torch.zeros_like(level)
    for k in range(1, len(maps)):
        offset += (level >= k) * (maps[k - 1].shape[0] * maps[k - 1].shape[1] * maps[k - 1].shape[2])
    width = maps[0].shape[2] >> level
    height = maps[0].shape[1] >> level
    image = torch.zeros_like(layout.token_image) if shared else layout.token_image
    row, col = layout.token_cell[:, 0] >> level, layout.token_cell[:, 1] >> level
    return table[offset + (image * height + row) * width + col]


def abs_pos_grid(pos_embed: torch.Tensor, has_cls_token: bool, grid: tuple[int, int]) -> torch.Tensor:
    """The pretrained position grid as ``(1, Hc, Wc, C)``, resized bicubically only when its grid
    differs from the cell grid (detectron2's ``get_abs_pos``).

    Args:
        pos_embed: ``(1, [1 +] S*S, C)`` flattened square grid (ViTDet, MAE, EVA-02), or a
            ``(1, H, W, C)`` grid (Segment Anything's ``ImageEncoderViT``).
        has_cls_token: the flattened form leads with a cls entry (dropped here).
    """
    if pos_embed.dim() == 4:
        if has_cls_token:
            raise ValueError("a (1, H, W, C) position grid has no cls entry; pass has_cls_token=False")
        square = pos_embed
    else:
        if has_cls_token:
            pos_embed = pos_embed[:, 1:]
        side = math.isqrt(pos_embed.shape[1])
        if side * side != pos_embed.shape[1]:
            raise ValueError(f"position embedding with {pos_embed.shape[1]} entries is not a square grid")
        square = pos_embed.reshape(1, side, side, -1)
    if tuple(square.shape[1:3]) == tuple(grid):
        return square
    resized = F.interpolate(square.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def area_pooled_levels(grid: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """``(B, H, W, C)`` and its ``2^k x 2^k`` area means for ``k = 1..K``, all channels-last."""
    maps = [grid]
    x = grid.permute(0, 3, 1, 2)
    for _ in range(num_levels):
        x = F.avg_pool2d(x, 2)
        maps.append(x.permute(0, 2, 3, 1))
    return maps


def dinov2_pos_grid(pos_embed: torch.Tensor, grid: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """``(1, 1 + S*S, C) -> (1, Hc, Wc, C)`` as transformers' ``Dinov2Embeddings`` resizes its
    position embedding: the cls entry dropped, bicubic in float32 (``antialias``: as
    ``Dinov2WithRegistersEmbeddings``), unchanged when the grid is the pretrained ``S x S``."""
    cells = pos_embed[:, 1:]
    side = math.isqrt(cells.shape[1])
    if side * side != cells.shape[1]:
        raise ValueError(f"position embedding with {cells.shape[1]} cell entries is not a square grid")
    if (side, side) == tuple(grid):
        return cells.reshape(1, side, side, -1)
    square = cells.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    return resized.to(pos_embed.dtype).permute(0, 2, 3, 1)


def grid_position_embeddings(grid: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
    """``(N, C)`` position embedding of every token from a ``(1, h, w, C)`` grid of the image's
    cells: cells beyond it (the bottom/right padding up to the layout's grid) repeat its edge, then
    each token takes the area mean over its patch."""
    pad_h, pad_w = layout.grid_size[0] - grid.shape[1], layout.grid_size[1] - grid.shape[2]
    if pad_h or pad_w:
        grid = F.pad(grid.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h), mode="replicate").permute(0, 2, 3, 1)
    return gather_level_maps(area_pooled_levels(grid, 0 if layout.is_dense else layout.num_levels), layout, shared=True)


def position_embeddings(pos_embed: torch.Tensor, layout: PatchLayout, has_cls_entry: bool) -> torch.Tensor:
    """``(N, C)`` absolute position embedding of every token: the pretrained ``(1, [1 +] S*S, C)``
    grid resized to the cell grid, then area-averaged over each token's patch."""
    return grid_position_embeddings(abs_pos_grid(pos_embed, has_cls_entry, layout.grid_size), layout)


class AdaptivePatchEmbed(nn.Module):
    """Patch embedding for patches of ``p * 2^k`` pixels, ``k = 0..num_levels``.

    Keys: ``proj`` is the host's patch embedding (loads unchanged); ``downsample`` and
    ``detail`` are the APT layers (absent when ``num_levels == 0``).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, num_levels: int):
        """``num_levels``: coarse levels ``K``; the APT layers exist whenever ``K > 0``, also with
        adaptive patching off, so one checkpoint serves both."""
        super().__init__()
        self.patch_size = patch_size
        self.num_levels = num_levels
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        if num_levels > 0:
            self.downsample = nn.Conv2d(embed_dim, embed_dim, kernel_size=2, stride=2)
            self.detail = nn.Linear(embed_dim, embed_dim)
            self.reset_apt_parameters()

    def reset_apt_parameters(self) -> None:
        """Zero the detail layer: large patches embed as their resize-only embedding."""
        if self.num_levels > 0:
            nn.init.zeros_(self.detail.weight)
            nn.init.zeros_(self.detail.bias)

    def level_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Token candidates at every level: ``maps[k]`` is ``(B, Hc / 2^k, Wc / 2^k, C)``."""
        base = self.proj(images)
        maps = [base.permute(0, 2, 3, 1)]
        pooled, sub = images, base
        for _ in range(self.num_levels):
            pooled = F.avg_pool2d(pooled, 2)
            sub = self.downsample(sub)
            resized = self.proj(pooled).permute(0, 2, 3, 1)
            maps.append(resized + self.detail(sub.permute(0, 2, 3, 1)))
        return maps

    def forward(self, images: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """``(B, C_in, H, W) -> (N, C)`` tokens in layout order.

        Coarse levels are embedded when the layout may hold them; in training also when nothing
        merged, so distributed data parallel sees the APT layers used in every step.
        """
        if self.num_levels > 0 and layout.num_levels > 0 and (self.training or not layout.is_dense):
            return gather_level_maps(self.level_maps(images), layout)
        return gather_level_maps([self.proj(images).permute(0, 2, 3, 1)], layout)

    def check_dtype(self, images: torch.Tensor) -> None:
        """Images and weights share a float dtype, or autocast casts both (it never casts float64)."""
        weight = self.proj.weight
        if images.dtype == weight.dtype:
            return
        device_type = images.device.type
        autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        if autocast and torch.float64 not in (images.dtype, weight.dtype):
            return
        fix = f"convert the images (images{_to_dtype(weight.dtype)}) or the model (model{_to_dtype(images.dtype)})"
        if torch.float64 not in (images.dtype, weight.dtype):
            fix += ", or run mixed precision under torch.autocast"
        raise TypeError(f"images are {images.dtype} but the model's weights are {weight.dtype}: {fix}")


def _to_dtype(dtype: torch.dtype) -> str:
    """The tensor/module method call that converts to ``dtype``, e.g. ``.float()``."""
    names = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16", torch.float64: "double"}
    return f".{names[dtype]}()" if dtype in names else f".to({dtype})"

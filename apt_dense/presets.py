"""Host architectures and the paper's APT settings, as keyword arguments for :class:`APTViT`."""
from __future__ import annotations

from functools import partial

import torch.nn as nn

__all__ = ["HOSTS", "APT_SETTINGS", "SAM_ENCODERS", "IMAGENET_PIXEL_MEAN", "IMAGENET_PIXEL_STD", "host_kwargs"]

IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)

_LN = partial(nn.LayerNorm, eps=1e-6)


def _every_third(depth: int) -> tuple[int, ...]:
    return tuple(range(2, depth, 3))


def _eva02_det(dim: int, depth: int, heads: int, global_blocks: tuple[int, ...]) -> dict:
    return dict(
        img_size=1536, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4 * 2 / 3,
        norm_layer=_LN, window_size=32, window_block_indexes=tuple(i for i in range(depth) if i not in global_blocks),
        block_type="eva02", pretrain_img_size=224, pretrain_use_cls_token=True,
    )


def _vitdet(dim: int, depth: int, heads: int, global_blocks: tuple[int, ...]) -> dict:
    return dict(
        img_size=1024, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
        norm_layer=_LN, window_size=14, window_block_indexes=tuple(i for i in range(depth) if i not in global_blocks),
        block_type="vitdet", use_rel_pos=True, pretrain_img_size=224, pretrain_use_cls_token=True,
    )


def _sam(dim: int, depth: int, heads: int, global_blocks: tuple[int, ...]) -> dict:
    """Segment Anything's image encoder without its neck: ViTDet blocks whose position grid was
    learned at 1024 without a cls entry (``apt_dense.sam`` adds the neck and SAM's key layout)."""
    return dict(_vitdet(dim, depth, heads, global_blocks), pretrain_img_size=1024, pretrain_use_cls_token=False)


def _eva02_seg(dim: int, depth: int, heads: int) -> dict:
    """EVA-02 segmentation backbone shape: global attention in every block. Its cls token is
    off here (``use_cls_token=True`` adds it; the mmseg adapter sets it)."""
    return dict(
        img_size=512, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4 * 2 / 3,
        norm_layer=_LN, block_type="eva02", pretrain_img_size=224, pretrain_use_cls_token=True,
    )


def _dinov2(dim: int, depth: int, heads: int, out_indices: tuple[int, ...] | None = None) -> dict:
    """DINOv2 at 518 px (37 x 37 cells of 14 px): global attention, LayerScale, a cls token, the
    position grid resized as transformers' ``Dinov2Embeddings``. ``out_indices``: the last four
    blocks (DPT / Depth Anything V1) unless given."""
    return dict(
        img_size=518, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0, norm_layer=_LN,
        block_type="dinov2", use_cls_token=True, pretrain_img_size=518, pretrain_use_cls_token=True,
        pos_embed_resize="dinov2", out_indices=out_indices or tuple(range(depth - 4, depth)),
    )


# Segment Anything's image encoders (facebookresearch/segment-anything, build_sam.py), also
# SAM-HQ's: (embed_dim, depth, num_heads, global_attn_indexes).
SAM_ENCODERS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}

# EVA-02 detection at 1536 with window 32 (baaivision/EVA, EVA-02/det projects/ViTDet configs),
# ViTDet on MAE at 1024 with window 14 (facebookresearch/detectron2, projects/ViTDet/configs),
# EVA-02 segmentation at 512 (baaivision/EVA, EVA-02/seg configs), SAM's image encoders, and
# DINOv2 / Depth Anything V2 at 518.
HOSTS = {
    "eva02_b_det": _eva02_det(768, 12, 12, (1, 3, 5, 7, 9, 11)),
    "eva02_l_det": _eva02_det(1024, 24, 16, _every_third(24)),
    "vitdet_b": _vitdet(768, 12, 12, (2, 5, 8, 11)),
    "vitdet_l": _vitdet(1024, 24, 16, (5, 11, 17, 23)),
    "eva02_b_seg": _eva02_seg(768, 12, 12),
    "eva02_l_seg": _eva02_seg(1024, 24, 16),
    **{f"sam_{name}": _sam(*shape) for name, shape in SAM_ENCODERS.items()},
    # DINOv2 (facebookresearch/dinov2; transformers' facebook/dinov2-{small,base,large}) and the
    # Depth Anything V2 backbones, which read blocks 2,5,8,11 (S, B) and 4,11,17,23 (L).
    "dinov2_s": _dinov2(384, 12, 6),
    "dinov2_b": _dinov2(768, 12, 12),
    "dinov2_l": _dinov2(1024, 24, 16),
    "depth_anything_v2_s": _dinov2(384, 12, 6, (2, 5, 8, 11)),
    "depth_anything_v2_b": _dinov2(768, 12, 12, (2, 5, 8, 11)),
    "depth_anything_v2_l": _dinov2(1024, 24, 16, (4, 11, 17, 23)),
}

# The paper's thresholds (entropy, 512 bins, bits): detection sizes 32/64/128, segmentation 32.
# SAM (training-free, 14-cell windows: 32 px only): calibrated on scikit-image's photos letterboxed
# as SamPredictor does; 2.0 merges the padding and flat regions (a sky) but no texture, keeping
# 82% of the tokens on the 5 sample photos (4:3 photos: 76%; 4.0 keeps 74%, 5.75 52%).
# "depth": 14 px patches at 518 (DINOv2, Depth Anything), the paper's segmentation threshold at
# 32 and 64 px (16 px patches, 512) translated by tools/translate_thresholds.py: the same share of
# the sample photos merged per level (35% in 56 px patches, 46% in 28 px or larger), 60% of the
# tokens kept. One level alone: {28: 5.45} (70% kept).
APT_SETTINGS = {
    "detection": {32: 2.0, 64: 2.0, 128: 0.3},
    "segmentation": {32: 5.75},
    "sam": {32: 2.0},
    "depth": {28: 5.43, 56: 5.67},
}


def host_kwargs(name: str, **overrides) -> dict:
    """A copy of a host preset with ``overrides`` applied (e.g. ``img_size=1024, window_size=16``)."""
    if name not in HOSTS:
        raise ValueError(f"unknown host preset {name!r}; choose one of {sorted(HOSTS)}")
    kwargs = dict(HOSTS[name])
    kwargs.update(overrides)
    return kwargs

"""Segment Anything's image encoder with Adaptive Patch Transformers.

:class:`APTImageEncoderViT` is :class:`apt_dense.APTViT` configured as SAM's ViTDet-style
``ImageEncoderViT``: the same constructor arguments, the same state-dict keys
(``patch_embed.proj``, ``pos_embed`` ``(1, 64, 64, C)``, ``blocks.N.{norm1, attn.qkv, attn.proj,
attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.lin1, mlp.lin2}``, ``neck.0..3``) and the same output,
``(B, 256, 64, 64)`` image embeddings. Only the APT layers (``patch_embed.downsample``,
``patch_embed.detail``) are new. :class:`APTImageEncoderViTHQ` also returns SAM-HQ's
``interm_embeddings``, the global blocks' outputs as ``(B, 64, 64, C)`` maps.

SAM normalises images and pads them (bottom/right, with zeros *after* normalisation) to a
``1024 x 1024`` canvas before the encoder (``Sam.preprocess``). The planner undoes the
normalisation for scoring, so the padding is the mean colour on the raw scale: flat, and merged
into 32 px patches like any flat region.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import ImageEncoderViT

from ..layout import PatchLayout
from ..model import APTViT, TokenStats
from ..presets import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from ..schedule import PatchSchedule

__all__ = ["APTImageEncoderViT", "APTImageEncoderViTHQ", "check_sam_thresholds"]


def check_sam_thresholds(thresholds: Mapping[int, float] | None, patch_size: int, window_size: int) -> None:
    """Patches must tile SAM's windows, whose size the checkpoints fix: with 14-cell windows only
    32 px patches (2 x 2 cells) do. Raises a ValueError naming the patch sizes allowed."""
    schedule = PatchSchedule.create(patch_size, thresholds)
    too_large = [s for s in schedule.patch_sizes[1:] if window_size and window_size % (s // patch_size)]
    if not too_large:
        return
    fitting = [patch_size << k for k in range(1, window_size.bit_length()) if window_size % (1 << k) == 0]
    if fitting:
        tiling = f"only {', '.join(f'{s} px' for s in fitting)} patches tile"
        fix = f"pass thresholds for {', '.join(f'{s} px' for s in fitting)} only, e.g. thresholds={{32: 2.0}}"
    else:
        tiling, fix = f"no patch larger than {patch_size} px tiles", "use thresholds=None"
    raise ValueError(
        f"thresholds for {', '.join(f'{s} px' for s in too_large)} patches cannot be used with SAM's image "
        f"encoder: it attends within {window_size}-cell ({window_size * patch_size} px) windows, which "
        f"{tiling}, and SAM's checkpoints fix the window size; {fix}"
    )


class APTImageEncoderViT(APTViT):
    """SAM's ``ImageEncoderViT`` with Adaptive Patch Transformers.

    The positional arguments are ``ImageEncoderViT``'s, in its order and with its defaults; the
    keyword-only ones are APT's (see :class:`apt_dense.APTViT`). ``pixel_mean``/``pixel_std``
    default to SAM's (the ImageNet statistics on the 0..255 scale); pass the ``Sam`` model's when
    it has others.

    ``forward(x)`` takes what ``Sam.preprocess`` gives, ``(B, in_chans, img_size, img_size)``
    normalised images, and returns ``(B, out_chans, img_size / p, img_size / p)`` embeddings,
    like ``ImageEncoderViT``. The layout of the last pass (tokens each image kept: its
    ``tokens_per_image_host``, ``kept_fraction``) is :attr:`last_layout`; :attr:`token_stats`
    accumulates the counts over all passes.
    """

    returns_interm_embeddings = False

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
        *,
        adaptive: bool = True,
        thresholds: Mapping[int, float] | None = None,
        scorer: str | object = "entropy",
        scorer_kwargs: Mapping[str, object] | None = None,
        pixel_mean: Sequence[float] | None = IMAGENET_PIXEL_MEAN,
        pixel_std: Sequence[float] | None = IMAGENET_PIXEL_STD,
        input_format: str = "RGB",
        attention_backend: str = "auto",
    ):
        # ImageEncoderViT: a block attends globally where it is listed, or when window_size is 0.
        global_blocks = tuple(i for i in range(depth) if window_size <= 0 or i in global_attn_indexes)
        window_blocks = tuple(i for i in range(depth) if i not in global_blocks)
        window_size = window_size if window_blocks else 0
        check_sam_thresholds(thresholds, patch_size, window_size)
        last = depth - 1
        out_indices = tuple(sorted({*global_blocks, last})) if self.returns_interm_embeddings else (last,)
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
            act_layer=act_layer, use_abs_pos=use_abs_pos, use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init, window_size=window_size,
            window_block_indexes=window_blocks,
            pretrain_img_size=img_size, pretrain_use_cls_token=False, block_type="vitdet",
            out_indices=out_indices, adaptive=adaptive, thresholds=thresholds, scorer=scorer,
            scorer_kwargs=scorer_kwargs, pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
            attention_backend=attention_backend,
        )
        self.img_size = img_size  # Sam.preprocess, Sam.postprocess_masks and SamPredictor read it
        self.interm_indexes = global_blocks
        # SAM's own neck and (1, H, W, C) position grid, built by ImageEncoderViT itself (without
        # blocks), so that their modules, keys and initialisation are SAM's.
        host = ImageEncoderViT(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=0,
            num_heads=num_heads, mlp_ratio=mlp_ratio, out_chans=out_chans, qkv_bias=qkv_bias,
            norm_layer=norm_layer, act_layer=act_layer, use_abs_pos=use_abs_pos,
        )
        self.pos_embed = host.pos_embed
        self.neck = host.neck
        # SAM's MLP keys (lin1, lin2); MLPBlock maps the packed (N, C) rows as it maps (B, H, W, C).
        for block in self.blocks:
            block.mlp = MLPBlock(embedding_dim=embed_dim, mlp_dim=int(embed_dim * mlp_ratio), act=act_layer)
            block.mlp.apply(self._init_weights)
        self.token_stats = TokenStats()
        self.last_layout: PatchLayout | None = None

    def forward(self, x: torch.Tensor):
        """``(B, in_chans, img_size, img_size)`` normalised images -> ``(B, out_chans, Hc, Wc)``
        image embeddings (and, for SAM-HQ, the global blocks' ``(B, Hc, Wc, C)`` outputs)."""
        self.check_input(x, any_size=True)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"SAM's image encoder takes {self.img_size}x{self.img_size} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}: resize the longest side to {self.img_size} and pad as "
                f"SamPredictor.set_image does (Sam.preprocess pads), or use apt_dense.sam.sam_input"
            )
        out = self.forward_features(x)
        self.last_layout = out.layout
        self.token_stats.update(out.layout)
        maps = dict(zip(self.out_indices, out.features))
        embeddings = self.neck(maps[len(self.blocks) - 1])
        if not self.returns_interm_embeddings:
            return embeddings
        return embeddings, [maps[i].permute(0, 2, 3, 1) for i in self.interm_indexes]


class APTImageEncoderViTHQ(APTImageEncoderViT):
    """SAM-HQ's ``ImageEncoderViT`` with APT: ``forward`` returns ``(embeddings,
    interm_embeddings)``, the latter the output of every global-attention block as a dense
    ``(B, Hc, Wc, C)`` map (SAM-HQ's decoder uses the first)."""

    returns_interm_embeddings = True

"""``APTViT`` for mmsegmentation: EVA-02's segmentation backbone (``EVA2``) with APT."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmseg.registry import MODELS

from ..model import APTViT as CoreAPTViT
from ..model import TokenStats
from ..schedule import merged_config_thresholds

__all__ = ["APTViTSegBackbone"]


@MODELS.register_module(name="APTViT")
class APTViTSegBackbone(CoreAPTViT):
    """EVA-02 segmentation backbone with Adaptive Patch Transformers.

    Same layout and key names as EVA-02's ``EVA2`` (``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.{i}.*``, ``fpn1..fpn4``): a cls token, RoPE, SwiGLU with
    sub-LN and global attention in every block; the outputs of ``out_indices`` become four maps at
    strides 4, 8, 16, 32 through ``fpn1`` (2 transposed convs), ``fpn2`` (1), ``fpn3`` (identity)
    and ``fpn4`` (max pool). Any input size works: inputs are padded to the largest patch and the
    maps cropped back; the RoPE grid stays ``img_size / patch_size`` and the position embedding
    is resized bicubically when the grid differs.

    Args:
        img_size: EVA2's ``img_size`` (sets the position-embedding grid and the RoPE frame).
        out_indices: four block indices (EVA-02-B: 3, 5, 7, 11; L: 7, 11, 15, 23).
        fpn_norm_cfg: norm of ``fpn1`` (EVA-02 uses SyncBN; BN for single-process CPU runs).
        norm_eps: LayerNorm epsilon.
        use_checkpoint, use_abs_pos_emb, rope, pt_hw_seq_len, intp_freq, subln, naiveswiglu,
        xattn, init_values, use_rel_pos_bias, use_shared_rel_pos_bias: EVA2's arguments; only
            EVA-02's released settings are supported (others raise).
        **kwargs: :class:`apt_dense.APTViT`'s (``embed_dim``, ``depth``, ``num_heads``,
            ``mlp_ratio``, ``qkv_bias``, ``drop_path_rate``, ``thresholds``, ``pixel_mean``, ...).
    """

    def __init__(
        self,
        *,
        img_size: int = 512,
        patch_size: int = 16,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        mlp_ratio: float = 4 * 2 / 3,
        qkv_bias: bool = True,
        fpn_norm_cfg: dict | None = None,
        norm_eps: float = 1e-6,
        use_checkpoint: bool = False,
        use_abs_pos_emb: bool = True,
        rope: bool = True,
        pt_hw_seq_len: int = 16,
        intp_freq: bool = True,
        subln: bool = True,
        naiveswiglu: bool = True,
        xattn: bool = True,
        init_values: float | None = None,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = False,
        **kwargs,
    ):
        unsupported = {
            "rope=False": not rope, "intp_freq=False": not intp_freq, "subln=False": not subln,
            "naiveswiglu=False": not naiveswiglu, "init_values (layer scale)": init_values is not None,
            "use_rel_pos_bias": use_rel_pos_bias, "use_shared_rel_pos_bias": use_shared_rel_pos_bias,
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"APTViT supports EVA-02's released segmentation settings; unsupported: {bad}")
        if patch_size != 16:
            raise ValueError(f"the fpn1..fpn4 pyramid is defined for patch_size 16, got {patch_size}")
        del xattn  # EVA-02's xformers switch: APTViT picks its own attention backend
        kwargs["thresholds"] = merged_config_thresholds(kwargs.get("thresholds"))  # "32" from an override beside 32
        super().__init__(
            img_size=img_size, patch_size=patch_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps), use_abs_pos=use_abs_pos_emb,
            use_act_checkpoint=use_checkpoint, pretrain_img_size=img_size, pretrain_use_cls_token=True,
            use_cls_token=True, block_type="eva02", rope_pretrain_len=pt_hw_seq_len, out_indices=out_indices,
            **kwargs,
        )
        if len(self.out_indices) != 4:
            raise ValueError(f"out_indices needs four block indices (strides 4, 8, 16, 32), got {list(self.out_indices)}")
        dim = self.embed_dim
        norm_cfg = fpn_norm_cfg or dict(type="SyncBN", requires_grad=True)
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            build_norm_layer(norm_cfg, dim)[1],
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.token_stats = TokenStats()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` normalised images -> four maps at strides 4, 8, 16, 32."""
        out = self.forward_features(x)
        self.token_stats.update(out.layout)
        pyramid = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return tuple(op(f.contiguous()) for op, f in zip(pyramid, out.features))

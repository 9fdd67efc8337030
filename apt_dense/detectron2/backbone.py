"""``APTViT`` as a detectron2 ``Backbone`` with detectron2's ``ViT`` arguments and outputs."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.utils.events import get_event_storage

from ..model import APTViT as CoreAPTViT
from ..model import TokenStats, host_window_arguments
from ..schedule import merged_config_thresholds, thresholds_from_sequence

__all__ = ["APTViT", "add_apt_vit_config", "build_apt_vit_fpn_backbone"]


class APTViT(CoreAPTViT, Backbone):
    """detectron2's ``ViT`` (ViTDet) / EVA-02's ``ViT`` with Adaptive Patch Transformers.

    Takes every keyword argument of detectron2's ``ViT`` (and EVA-02's ``rope``/``pt_hw_seq_len``/
    ``intp_freq``/``xattn``), plus the APT arguments of :class:`apt_dense.APTViT`. Returns
    ``{out_feature: (B, C, H/16, W/16)}`` like ``ViT``; parameters keep ``ViT``'s names, so
    ``backbone.net.*`` checkpoints load unchanged.

    With adaptive patching on, inputs are zero-padded (bottom/right) to a multiple of the largest
    patch and the output cropped back; ViTDet configs already pad to a square of 1024 / 1536.
    Tokens kept per image are logged to detectron2's event storage during training
    (``apt_train/kept_fraction``) and accumulated in :attr:`token_stats`.
    """

    def __init__(
        self,
        *,
        out_feature: str = "last_feat",
        residual_block_indexes: Sequence[int] = (),
        rope: bool = False,
        pt_hw_seq_len: int = 16,
        intp_freq: bool = True,
        xattn: bool = True,
        **kwargs,
    ):
        """
        Args:
            out_feature, residual_block_indexes: as in detectron2's ``ViT`` (residual conv blocks
                are not supported and must stay empty).
            rope, pt_hw_seq_len, intp_freq, xattn: EVA-02's: ``rope=True`` selects EVA-02 blocks;
                ``xattn`` is ignored (APTViT chooses its attention backend).
            **kwargs: every other argument, with detectron2 ``ViT``'s names (``img_size``,
                ``embed_dim``, ``window_block_indexes``, ...) and the APT ones (``thresholds``,
                ``pixel_mean``, ...), see :class:`apt_dense.APTViT`.
        """
        if residual_block_indexes:
            raise ValueError(
                "residual_block_indexes (conv blocks between transformer blocks) are not supported "
                "by APTViT; ViTDet's released configs leave them empty"
            )
        if rope and not intp_freq:
            raise ValueError("EVA-02 RoPE without intp_freq is not supported; set intp_freq=True")
        del xattn
        kwargs["thresholds"] = merged_config_thresholds(kwargs.get("thresholds"))  # "32" from an override beside 32
        # detectron2's ViT: a block attends within windows when listed and window_size > 0
        kwargs["window_size"], kwargs["window_block_indexes"] = host_window_arguments(
            kwargs.get("window_size", 0), kwargs.get("window_block_indexes", ())
        )
        super().__init__(block_type="eva02" if rope else "vitdet", rope_pretrain_len=pt_hw_seq_len, **kwargs)
        if len(self.out_indices) != 1 or self.out_indices[0] != len(self.blocks) - 1:
            raise ValueError("the detectron2 backbone returns the last block's output; do not set out_indices")
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: self.embed_dim}
        self._out_feature_strides = {out_feature: self.patch_size}
        self.token_stats = TokenStats()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.forward_features(x)
        self.token_stats.update(out.layout)
        if self.training:
            try:
                storage = get_event_storage()
            except AssertionError:  # outside detectron2's training loop
                pass
            else:
                storage.put_scalar("apt_train/kept_fraction", out.layout.mean_kept_fraction)
        return {self._out_features[0]: out.features[0]}


def add_apt_vit_config(cfg) -> None:
    """Add ``MODEL.APT_VIT`` keys (yacs) for :func:`build_apt_vit_fpn_backbone`."""
    from detectron2.config import CfgNode as CN

    cfg.MODEL.APT_VIT = CN()
    c = cfg.MODEL.APT_VIT
    c.IMG_SIZE = 1024
    c.PATCH_SIZE = 16
    c.EMBED_DIM = 768
    c.DEPTH = 12
    c.NUM_HEADS = 12
    c.MLP_RATIO = 4.0
    c.DROP_PATH_RATE = 0.1
    c.WINDOW_SIZE = 14
    c.WINDOW_BLOCK_INDEXES = [0, 1, 3, 4, 6, 7, 9, 10]
    c.USE_REL_POS = True
    c.ROPE = False  # True: EVA-02 blocks
    c.USE_ACT_CHECKPOINT = False
    c.PRETRAIN_IMG_SIZE = 224
    c.OUT_CHANNELS = 256
    c.SQUARE_PAD = 1024
    c.ADAPTIVE = True
    c.PATCH_SIZES = [16, 32]
    c.THRESHOLDS = [5.5]  # ascending: thresholds[i] belongs to PATCH_SIZES[i + 1]
    c.SCORER = "entropy"
    c.ATTENTION_BACKEND = "auto"


@BACKBONE_REGISTRY.register()
def build_apt_vit_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """yacs builder: ``MODEL.BACKBONE.NAME = "build_apt_vit_fpn_backbone"`` after
    :func:`add_apt_vit_config`. Returns ViTDet's ``SimpleFeaturePyramid`` (p2..p6) on APTViT."""
    c = cfg.MODEL.APT_VIT
    if input_shape.channels != 3:
        raise ValueError(f"APTViT expects 3 input channels, got {input_shape.channels}")
    net = APTViT(
        img_size=c.IMG_SIZE, patch_size=c.PATCH_SIZE, embed_dim=c.EMBED_DIM, depth=c.DEPTH,
        num_heads=c.NUM_HEADS, mlp_ratio=c.MLP_RATIO, drop_path_rate=c.DROP_PATH_RATE,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), window_size=c.WINDOW_SIZE,
        window_block_indexes=tuple(c.WINDOW_BLOCK_INDEXES), use_rel_pos=c.USE_REL_POS, rope=c.ROPE,
        use_act_checkpoint=c.USE_ACT_CHECKPOINT, pretrain_img_size=c.PRETRAIN_IMG_SIZE,
        adaptive=c.ADAPTIVE, thresholds=thresholds_from_sequence(tuple(c.THRESHOLDS), tuple(c.PATCH_SIZES)),
        scorer=c.SCORER, pixel_mean=tuple(cfg.MODEL.PIXEL_MEAN), pixel_std=tuple(cfg.MODEL.PIXEL_STD),
        input_format=cfg.INPUT.FORMAT, attention_backend=c.ATTENTION_BACKEND,
    )
    return SimpleFeaturePyramid(
        net, in_feature="last_feat", out_channels=c.OUT_CHANNELS, scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(), norm="LN", square_pad=c.SQUARE_PAD,
    )

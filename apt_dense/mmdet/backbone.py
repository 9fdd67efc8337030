"""``APTViT`` for MMDetection: mmdet ViTDet's ``ViT`` (or EVA-02's blocks) with APT."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule

from ..model import APTViT as CoreAPTViT
from ..model import TokenStats, host_window_arguments
from ..schedule import merged_config_thresholds
from .checkpoint import load_pretrained_backbone

__all__ = ["APTViTDetBackbone"]

_INIT_CFG_KEYS = {"type", "checkpoint", "allow_pickle"}


def _layer_norm(norm_cfg: dict, dim: int) -> nn.Module:
    return build_norm_layer(norm_cfg, dim)[1]


@MODELS.register_module(name="APTViT")
class APTViTDetBackbone(CoreAPTViT, BaseModule):
    """mmdet ViTDet's ``ViT`` with Adaptive Patch Transformers; returns one NCHW map like ``ViT``.

    Takes ``ViT``'s arguments and keeps its key names (``patch_embed.proj``, ``pos_embed``,
    ``blocks.{i}.*``), so mmdet ViTDet checkpoints load unchanged. ``block_type="eva02"`` builds
    EVA-02's blocks (q/k/v projections, RoPE, SwiGLU) with EVA-02's key names. With adaptive
    patching on, inputs are zero-padded (bottom/right) to the largest patch and the map cropped
    back. :attr:`token_stats` counts the tokens kept (``APTTokenStatsHook`` reports them).

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
        drop_path_rate, use_abs_pos, use_rel_pos, rel_pos_zero_init, window_size,
        window_block_indexes, pretrain_img_size, pretrain_use_cls_token: as mmdet's ``ViT``
            (``window_size=0`` makes every block global).
        norm_cfg: a LayerNorm config, built with mmcv's ``build_norm_layer``: without ``eps``
            it gets mmcv's 1e-5, as in mmdet's ViTDet config (``dict(type="LN", requires_grad=True)``).
        act_cfg: the MLP activation of ViTDet blocks (EVA-02's SwiGLU uses SiLU).
        init_cfg: None (train from scratch) or ``dict(type="Pretrained", checkpoint=PATH)``
            with an mmdet / detectron2 detector checkpoint or MAE / EVA-02 pretraining weights,
            loaded in :meth:`init_weights` by :func:`~apt_dense.mmdet.load_pretrained_backbone`
            (read as data; ``allow_pickle=True`` for trusted legacy files; shapes must match).
        block_type: ``"vitdet"`` or ``"eva02"``.
        **kwargs: the APT arguments of :class:`apt_dense.APTViT` (``thresholds``,
            ``pixel_mean``, ``pixel_std``, ``input_format``, ``adaptive``, ``scorer``,
            ``attention_backend``, ``use_act_checkpoint``, ...).
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (0, 1, 3, 4, 6, 7, 9, 10),
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        init_cfg: dict | None = None,
        block_type: str = "vitdet",
        **kwargs,
    ):
        norm_cfg = dict(norm_cfg or dict(type="LN", eps=1e-6))
        act_cfg = dict(act_cfg or dict(type="GELU"))
        if norm_cfg.get("type") not in ("LN", nn.LayerNorm):
            raise ValueError(
                f"norm_cfg {norm_cfg} is not a LayerNorm: APTViT normalises tokens, use dict(type='LN', ...)"
            )
        if block_type == "eva02" and act_cfg.get("type") not in ("GELU", nn.GELU):
            raise ValueError(f"EVA-02 blocks use SwiGLU (SiLU); act_cfg {act_cfg} applies to block_type='vitdet'")
        if init_cfg is not None:
            _check_init_cfg(init_cfg)
        kwargs["thresholds"] = merged_config_thresholds(kwargs.get("thresholds"))  # "32" from an override beside 32
        # mmdet's ViT: a block attends within windows when listed and window_size > 0
        window_size, window_block_indexes = host_window_arguments(window_size, window_block_indexes)
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            norm_layer=partial(_layer_norm, norm_cfg), act_layer=partial(build_activation_layer, act_cfg),
            use_abs_pos=use_abs_pos, use_rel_pos=use_rel_pos, rel_pos_zero_init=rel_pos_zero_init,
            window_size=window_size, window_block_indexes=window_block_indexes,
            pretrain_img_size=pretrain_img_size, pretrain_use_cls_token=pretrain_use_cls_token,
            block_type=block_type, **kwargs,
        )
        if self.out_indices != (depth - 1,):
            raise ValueError("APTViT returns the last block's map, like mmdet's ViT; do not set out_indices")
        self.init_cfg = init_cfg
        self.token_stats = TokenStats()

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint; without one, keep the initialisation drawn at construction."""
        if self.init_cfg is None:
            print_log(
                "APTViT: no init_cfg checkpoint; the backbone keeps its random initialisation unless "
                "load_from or resume loads weights",
                logger="current", level=logging.WARNING,
            )
        else:
            load_pretrained_backbone(self, self.init_cfg["checkpoint"], allow_pickle=self.init_cfg.get("allow_pickle", False))
        self._is_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, embed_dim, ceil(H/p), ceil(W/p))``, contiguous
        NCHW like ``ViT``'s (the neck and heads then run the same kernels)."""
        out = self.forward_features(x)
        self.token_stats.update(out.layout)
        return out.features[0].contiguous()


def _check_init_cfg(init_cfg) -> None:
    if not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained" or "checkpoint" not in init_cfg:
        raise ValueError(
            f"APTViT's init_cfg must be dict(type='Pretrained', checkpoint=PATH), got {init_cfg!r} "
            "(weights are drawn at construction; for a whole detector use load_from)"
        )
    extra = set(init_cfg) - _INIT_CFG_KEYS
    if extra:
        raise ValueError(f"APTViT's init_cfg takes {sorted(_INIT_CFG_KEYS)}; unsupported: {sorted(extra)}")

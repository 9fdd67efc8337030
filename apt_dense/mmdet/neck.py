"""ViTDet's simple feature pyramid for mmdet, with the key names of mmdet's ``SimpleFPN``.

mmdet's ``SimpleFPN`` and ``LN2d`` live in its repository's ``projects/ViTDet``, not in the
package. They are registered here under their own names, so that a config may also load
``projects.ViTDet.vitdet`` without a registry clash.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_norm_layer
from mmdet.registry import MODELS
from mmengine.model import BaseModule

__all__ = ["APTLN2d", "APTSimpleFPN"]


@MODELS.register_module()
class APTLN2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (ViTDet's ``LN2d``: ``weight``, ``bias``).

    Built through mmcv's ``build_norm_layer`` (``norm_cfg=dict(type="APTLN2d")``) it gets mmcv's
    default eps 1e-5, as ``LN2d`` in mmdet's ViTDet configs; ``ConvModule`` names it ``norm_layer``.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}"


@MODELS.register_module()
class APTSimpleFPN(BaseModule):
    """ViTDet's simple feature pyramid on one stride-16 map (mmdet ``SimpleFPN``'s arguments and keys).

    ``fpn1`` (two 2x2 transposed convs, stride 4), ``fpn2`` (one, stride 8), ``fpn3`` (identity,
    16), ``fpn4`` (max pool, 32), then per level a 1x1 ``lateral_convs[i]`` and a 3x3
    ``fpn_convs[i]`` (``ConvModule``: ``conv`` + ``norm_layer``, no top-down path), and stride-2
    max pools of the last level up to ``num_outs`` maps.

    Args:
        backbone_channel: channels of the backbone map (``embed_dim``).
        in_channels: channels entering the lateral convs: ``[C/4, C/2, C, C]``.
        out_channels: channels of every output.
        num_outs: outputs; 5 gives strides 4, 8, 16, 32, 64.
        conv_cfg, norm_cfg, act_cfg, init_cfg: as mmdet's ``SimpleFPN`` (``norm_cfg`` is required).
    """

    def __init__(
        self,
        backbone_channel: int,
        in_channels: Sequence[int],
        out_channels: int,
        num_outs: int,
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
        init_cfg: dict | list[dict] | None = None,
    ):
        super().__init__(init_cfg=init_cfg)
        c = backbone_channel
        expected = [c // 4, c // 2, c, c]
        if list(in_channels) != expected:
            raise ValueError(
                f"in_channels {list(in_channels)} do not fit backbone_channel {c}: the pyramid's "
                f"four levels have {expected} channels; set in_channels={expected}"
            )
        if num_outs < len(expected):
            raise ValueError(f"num_outs must be at least {len(expected)} (strides 4..32), got {num_outs}")
        if norm_cfg is None:
            raise ValueError("APTSimpleFPN needs norm_cfg (ViTDet: dict(type='APTLN2d', requires_grad=True))")
        self.backbone_channel = c
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_ins = len(expected)
        self.num_outs = num_outs
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, 2),
            build_norm_layer(norm_cfg, c // 2)[1],
            nn.GELU(),
            nn.ConvTranspose2d(c // 2, c // 4, 2, 2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2))
        self.fpn3 = nn.Sequential(nn.Identity())
        self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
        conv = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg, inplace=False)
        self.lateral_convs = nn.ModuleList(ConvModule(ch, out_channels, 1, **conv) for ch in self.in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, **conv) for _ in self.in_channels
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, C, H, W)`` stride-16 map -> ``num_outs`` maps at strides 4, 8, 16, 32 (, 64, ...)."""
        levels = (self.fpn1(x), self.fpn2(x), self.fpn3(x), self.fpn4(x))
        outs = [out(lateral(f)) for f, lateral, out in zip(levels, self.lateral_convs, self.fpn_convs)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)

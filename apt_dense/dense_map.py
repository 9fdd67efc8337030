"""Stage 5: back to a regular feature map.

Every token is repeated over the base cells it covers, so unchanged pyramid necks and heads
consume APT features as they consume a dense ViT's.
"""
from __future__ import annotations

import torch

from .layout import PatchLayout

__all__ = ["tokens_to_dense"]


def tokens_to_dense(tokens: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
    """``(N, C) -> (B, C, Hc, Wc)`` by repeat-upsampling (a differentiable gather)."""
    return tokens[layout.cell_to_token].permute(0, 3, 1, 2)

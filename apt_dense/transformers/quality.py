"""How far APT's depth is from the dense model's: the same processed pixels through both models,
the dense prediction as the reference.

- AbsRel: mean of ``|apt - dense| / dense`` over the pixels where the dense depth is positive;
- delta < 1.25: share of those pixels where ``max(apt / dense, dense / apt) < 1.25``.

Both models predict on one scale (relative inverse depth for Depth Anything, metric depth for its
metric heads), so no scale or shift is fitted.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..model import TokenStats
from .backbone import APTDinov2Backbone

__all__ = ["DepthQuality", "depth_errors", "compare_image", "summarise"]


@dataclass
class DepthQuality:
    """Dense vs APT on one image.

    Attributes:
        height, width: the processed pixels' size (the depth maps').
        tokens_kept, tokens_dense: backbone tokens of the APT pass (its padding's included) and
            of the dense pass (one per 14 px cell).
        abs_rel, delta1: :func:`depth_errors`.
    """

    name: str
    height: int
    width: int
    tokens_kept: int
    tokens_dense: int
    abs_rel: float
    delta1: float

    @property
    def kept_fraction(self) -> float:
        return self.tokens_kept / self.tokens_dense

    def as_dict(self) -> dict:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def depth_errors(apt: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """``(abs_rel, delta1)`` of ``apt`` against ``dense`` (same shape) over the pixels with a
    positive dense depth; NaN when there is none. A zero APT depth there is outside delta."""
    valid = dense > 0
    if not valid.any():
        return math.nan, math.nan
    a, d = apt[valid].double(), dense[valid].double()
    ratio = torch.maximum(a / d, d / a)
    return float(((a - d).abs() / d).mean()), float((ratio < 1.25).double().mean())


@torch.no_grad()
def compare_image(dense: torch.nn.Module, apt: torch.nn.Module, processor, name: str, image: np.ndarray) -> DepthQuality:
    """Both depth models (``apt``'s backbone an :class:`APTDinov2Backbone`) on one ``(H, W, 3)``
    uint8 RGB image, processed once by ``processor``."""
    backbone = apt.backbone
    if not isinstance(backbone, APTDinov2Backbone):
        raise TypeError(f"apt.backbone is a {type(backbone).__name__}; swap it first (apt_dense.transformers.swap_to_apt)")
    device = next(dense.parameters()).device
    pixels = processor(images=image, return_tensors="pt").pixel_values.to(device)
    reference = dense(pixel_values=pixels).predicted_depth[0].float().cpu()
    backbone.token_stats = TokenStats()
    predicted = apt(pixel_values=pixels).predicted_depth[0].float().cpu()
    height, width = pixels.shape[-2:]
    patch = backbone.apt.patch_size
    abs_rel, delta1 = depth_errors(predicted, reference)
    return DepthQuality(name, height, width, backbone.token_stats.tokens, (height // patch) * (width // patch),
                        abs_rel, delta1)


def summarise(results: Iterable[DepthQuality]) -> dict:
    """Means over the images (each image weighs the same), and the tokens kept over all images."""
    results = list(results)
    return {
        "images": len(results),
        "kept_fraction": sum(r.tokens_kept for r in results) / sum(r.tokens_dense for r in results),
        "abs_rel": sum(r.abs_rel for r in results) / len(results),
        "delta1": sum(r.delta1 for r in results) / len(results),
    }

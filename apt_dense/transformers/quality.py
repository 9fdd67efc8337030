"""How far APT's depth is from the dense model's: the same processed pixels through both models,
the dense prediction as the reference.

- AbsRel: mean of ``|apt - dense| / dense`` over the pixels where the dense depth is positive;
- delta < 1.25: share of those pixels where ``max(apt / dense, dense / apt) < 1.25``.

Both models predict on one scale (relative inverse depth for Depth Anything, metric depth for its
metric heads), so no scale or shift is fitted.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..model import TokenStats
from .backbone import APTDinov2Backbone
from .swap import FOLDER_CLASSES, folder_config, from_pretrained

__all__ = ["DepthQuality", "depth_errors", "compare_image", "summarise", "depth_folder_config", "load_depth_pair",
           "depth_anything_processor"]

logger = logging.getLogger(__name__)

# The depth models among the folders apt_dense.transformers loads (model_type in config.json).
DEPTH_MODEL_TYPES = ("depth_anything", "dpt")


def depth_anything_processor(size: int = 518):
    """Depth Anything's image processor (its released ``preprocessor_config.json``): both sides
    scaled by the factor that brings one side to ``size`` px with the least change, rounded to
    multiples of 14, bicubic, ImageNet statistics."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=True, ensure_multiple_of=14,
                             resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                             do_pad=False)


def depth_folder_config(folder: Path):
    """The config of a local depth model folder.

    Raises:
        FileNotFoundError: no such folder, or no ``config.json`` in it.
        ValueError: the folder holds another model (e.g. a DINOv2 backbone).
    """
    config = folder_config(folder)
    if config.model_type not in DEPTH_MODEL_TYPES:
        raise ValueError(f"{folder} holds a {config.model_type!r} model, not a depth model: pass the folder of a "
                         "Depth Anything (V1/V2) or DPT model with a DINOv2 backbone")
    return config


def load_depth_pair(folder: str | os.PathLike, thresholds: Mapping[int, float] | None,
                    device: torch.device | str = "cpu"):
    """``(dense, apt, processor)`` for a local Depth Anything / DPT folder: its model as saved, the
    same with an APT backbone (:func:`~apt_dense.transformers.from_pretrained`), both in eval mode
    on ``device``, and the folder's image processor (Depth Anything's when it has none).

    Raises:
        FileNotFoundError: no such folder, or no ``config.json`` in it.
        ValueError: the folder holds no depth model (e.g. a DINOv2 backbone), or weights that do
            not fit its config (naming the keys).
        TypeError: a depth model without a DINOv2 backbone (DPT on its own ViT).
    """
    from transformers import AutoImageProcessor

    folder = Path(folder)
    config = depth_folder_config(folder)
    apt = from_pretrained(folder, apt=dict(thresholds=thresholds))
    dense = FOLDER_CLASSES[config.model_type].from_pretrained(folder, local_files_only=True)
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    else:
        logger.warning("%s has no preprocessor_config.json: using Depth Anything's (518 px, multiples of 14, "
                       "ImageNet statistics)", folder)
        processor = depth_anything_processor()
    return dense.to(device).eval(), apt.to(device).eval(), processor


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

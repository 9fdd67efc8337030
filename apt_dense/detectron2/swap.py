"""Turn a LazyConfig with detectron2's (or EVA-02's) ``ViT`` backbone into the APT version."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from ..presets import APT_SETTINGS
from .backbone import APTViT

__all__ = ["swap_to_apt", "HOST_VIT_TARGETS"]

logger = logging.getLogger(__name__)

# detectron2's ViT; EVA-02's fork vendors detectron2 and keeps the same path.
HOST_VIT_TARGETS = ("detectron2.modeling.backbone.vit.ViT", "detectron2.modeling.ViT")


def _target_path(target) -> str:
    if isinstance(target, str):
        return target
    return f"{target.__module__}.{target.__qualname__}"


def _fitting_thresholds(thresholds: Mapping[int, float], patch_size: int, window_size: int) -> dict[int, float]:
    """The coarse sizes of ``thresholds`` whose patches tile the window (smallest first, no gaps)."""
    kept = {}
    for size in sorted(thresholds):
        cells = size // patch_size
        if window_size and window_size % cells:
            break
        kept[size] = thresholds[size]
    return kept


def _host_net(model):
    """``model.backbone.net``, or a ValueError saying what the config has instead."""
    backbone = model.get("backbone") if isinstance(model, Mapping) else None
    net = backbone.get("net") if isinstance(backbone, Mapping) else None
    if isinstance(net, Mapping) and "_target_" in net:
        return net
    if isinstance(backbone, Mapping) and "_target_" in backbone:
        found = f"its model.backbone is {_target_path(backbone['_target_'])}, which has no ViT 'net'"
    else:
        found = "it has no model.backbone"
    raise ValueError(
        f"swap_to_apt needs a ViTDet-style LazyConfig whose model.backbone.net is detectron2's ViT "
        f"({HOST_VIT_TARGETS[0]}), but {found}; start from a ViTDet config, e.g. detectron2's "
        "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py"
    )


def swap_to_apt(cfg, thresholds: Mapping[int, float] | None = None, **apt_kwargs):
    """Replace ``cfg.model.backbone.net`` (detectron2's / EVA-02's ``ViT``) by :class:`APTViT`.

    ``cfg`` is a whole LazyConfig or its ``model`` node.

    All host arguments are kept, so the same checkpoints load. ``pixel_mean``/``pixel_std`` and
    ``input_format`` are taken from ``cfg.model``. Without ``thresholds`` the paper's detection
    setting ``{32: 2, 64: 2, 128: 0.3}`` is used, limited to the patch sizes that tile the
    window (e.g. only 32 px for ViTDet's window of 14 cells).

    Returns:
        ``cfg`` (modified in place).
    """
    model = cfg.model if "model" in cfg else cfg
    net = _host_net(model)
    path = _target_path(net._target_)
    if path == _target_path(APTViT):
        raise ValueError("the config's backbone is already APTViT")
    if path not in HOST_VIT_TARGETS:
        raise ValueError(
            f"swap_to_apt expects cfg.model.backbone.net to be detectron2's ViT "
            f"({HOST_VIT_TARGETS[0]}), got {path}"
        )
    patch_size = net.get("patch_size", 16)
    window = net.get("window_size", 0) if net.get("window_block_indexes") else 0
    if thresholds is None:
        thresholds = _fitting_thresholds(APT_SETTINGS["detection"], patch_size, window)
        logger.info("APT thresholds for window %s: %s", window, thresholds)
    net._target_ = APTViT
    net.thresholds = dict(thresholds)
    for key in ("pixel_mean", "pixel_std", "input_format"):
        if key in model and key not in apt_kwargs:
            value = model[key]
            net[key] = value if isinstance(value, str) else list(value)
    for key, value in apt_kwargs.items():
        net[key] = value
    return cfg

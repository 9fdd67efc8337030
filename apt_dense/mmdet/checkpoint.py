"""Pretrained backbone weights for mmdet's ``APTViT`` (its ``init_cfg``), read as data and checked."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from mmengine.logging import print_log

from ..checkpoints import convert_eva02_pretrain, load_state_dict_checked, read_checkpoint, unwrap_state_dict
from ..openmmlab.runner import MMENGINE_CHECKPOINT_GLOBALS

__all__ = ["backbone_state_dict", "load_pretrained_backbone"]

# Where a detector checkpoint keeps its ViT: detectron2's ViTDet / EVA-02 detectors, mmdet's.
_DETECTOR_PREFIXES = ("backbone.net.", "backbone.")


def backbone_state_dict(checkpoint: Mapping) -> tuple[dict, str, list[str]]:
    """The ViT weights of a checkpoint, with ``APTViT``'s key names (``blocks.{i}.*``, ...).

    Accepts mmdet detectors (``backbone.*``), detectron2 ViTDet / EVA-02 detectors
    (``backbone.net.*``; the pyramid and heads are dropped) and MAE / EVA-02 pretraining weights
    (unprefixed; ``cls_token``, the final ``norm``, ``mask_token``, ``lm_head`` and RoPE tables
    are dropped), under ``state_dict``/``model``/``module`` or not.

    Returns:
        ``(state_dict, layout, dropped_keys)``; ``layout`` names the layout found.
    """
    state = unwrap_state_dict(checkpoint)
    for prefix in _DETECTOR_PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in state):
            kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return kept, f"detector ({prefix}*)", [k for k in state if not k.startswith(prefix)]
    if not any(k.startswith("blocks.") for k in state):
        raise ValueError(
            f"no ViT blocks ('blocks.N.*', 'backbone.blocks.N.*' or 'backbone.net.blocks.N.*') among the "
            f"checkpoint's {len(state)} keys (e.g. {sorted(state)[:3]}): is it a ViTDet / MAE / EVA-02 checkpoint?"
        )
    kept, dropped = convert_eva02_pretrain(state, prefix="")
    return kept, "pretraining (unprefixed)", dropped


def load_pretrained_backbone(
    model: torch.nn.Module, checkpoint: str | os.PathLike | Mapping, *, allow_pickle: bool = False
) -> tuple[list[str], list[str]]:
    """Load a backbone checkpoint (file or dict, see :func:`backbone_state_dict`) into ``model``.

    Files are read as data (``allow_pickle=True`` for trusted legacy files); mmengine's training
    checkpoints, with their log buffers, are data too. Shape mismatches
    raise with every offending key; the APT layers are the expected missing keys; every other
    missing key (e.g. MAE has no relative-position tables) is logged as a warning and returned.

    Returns:
        ``(missing_keys, unexpected_keys)`` other than the APT layers.
    """
    name = checkpoint if not isinstance(checkpoint, Mapping) else "a state dict"
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint, allow_pickle=allow_pickle, safe_globals=MMENGINE_CHECKPOINT_GLOBALS)
    state, layout, dropped = backbone_state_dict(checkpoint)
    missing, unexpected = load_state_dict_checked(model, state)
    own = model.state_dict()
    print_log(
        f"APTViT: loaded {sum(k in own for k in state)} tensors from {name}, a {layout} checkpoint; "
        f"{len(dropped)} keys of other modules ignored",
        logger="current",
    )
    if missing or unexpected:
        print_log(
            f"APTViT: missing keys (left at initialisation): {missing}; unexpected keys: {unexpected}",
            logger="current", level=logging.WARNING,
        )
    return missing, unexpected

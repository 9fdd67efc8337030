"""Checkpoint loading for APT detectors: loud on shape mismatches, explicit about APT layers.

detectron2's ``DetectionCheckpointer`` skips parameters whose shapes differ with a warning;
:class:`APTCheckpointer` raises instead. It also names the APT layers (the only keys a host
checkpoint cannot have) and drops EVA-02's RoPE buffers, which APTViT recomputes.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["APTCheckpointer", "is_apt_layer", "is_recomputed_buffer", "convert_eva02_pretrain", "load_backbone_checkpoint"]

logger = logging.getLogger(__name__)

_APT_LAYER = re.compile(r"(^|\.)patch_embed\.(downsample|detail)\.")
_ROPE_BUFFER = re.compile(r"(^|\.)(rope|rope_win|rope_glb)\.freqs_(cos|sin)$")


def is_apt_layer(key: str) -> bool:
    """The layers APT adds to a host ViT (absent from every host checkpoint)."""
    return bool(_APT_LAYER.search(key))


def is_recomputed_buffer(key: str) -> bool:
    """EVA-02's fixed RoPE tables; APTViT computes RoPE at token centres instead."""
    return bool(_ROPE_BUFFER.search(key))


class APTCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` for models with an APT backbone (see module docstring)."""

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        dropped = [k for k in state if is_recomputed_buffer(k)]
        for k in dropped:
            state.pop(k)
        if dropped:
            logger.info("Ignored %d RoPE buffers that APTViT recomputes (e.g. %s)", len(dropped), dropped[0])
        incompatible = super()._load_model(checkpoint)
        apt_missing = [k for k in incompatible.missing_keys if is_apt_layer(k)]
        if apt_missing:
            logger.info("APT layers not in the checkpoint (new, trained by APT fine-tuning): %s", apt_missing)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not is_apt_layer(k)]
        if incompatible.incorrect_shapes:
            # fvcore skipped these with a warning; a detector with silently re-initialised
            # weights is worse than no detector.
            raise ValueError(
                "checkpoint does not fit the model (shape mismatch); check the config's embed_dim, "
                "depth, num_heads, window_size/img_size (relative-position tables), pretrain_img_size "
                "(pos_embed) and num_classes against the checkpoint's:\n"
                + "\n".join(f"  {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in incompatible.incorrect_shapes)
            )
        return incompatible


def load_backbone_checkpoint(model: torch.nn.Module, path: str) -> APTCheckpointer:
    """Load ``path`` into a detectron2 model through :class:`APTCheckpointer`."""
    checkpointer = APTCheckpointer(model)
    checkpointer.load(path)
    return checkpointer


_PRETRAIN_ONLY = re.compile(r"^(mask_token|lm_head\.|norm\.|fc_norm\.|head\.|cls_token$|rel_pos_bias\.)")


def convert_eva02_pretrain(state: Mapping[str, torch.Tensor], prefix: str = "backbone.net.") -> tuple[dict, list[str]]:
    """EVA-02 pretraining weights (``eva02_*_p14to16.pt``: unprefixed, with ``mask_token``,
    ``lm_head.*`` and pretraining-size RoPE tables) to a detection checkpoint's ``backbone.net.*``.

    Returns:
        ``(state_dict, dropped_keys)``; every input key is either converted or listed as dropped.
    """
    for wrapper in ("model", "module", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    converted, dropped = {}, []
    for key, value in state.items():
        if _PRETRAIN_ONLY.search(key) or is_recomputed_buffer(key):
            dropped.append(key)
        else:
            converted[prefix + key] = value
    if not any(k.startswith(prefix + "blocks.") for k in converted):
        raise ValueError("no transformer blocks ('blocks.N.*') found: is this an EVA-02 pretraining checkpoint?")
    return converted, dropped

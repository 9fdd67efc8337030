"""Checkpoint loading for APT detectors: loud on shape mismatches, explicit about APT layers.

detectron2's ``DetectionCheckpointer`` skips parameters whose shapes differ with a warning;
:class:`APTCheckpointer` raises instead. It also names the APT layers (the only keys a host
checkpoint cannot have) and drops EVA-02's RoPE buffers, which APTViT recomputes.
"""
from __future__ import annotations

import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoints import is_apt_layer, is_recomputed_buffer

__all__ = ["APTCheckpointer", "load_backbone_checkpoint"]

logger = logging.getLogger(__name__)

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

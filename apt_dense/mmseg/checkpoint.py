"""EVA-02 segmentation checkpoints (mmseg 0.x) into the mmseg 1.x model with APT."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..checkpoints import is_apt_layer, is_recomputed_buffer

__all__ = ["convert_eva02_seg_checkpoint", "load_apt_checkpoint"]

logger = logging.getLogger(__name__)


def convert_eva02_seg_checkpoint(checkpoint: Mapping) -> tuple[dict, list[str]]:
    """mmseg 0.x EVA-02 UperNet checkpoint -> mmseg 1.x ``EncoderDecoder`` state dict.

    ``backbone.*``, ``decode_head.*`` (UPerHead) and ``auxiliary_head.*`` (FCNHead) keep their
    names in mmseg 1.x; EVA2's fixed RoPE tables (``backbone.rope.*``, ``backbone.blocks.*.attn.rope.*``)
    are dropped because APTViT recomputes RoPE at token centres.
    Returns:
        ``(state_dict, dropped_keys)``.
    """
    state = checkpoint
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    dropped = [k for k in state if is_recomputed_buffer(k)]
    converted = {k: v for k, v in state.items() if k not in dropped}
    if not any(k.startswith("backbone.blocks.") for k in converted):
        raise ValueError("no 'backbone.blocks.N.*' keys: is this an EVA-02 segmentation checkpoint?")
    return converted, dropped


def load_apt_checkpoint(model: torch.nn.Module, checkpoint: str | Mapping) -> tuple[list[str], list[str]]:
    """Load an EVA-02 segmentation checkpoint (file or dict) into ``model``.

    Shape mismatches raise with every offending key. Missing APT layers are expected (logged at
    info); any other missing or unexpected key is logged as a warning and returned.
    Returns:
        ``(missing_keys, unexpected_keys)`` other than the APT layers.
    """
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state, dropped = convert_eva02_seg_checkpoint(checkpoint)
    own = model.state_dict()
    bad = [f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(
            "checkpoint does not fit the model (shape mismatch); check embed_dim, depth, num_heads, "
            "img_size (pos_embed), decode/auxiliary head channels and num_classes:\n" + "\n".join(bad)
        )
    incompatible = model.load_state_dict(state, strict=False)
    apt_missing = [k for k in incompatible.missing_keys if is_apt_layer(k)]
    missing = [k for k in incompatible.missing_keys if not is_apt_layer(k)]
    if dropped:
        logger.info("Ignored %d RoPE buffers that APTViT recomputes", len(dropped))
    if apt_missing:
        logger.info("APT layers not in the checkpoint (new, trained by APT fine-tuning): %s", apt_missing)
    if missing:
        logger.warning("Missing keys (left at initialisation): %s", missing)
    if incompatible.unexpected_keys:
        logger.warning("Unexpected keys (not loaded): %s", incompatible.unexpected_keys)
    return missing, list(incompatible.unexpected_keys)

"""EVA-02 segmentation checkpoints (mmseg 0.x) into the mmseg 1.x model with APT."""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..checkpoints import is_recomputed_buffer, load_state_dict_checked, read_checkpoint, unwrap_state_dict
from ..openmmlab.runner import MMENGINE_CHECKPOINT_GLOBALS

__all__ = ["convert_eva02_seg_checkpoint", "load_apt_checkpoint"]


def convert_eva02_seg_checkpoint(checkpoint: Mapping) -> tuple[dict, list[str]]:
    """mmseg 0.x EVA-02 UperNet checkpoint -> mmseg 1.x ``EncoderDecoder`` state dict.

    ``backbone.*``, ``decode_head.*`` (UPerHead) and ``auxiliary_head.*`` (FCNHead) keep their
    names in mmseg 1.x; EVA2's fixed RoPE tables (``backbone.rope.*``, ``backbone.blocks.*.attn.rope.*``)
    are dropped because APTViT recomputes RoPE at token centres.
    Returns:
        ``(state_dict, dropped_keys)``.
    """
    state = unwrap_state_dict(checkpoint)
    dropped = [k for k in state if is_recomputed_buffer(k)]
    converted = {k: v for k, v in state.items() if not is_recomputed_buffer(k)}
    if not any(k.startswith("backbone.blocks.") for k in converted):
        raise ValueError("no 'backbone.blocks.N.*' keys: is this an EVA-02 segmentation checkpoint?")
    return converted, dropped


def load_apt_checkpoint(
    model: torch.nn.Module, checkpoint: str | os.PathLike | Mapping, *, allow_pickle: bool = False
) -> tuple[list[str], list[str]]:
    """Load an EVA-02 segmentation checkpoint (file or dict) into ``model`` (unwrapped, not DDP).

    Files are read as data (``allow_pickle=True`` for trusted legacy files); mmengine's training
    checkpoints, with their log buffers, are data too. Shape mismatches
    raise with every offending key; see :func:`apt_dense.checkpoints.load_state_dict_checked`.
    Returns:
        ``(missing_keys, unexpected_keys)`` other than the APT layers.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint, allow_pickle=allow_pickle, safe_globals=MMENGINE_CHECKPOINT_GLOBALS)
    state, _ = convert_eva02_seg_checkpoint(checkpoint)
    return load_state_dict_checked(getattr(model, "module", model), state)

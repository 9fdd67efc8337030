"""Checkpoint key rules shared by the framework adapters (no framework imports)."""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["is_apt_layer", "is_recomputed_buffer", "convert_eva02_pretrain"]

_APT_LAYER = re.compile(r"(^|\.)patch_embed\.(downsample|detail)\.")
_ROPE_BUFFER = re.compile(r"(^|\.)(rope|rope_win|rope_glb)\.freqs_(cos|sin)$")


def is_apt_layer(key: str) -> bool:
    """The layers APT adds to a host ViT (absent from every host checkpoint)."""
    return bool(_APT_LAYER.search(key))


def is_recomputed_buffer(key: str) -> bool:
    """EVA-02's fixed RoPE tables; APTViT computes RoPE at token centres instead."""
    return bool(_ROPE_BUFFER.search(key))


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

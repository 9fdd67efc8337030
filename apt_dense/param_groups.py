"""Layer ids for layer-wise learning-rate decay, shared by the framework adapters."""
from __future__ import annotations

from .checkpoints import is_apt_layer

__all__ = ["vit_layer_id", "layer_decay_scale"]

_EMBEDDING_NAMES = (".pos_embed", ".patch_embed", ".cls_token")


def vit_layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, ``i + 1`` for block ``i``, ``num_layers + 1`` for everything after
    the backbone (necks, heads) and for the APT layers, which are new and train from zero.

    Args:
        name: parameter name under a ``backbone`` prefix, e.g. ``backbone.net.blocks.3.mlp.w1.weight``.
    """
    if not name.startswith("backbone") or is_apt_layer(name):
        return num_layers + 1
    if any(part in name for part in _EMBEDDING_NAMES):
        return 0
    if ".blocks." in name and ".residual." not in name:
        return int(name[name.find(".blocks.") :].split(".")[2]) + 1
    return num_layers + 1


def layer_decay_scale(name: str, decay_rate: float, num_layers: int) -> float:
    """Learning-rate multiplier ``decay_rate ** (num_layers + 1 - layer_id)``."""
    return decay_rate ** (num_layers + 1 - vit_layer_id(name, num_layers))

"""Layer-wise learning-rate decay that knows the APT layers."""
from __future__ import annotations

from ..checkpoints import is_apt_layer
from ..param_groups import layer_decay_scale

__all__ = ["get_apt_vit_lr_decay_rate", "apt_layer_names"]


def get_apt_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    """detectron2's ``get_vit_lr_decay_rate``, except that the APT layers (new, trained from
    zero) get the full rate instead of the patch embedding's most-decayed one.

    Args:
        name: parameter name, e.g. ``backbone.net.blocks.3.attn.qkv.weight``.
    """
    return layer_decay_scale(name, lr_decay_rate, num_layers)


def apt_layer_names(model) -> list[str]:
    """Names of the APT layers' parameters in ``model`` (for the APT-only fine-tune)."""
    return [name for name, _ in model.named_parameters() if is_apt_layer(name)]

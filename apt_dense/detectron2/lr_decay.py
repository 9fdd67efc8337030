"""Layer-wise learning-rate decay that knows the APT layers."""
from __future__ import annotations

from ..checkpoints import is_apt_layer

__all__ = ["get_apt_vit_lr_decay_rate", "apt_layer_names"]


def get_apt_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    """detectron2's ``get_vit_lr_decay_rate``, except that the APT layers (new, trained from
    zero) get the full rate instead of the patch embedding's most-decayed one.

    Args:
        name: parameter name, e.g. ``backbone.net.blocks.3.attn.qkv.weight``.
    """
    layer_id = num_layers + 1
    if name.startswith("backbone") and not is_apt_layer(name):
        if ".pos_embed" in name or ".patch_embed" in name:
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def apt_layer_names(model) -> list[str]:
    """Names of the APT layers' parameters in ``model`` (for the APT-only fine-tune)."""
    return [name for name, _ in model.named_parameters() if is_apt_layer(name)]

"""Parameter groups shared by the framework adapters: layer ids for layer-wise learning-rate
decay, and the paper's APT-only fine-tune."""
from __future__ import annotations

import types

import torch.nn as nn

from .checkpoints import is_apt_layer

__all__ = ["vit_layer_id", "layer_decay_scale", "freeze_all_but_apt_layers"]

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


def freeze_all_but_apt_layers(model: nn.Module) -> list[str]:
    """The paper's APT-only fine-tune: every parameter except the APT layers stops training, and
    batch norms stay in eval mode (their running statistics are part of the frozen model).

    Call it before the model is wrapped in DistributedDataParallel: DDP fixes the set of
    parameters it reduces when it wraps the model.

    Returns:
        The names of the parameters that stay trainable.
    Raises:
        ValueError: the model has no APT layers.
    """
    trainable = [name for name, _ in model.named_parameters() if is_apt_layer(name)]
    if not trainable:
        raise ValueError(
            "apt_layers_only: the model has no APT layers (patch_embed.downsample/detail); its "
            "backbone must be APTViT with thresholds for patch sizes above the base size"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _keep_in_eval_mode(module)
    return trainable


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _keep_in_eval_mode(module: nn.Module) -> None:
    """A frozen batch norm keeps normalising with its running statistics and never updates them,
    so the frozen model is exactly the one that is evaluated."""
    module.train = types.MethodType(_frozen_train, module)
    module.eval()

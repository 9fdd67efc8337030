"""Layer-wise learning-rate decay for the APT backbone (mmseg's and mmdet's own constructors only
know their own backbones)."""
from __future__ import annotations

import logging

import torch.nn as nn
from mmengine.dist import get_world_size
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from ..checkpoints import is_apt_layer
from ..param_groups import freeze_all_but_apt_layers, layer_decay_scale, vit_layer_id

__all__ = ["APTLayerDecayOptimizerConstructor"]

logger = logging.getLogger(__name__)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class APTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg``: ``num_layers`` (blocks), ``layer_decay_rate``, and optionally
    ``apt_layers_only=True`` (the paper's short fine-tune: every parameter except the APT layers
    is frozen).

    Block ``i`` gets ``lr * rate ** (num_layers - i)``; embeddings ``lr * rate ** (num_layers + 1)``;
    the APT layers, the fpn and the heads the full lr. 1-D parameters, biases, ``pos_embed`` and
    ``cls_token`` get no weight decay.
    """

    def add_params(self, params: list[dict], module: nn.Module, **kwargs) -> None:
        num_layers = self.paramwise_cfg["num_layers"]
        decay_rate = self.paramwise_cfg.get("layer_decay_rate", 1.0)
        apt_only = self.paramwise_cfg.get("apt_layers_only", False)
        if apt_only:
            self._freeze(module)
        groups: dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith(".bias") or name.endswith(("pos_embed", "cls_token"))
            layer = vit_layer_id(name, num_layers)
            key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
            if key not in groups:
                groups[key] = {
                    "params": [], "param_names": [],
                    "lr": self.base_lr * layer_decay_scale(name, decay_rate, num_layers),
                    "weight_decay": 0.0 if no_decay else self.base_wd,
                }
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        logger.info("layer-decay groups: %s", {k: (g["lr"], len(g["params"])) for k, g in sorted(groups.items())})
        params.extend(groups.values())

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        """Freeze for the APT-only fine-tune; under DistributedDataParallel that must already
        have happened, before the model was wrapped (APTRunner does it)."""
        unfrozen = [name for name, p in module.named_parameters() if p.requires_grad and not is_apt_layer(name)]
        if unfrozen and get_world_size() > 1:
            raise RuntimeError(
                "apt_layers_only with several processes: the model must be frozen before "
                "DistributedDataParallel wraps it, or DDP waits for gradients that never come. Set "
                "runner_type = 'APTRunner' in the config (this project's configs do; "
                "tools/train_seg.py uses it)"
            )
        freeze_all_but_apt_layers(module)

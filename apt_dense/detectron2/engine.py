"""Training and evaluation helpers shared by ``tools/train_net.py`` and ``tools/eval_coco.py``."""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine.defaults import create_ddp_model as _create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..model import TokenStats
from .backbone import APTViT
from .lr_decay import apt_layer_names

__all__ = ["create_ddp_model", "find_apt_backbone", "evaluate", "register_coco_datasets", "freeze_all_but_apt_layers"]

logger = logging.getLogger("apt_dense")


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """detectron2's ``create_ddp_model`` (DistributedDataParallel when there are >1 processes),
    also for a model on the CPU (``launch`` then uses gloo): a CPU module takes no ``device_ids``."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _create_ddp_model(model, **kwargs)


def find_apt_backbone(model: torch.nn.Module) -> APTViT | None:
    """The APTViT inside a detector (unwrapping DistributedDataParallel), or None."""
    model = getattr(model, "module", model)
    for module in model.modules():
        if isinstance(module, APTViT):
            return module
    return None


def evaluate(cfg, model) -> OrderedDict:
    """``inference_on_dataset`` with the config's test loader and evaluator, plus APT's mean
    fraction of tokens kept (reported as task ``apt``)."""
    if "evaluator" not in cfg.dataloader:
        return OrderedDict()
    backbone = find_apt_backbone(model)
    if backbone is not None:
        backbone.token_stats = TokenStats()
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    results = OrderedDict(results or {})
    if backbone is not None:
        stats = backbone.token_stats
        counts = torch.tensor([stats.images, stats.tokens, stats.cells], dtype=torch.float64)
        images, tokens, cells = sum(comm.all_gather(counts)).tolist()
        kept = tokens / cells if cells else float("nan")
        results["apt"] = {"kept_fraction": kept, "images": int(images)}
        logger.info("APT: mean fraction of tokens kept %.4f", kept)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def register_coco_datasets(specs) -> None:
    """Register ``[(name, json_file, image_root), ...]`` with detectron2's COCO loader; a name
    registered before is replaced."""
    for name, json_file, image_root in specs or ():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)


def freeze_all_but_apt_layers(model: torch.nn.Module) -> list[str]:
    """The paper's APT-only fine-tune: everything but the APT layers stops training.

    Returns:
        The names of the parameters that stay trainable.
    """
    trainable = set(apt_layer_names(model))
    if not trainable:
        raise ValueError("the model has no APT layers to fine-tune (is its backbone APTViT with patch sizes > 16?)")
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sorted(trainable)

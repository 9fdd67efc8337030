#!/usr/bin/env python
"""Train an MMDetection 3.x detector with an APT backbone (mmdet's tools/train.py interface).

    python tools/train_det.py configs/mmdet/apt_vitdet_mask-rcnn_vit-b_1024_coco.py
    python -m torch.distributed.run --nproc_per_node 8 tools/train_det.py CONFIG --launcher pytorch
    python tools/train_det.py configs/mmdet/apt_eva02_cascade-mask-rcnn_vit-l_1536_coco_finetune.py \\
        --cfg-options load_from=eva02_L_cascade_mmdet.pth     # the paper's APT-only fine-tune
    python tools/train_det.py CONFIG --resume                 # continue the run in the work dir

Runs on apt_dense's APTRunner: the backbone's init_cfg checkpoint and then ``load_from`` are
loaded after weight initialisation (shapes must match, the APT layers are the only expected
missing keys), checkpoints are read as data, the APT-only fine-tune freezes before
DistributedDataParallel, and a work dir that already holds a run is resumed (``--resume``)
rather than overwritten. Without CUDA, ``--launcher pytorch`` runs on CPU processes with gloo.
``--data-root`` also points the COCO evaluators at the dataset's annotation file.
"""
import os.path as osp
import sys
from pathlib import Path

from mmengine.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_seg  # noqa: E402  (the same runner and options as the mmseg tools)


def point_evaluators_at_data_root(cfg: Config, args) -> None:
    """With ``--data-root``, each COCO evaluator reads its dataloader's annotation file there,
    unless ``--cfg-options`` sets the evaluator's own ``ann_file``."""
    if not args.data_root:
        return
    for split in ("val", "test"):
        evaluator, loader = cfg.get(f"{split}_evaluator"), cfg.get(f"{split}_dataloader")
        if not isinstance(evaluator, dict) or not loader or "ann_file" not in evaluator:
            continue
        if any(key.startswith(f"{split}_evaluator.") for key in args.cfg_options or {}):
            continue
        evaluator.ann_file = osp.join(args.data_root, loader.dataset.ann_file)


def prepare(cfg: Config, args) -> None:
    """COCO evaluators follow ``--data-root``; ``--unsafe-load`` also applies to the backbone's init_cfg."""
    point_evaluators_at_data_root(cfg, args)
    init_cfg = cfg.model.backbone.get("init_cfg")
    if args.unsafe_load and init_cfg:
        init_cfg.allow_pickle = True


if __name__ == "__main__":
    train_seg.main(description=__doc__, prepare=prepare)

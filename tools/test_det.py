#!/usr/bin/env python
"""Evaluate an MMDetection 3.x detector with an APT backbone: COCO bbox / segm AP and mean tokens kept.

    python tools/test_det.py configs/mmdet/apt_vitdet_mask-rcnn_vit-b_1024_coco.py CHECKPOINT
    python tools/test_det.py configs/mmdet/dense_vitdet_mask-rcnn_vit-b_1024_coco.py CHECKPOINT   # dense baseline
    python -m torch.distributed.run --nproc_per_node 8 tools/test_det.py CONFIG CHECKPOINT --launcher pytorch

Metrics, tokens kept included, are computed over the images of all processes.
"""
import argparse
import os
import sys
from pathlib import Path

from mmengine.dist import is_main_process

from apt_dense.mmdet import APTRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_det import point_evaluators_at_data_root  # noqa: E402
from train_seg import add_runner_args, load_config  # noqa: E402  (same handling as training)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("checkpoint", help="detector weights (mmdet key names: backbone.*, neck.*, rpn_head.*, roi_head.*)")
    add_runner_args(p)
    args = p.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args)
    point_evaluators_at_data_root(cfg, args)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    metrics = APTRunner.from_cfg(cfg).test()
    if is_main_process():
        print(", ".join(f"{k}: {float(v):.4f}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()

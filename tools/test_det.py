#!/usr/bin/env python
"""Evaluate an MMDetection 3.x detector with an APT backbone: COCO bbox / segm AP and mean tokens kept.

    python tools/test_det.py configs/mmdet/apt_vitdet_mask-rcnn_vit-b_1024_coco.py CHECKPOINT
    python tools/test_det.py configs/mmdet/dense_vitdet_mask-rcnn_vit-b_1024_coco.py CHECKPOINT   # dense baseline
    python -m torch.distributed.run --nproc_per_node 8 tools/test_det.py CONFIG CHECKPOINT --launcher pytorch

Metrics, tokens kept included, are computed over the images of all processes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_seg  # noqa: E402  (the same runner and options as the mmseg tools)
from train_det import point_evaluators_at_data_root  # noqa: E402

if __name__ == "__main__":
    test_seg.main(description=__doc__, prepare=point_evaluators_at_data_root)

"""Plain ViTDet-B (MAE, relative positions, 1024, window 14) Mask R-CNN with APT.

The model zoo's ViTDet backbone swapped for APTViT: window 14 cells admits 32 px patches
(threshold 2.0, the paper's detection value for 32 px). Loads ViTDet / MAE checkpoints unchanged.
"""
from apt_dense.detectron2 import swap_to_apt

from .common.vitdet_100ep import dataloader, lr_multiplier, model, optimizer, train

swap_to_apt(model, thresholds={32: 2.0})

"""ViTDet's Mask R-CNN 100-epoch recipe (model zoo model + schedule), with a layer-wise lr decay
that gives the new APT layers the full learning rate."""
from functools import partial

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from apt_dense.detectron2 import get_apt_vit_lr_decay_rate

from .coco_loader_lsj import dataloader

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
# APT-only fine-tune (paper: 5% of the schedule, lr / 10, everything but the APT layers frozen):
# train.apt_layers_only=True, see projects/apt_vitdet_l_finetune.py
train.apt_layers_only = False
train.max_iter = 184375  # 100 epochs at batch 64

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[163889, 177546], num_updates=train.max_iter
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_apt_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}

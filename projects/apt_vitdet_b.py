"""EVA-02-B Cascade Mask R-CNN at 1536 (window 32, global blocks 1,3,5,7,9,11) with APT:
patch sizes 16..128, the paper's detection thresholds {32: 2, 64: 2, 128: 0.3}.

EVA-02 detection checkpoints (backbone.net.*) load unchanged; its RoPE buffers are recomputed.
"""
from functools import partial

from apt_dense.detectron2 import get_apt_vit_lr_decay_rate, swap_to_apt

from .common.cascade_mask_rcnn_vitdet import dataloader, lr_multiplier, model, optimizer, train
from .common.coco_loader_lsj import lsj_train_augmentations, test_augmentations

image_size = 1536
swap_to_apt(model, thresholds={32: 2.0, 64: 2.0, 128: 0.3})
net = model.backbone.net
net.update(
    img_size=image_size, window_size=32, mlp_ratio=4 * 2 / 3, use_rel_pos=False,
    rope=True, pt_hw_seq_len=16, intp_freq=True, drop_path_rate=0.1,
    window_block_indexes=[0, 2, 4, 6, 8, 10],
)
model.backbone.square_pad = image_size

dataloader.train.mapper.augmentations = lsj_train_augmentations(image_size)
dataloader.test.mapper.augmentations = test_augmentations(image_size)
dataloader.train.total_batch_size = 128

train.init_checkpoint = ""  # an EVA-02 detection checkpoint, or a converted pretraining one
train.max_iter = 60000
optimizer.lr = 5e-5
optimizer.params.lr_factor_func = partial(get_apt_vit_lr_decay_rate, lr_decay_rate=0.7, num_layers=12)
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None
lr_multiplier.scheduler.milestones = [train.max_iter * 8 // 10, train.max_iter * 9 // 10]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 1000 / train.max_iter

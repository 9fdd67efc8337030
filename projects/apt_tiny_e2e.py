"""A tiny APT Mask R-CNN for CPU smoke runs (a few dozen iterations on 2 cores).

    python tools/make_tiny_coco.py /tmp/tiny_train --images 8 --seed 0
    python tools/make_tiny_coco.py /tmp/tiny_val --images 4 --seed 1
    python tools/train_net.py --config-file projects/apt_tiny_e2e.py \\
        --coco-dataset apt_tiny_train /tmp/tiny_train/instances.json /tmp/tiny_train/images \\
        --coco-dataset apt_tiny_val /tmp/tiny_val/instances.json /tmp/tiny_val/images
"""
from functools import partial

from detectron2.layers import ShapeSpec

from apt_dense.detectron2 import get_apt_vit_lr_decay_rate

from .apt_mask_rcnn_vitdet_b import dataloader, lr_multiplier, model, optimizer, train
from .common.coco_loader_lsj import lsj_train_augmentations, test_augmentations

image_size = 256
model.backbone.net.update(
    img_size=image_size, embed_dim=64, depth=2, num_heads=2, window_size=8, window_block_indexes=[0],
    drop_path_rate=0.0, thresholds={32: 4.0, 64: 4.0},
)
model.backbone.square_pad = image_size
# ViTDet's neck and heads, narrowed (256 -> 64 channels, fc 1024 -> 256): convolutions dominate on CPU
channels, fc_dim = 64, 256
model.backbone.out_channels = channels
model.proposal_generator.head.in_channels = channels
model.roi_heads.box_head.update(input_shape=ShapeSpec(channels=channels, height=7, width=7), conv_dims=[channels] * 4, fc_dims=[fc_dim])
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=fc_dim)
model.roi_heads.mask_head.update(input_shape=ShapeSpec(channels=channels, height=14, width=14), conv_dims=[channels] * 5)
model.roi_heads.num_classes = 2
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_predictor.test_score_thresh = 0.0  # a few dozen iterations give low scores
model.proposal_generator.pre_nms_topk = (200, 100)
model.proposal_generator.post_nms_topk = (100, 50)

dataloader.train.dataset.names = "apt_tiny_train"
dataloader.test.dataset.names = "apt_tiny_val"
dataloader.train.mapper.augmentations = lsj_train_augmentations(image_size)
dataloader.test.mapper.augmentations = test_augmentations(image_size)
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
dataloader.evaluator.use_fast_impl = False  # pycocotools; detectron2's C++ COCOeval needs its extension

train.update(device="cpu", max_iter=30, eval_period=30, log_period=10, init_checkpoint="", output_dir="./output/apt_tiny")
train.amp.enabled = False
train.ddp.fp16_compression = False
train.checkpointer.period = 1000

optimizer.lr = 2e-4
optimizer.params.lr_factor_func = partial(get_apt_vit_lr_decay_rate, num_layers=2, lr_decay_rate=0.7)
lr_multiplier.scheduler.milestones = [24, 28]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 5 / train.max_iter

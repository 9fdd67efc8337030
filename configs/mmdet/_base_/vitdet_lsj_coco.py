# ViTDet's COCO instance-segmentation recipe in mmdet (projects/ViTDet/configs/lsj-100e_coco-instance.py:
# large-scale jitter at 1024, 184375 iterations at batch 64) on APTRunner. Detector configs add the model.
_base_ = ["mmdet::_base_/datasets/coco_instance.py", "mmdet::_base_/default_runtime.py"]
custom_imports = dict(imports=["apt_dense.mmdet"], allow_failed_imports=False)
# Loads load_from after weight init, freezes before DDP, resumes safely, runs gloo on CPU.
runner_type = "APTRunner"
custom_hooks = [dict(type="APTTokenStatsHook")]

image_size = (1024, 1024)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="RandomResize", scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_type="absolute_range", crop_size=image_size, recompute_bbox=True, allow_negative_crop=True),
    dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type="Pad", size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="Pad", size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=4, num_workers=8, batch_sampler=None, dataset=dict(pipeline=train_pipeline))  # x 16 GPUs
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    type="AmpOptimWrapper",
    constructor="APTLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.7),
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
)
max_iters = 184375
interval = 5000
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type="MultiStepLR", begin=0, end=max_iters, by_epoch=False, milestones=[163889, 177546], gamma=0.1),
]
train_cfg = dict(
    type="IterBasedTrainLoop", max_iters=max_iters, val_interval=interval,
    dynamic_intervals=[(max_iters // interval * interval + 1, max_iters)])
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(by_epoch=False, save_last=True, interval=interval, max_keep_ckpts=5))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=64)

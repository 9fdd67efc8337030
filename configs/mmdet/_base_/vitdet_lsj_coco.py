# ViTDet's COCO instance-segmentation recipe in mmdet (projects/ViTDet/configs/lsj-100e_coco-instance.py:
# large-scale jitter at 1024, 184375 iterations at batch 64) on APTRunner. Detector configs add the model.
_base_ = ["mmdet::_base_/datasets/coco_instance.py", "mmdet::_base_/default_runtime.py"]
from apt_dense.mmdet.pipelines import letterbox_test_pipeline, lsj_train_pipeline  # noqa: E402  (after _base_)
custom_imports = dict(imports=["apt_dense.mmdet"], allow_failed_imports=False)
# Loads load_from after weight init, freezes before DDP, resumes safely, runs gloo on CPU.
runner_type = "APTRunner"
custom_hooks = [dict(type="APTTokenStatsHook")]

image_size = (1024, 1024)
train_pipeline = lsj_train_pipeline(image_size)
test_pipeline = letterbox_test_pipeline(image_size)
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

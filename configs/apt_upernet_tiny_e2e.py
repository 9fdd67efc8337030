# A tiny APT UperNet for CPU smoke runs on a small ADE20K-format folder (tools/make_tiny_ade20k.py):
#   python tools/make_tiny_ade20k.py /tmp/tiny_ade
#   python tools/train_seg.py configs/apt_upernet_tiny_e2e.py --data-root /tmp/tiny_ade
_base_ = ["./_base_/apt_upernet_eva02.py"]
data_root = "data/tiny_ade"  # or --data-root on the command line
crop_size = (128, 128)
norm_cfg = dict(type="BN", requires_grad=True)  # one process on CPU: no SyncBN
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=128, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.0, out_indices=[0, 1, 2, 3],
                  fpn_norm_cfg=norm_cfg, thresholds={32: 5.0}),
    decode_head=dict(in_channels=[64, 64, 64, 64], channels=64, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=32, norm_cfg=norm_cfg),
    test_cfg=dict(crop_size=crop_size, stride=(96, 96)),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=(512, 128), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(512, 160), keep_ratio=True),  # non-square, not a multiple of the crop
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-4), paramwise_cfg=dict(num_layers=4))
max_iters = 20
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=5),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=5, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=max_iters))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo"))

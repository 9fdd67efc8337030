# A tiny APT ViTDet Mask R-CNN for CPU smoke runs on a generated COCO-format folder:
#   python tools/make_tiny_coco.py /tmp/tiny_coco --images 8
#   python tools/train_det.py configs/mmdet/apt_vitdet_mask-rcnn_tiny_e2e.py --data-root /tmp/tiny_coco
_base_ = ["./apt_vitdet_mask-rcnn_vit-b_1024_coco.py"]
from apt_dense.mmdet.pipelines import letterbox_test_pipeline  # noqa: E402  (after _base_)
data_root = "data/tiny_coco/"  # or --data-root on the command line
image_size = (128, 128)
metainfo = dict(classes=("square", "disc"))
channels = 32
model = dict(
    data_preprocessor=dict(batch_augments=[dict(type="BatchFixedSizePad", size=image_size, pad_mask=True)]),
    backbone=dict(img_size=128, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.0, window_size=4,
                  window_block_indexes=[0, 2], init_cfg=None),
    neck=dict(backbone_channel=64, in_channels=[16, 32, 64, 64], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, conv_out_channels=channels, fc_out_channels=64, num_classes=2),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(in_channels=channels, conv_out_channels=channels, num_classes=2),
    ),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100), rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(max_per_img=20)),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="Pad", size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type="PackDetInputs"),
]
test_pipeline = letterbox_test_pipeline(image_size)
dataset = dict(data_root=data_root, ann_file="instances.json", data_prefix=dict(img="images/"), metainfo=metainfo)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(pipeline=train_pipeline, **dataset))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline, **dataset))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "instances.json")
test_evaluator = val_evaluator
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(lr=2e-4), paramwise_cfg=dict(num_layers=4))
max_iters = 20
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=5),
    dict(type="MultiStepLR", begin=0, end=max_iters, by_epoch=False, milestones=[15], gamma=0.1),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters, dynamic_intervals=None)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=max_iters))
env_cfg = dict(dist_cfg=dict(backend="gloo"))

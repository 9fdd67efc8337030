# EVA-02-L Cascade Mask R-CNN at 1536 with APT, the paper's COCO detection setting: window 32,
# global blocks 2, 5, ..., 23, patch sizes 16..128, thresholds {32: 2, 64: 2, 128: 0.3}.
# EVA-02's detectron2 recipe (eva2_coco_cascade_mask_rcnn_vitdet_l_8attn_win32_1536_lrd0p8) in mmdet:
# ViTDet's cascade heads (4 convs + 1 fc with LN, class-agnostic boxes), LSJ at 1536, 60k iterations at
# batch 128, lr 5e-5, layer decay 0.8. EVA-02's test-time soft-NMS and mask-ness scores are not in mmdet.
_base_ = ["mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py", "./_base_/vitdet_lsj_coco.py"]
from apt_dense.mmdet.pipelines import letterbox_test_pipeline, lsj_train_pipeline  # noqa: E402  (after _base_)

pixel_mean = [123.675, 116.28, 103.53]
pixel_std = [58.395, 57.12, 57.375]
norm_cfg = dict(type="APTLN2d", requires_grad=True)
image_size = (1536, 1536)
model = dict(
    data_preprocessor=dict(
        mean=pixel_mean, std=pixel_std, pad_size_divisor=32,
        batch_augments=[dict(type="BatchFixedSizePad", size=image_size, pad_mask=True)]),
    backbone=dict(
        _delete_=True,
        type="APTViT",
        block_type="eva02",
        img_size=1536,
        patch_size=16,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4 * 2 / 3,
        qkv_bias=True,
        drop_path_rate=0.4,
        norm_cfg=dict(type="LN", eps=1e-6),
        window_size=32,
        window_block_indexes=[i for i in range(24) if i % 3 != 2],
        use_act_checkpoint=True,
        # EVA-02 MIM weights converted to 16 px patches (baaivision/EVA), or an EVA-02 detector's
        init_cfg=dict(type="Pretrained", checkpoint="eva02_L_pt_m38m_p14to16.pt"),
        thresholds={32: 2.0, 64: 2.0, 128: 0.3},
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        input_format="RGB",
    ),
    neck=dict(
        _delete_=True,
        type="APTSimpleFPN",
        backbone_channel=1024,
        in_channels=[256, 512, 1024, 1024],
        out_channels=256,
        num_outs=5,
        norm_cfg=norm_cfg,
    ),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=[
            dict(
                type="Shared4Conv1FCBBoxHead",
                in_channels=256,
                conv_out_channels=256,
                fc_out_channels=1024,
                norm_cfg=norm_cfg,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=stds),
                reg_class_agnostic=True,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
            )
            for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])
        ],
        mask_head=dict(norm_cfg=norm_cfg),
    ),
)

train_pipeline = lsj_train_pipeline(image_size)
test_pipeline = letterbox_test_pipeline(image_size)
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))  # x 64 GPUs
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=5e-5), paramwise_cfg=dict(num_layers=24, layer_decay_rate=0.8))
max_iters = 60000
interval = 5000
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type="MultiStepLR", begin=0, end=max_iters, by_epoch=False, milestones=[48000, 54000], gamma=0.1),
]
train_cfg = dict(max_iters=max_iters, val_interval=interval, dynamic_intervals=None)
auto_scale_lr = dict(base_batch_size=128)

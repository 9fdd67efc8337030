# ViTDet Mask R-CNN, ViT-B (MAE, relative positions, window 14) at 1024 with APT: mmdet's
# projects/ViTDet/configs/vitdet_mask-rcnn_vit-b-mae_lsj-100e.py with the backbone swapped.
# A 14-cell window admits 32 px patches: the paper's detection threshold for 32 px, 2.0.
_base_ = ["mmdet::_base_/models/mask-rcnn_r50_fpn.py", "./_base_/vitdet_lsj_coco.py"]

pixel_mean = [123.675, 116.28, 103.53]
pixel_std = [58.395, 57.12, 57.375]
backbone_norm_cfg = dict(type="LN", requires_grad=True)  # eps 1e-5 (mmcv's default), as mmdet's ViTDet
norm_cfg = dict(type="APTLN2d", requires_grad=True)  # mmdet's LN2d: eps 1e-5, ConvModule names it norm_layer
model = dict(
    data_preprocessor=dict(
        mean=pixel_mean, std=pixel_std, pad_size_divisor=32,
        batch_augments=[dict(type="BatchFixedSizePad", size=(1024, 1024), pad_mask=True)]),
    backbone=dict(
        _delete_=True,
        type="APTViT",
        img_size=1024,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        norm_cfg=backbone_norm_cfg,
        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],
        use_rel_pos=True,
        init_cfg=dict(type="Pretrained", checkpoint="mae_pretrain_vit_base.pth"),
        # APT: the data preprocessor's normalisation is undone for scoring
        thresholds={32: 2.0},
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        input_format="RGB",
    ),
    neck=dict(
        _delete_=True,
        type="APTSimpleFPN",
        backbone_channel=768,
        in_channels=[192, 384, 768, 768],
        out_channels=256,
        num_outs=5,
        norm_cfg=norm_cfg,
    ),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(type="Shared4Conv1FCBBoxHead", conv_out_channels=256, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg),
    ),
)

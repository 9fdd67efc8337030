# UperNet + APT EVA-02-B on ADE20K at 512 (EVA-02's upernet_eva02_base_12_512_slide_60k, mmseg 1.x).
_base_ = [
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_80k.py",
]
custom_imports = dict(imports=["apt_dense.mmseg"], allow_failed_imports=False)
# Loads load_from after weight init, freezes before DDP, resumes safely, runs gloo on CPU.
runner_type = "APTRunner"

crop_size = (512, 512)
norm_cfg = dict(type="SyncBN", requires_grad=True)
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="APTViT",
        img_size=512,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4 * 2 / 3,
        qkv_bias=True,
        drop_path_rate=0.15,
        out_indices=[3, 5, 7, 11],
        fpn_norm_cfg=norm_cfg,
        # APT: the paper's segmentation setting, 32 px patches below 5.75 bits of entropy
        thresholds={32: 5.75},
        pixel_mean=data_preprocessor["mean"],
        pixel_std=data_preprocessor["std"],
        input_format="RGB",
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=768,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)

optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="APTLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.85),
)
max_iters = 60000
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=max_iters),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=6000)
default_hooks = dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=6000))
custom_hooks = [dict(type="APTTokenStatsHook")]
train_dataloader = dict(batch_size=8)  # x 4 GPUs, as EVA-02

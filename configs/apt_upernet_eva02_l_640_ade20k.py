# UperNet + APT EVA-02-L, ADE20K 640 (EVA-02's upernetpro_eva02_large_24_640_slide_80k).
_base_ = ["./apt_upernet_eva02_l_512_ade20k.py"]
crop_size = (640, 640)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=640),
    decode_head=dict(channels=1536),
    auxiliary_head=dict(channels=1536),
    test_cfg=dict(crop_size=crop_size, stride=(426, 426)),
)
# mmseg's ade20k_640x640 pipelines (a second dataset base would clash with the 512 one)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=(2560, 640), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2560, 640), keep_ratio=True),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

"""ViTDet's COCO data pipelines for a square canvas, as functions of its size: the configs at
1024, 1536 and the tiny CPU one share them instead of repeating them (mmengine fixes a base
config's variables when it parses it, so a size changed in a child would not reach the base's
pipelines). From mmdet's ``projects/ViTDet/configs/lsj-100e_coco-instance.py``."""
from __future__ import annotations

PAD_COLOR = (114, 114, 114)


def lsj_train_pipeline(image_size: tuple[int, int]) -> list[dict]:
    """Large-scale jitter: random flip, resize by 0.1..2.0 of ``image_size``, crop and pad to it."""
    return [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="RandomResize", scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
        dict(type="RandomCrop", crop_type="absolute_range", crop_size=image_size, recompute_bbox=True,
             allow_negative_crop=True),
        dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
        dict(type="Pad", size=image_size, pad_val=dict(img=PAD_COLOR)),
        dict(type="PackDetInputs"),
    ]


def letterbox_test_pipeline(image_size: tuple[int, int]) -> list[dict]:
    """Resize the longer side to ``image_size`` and pad bottom/right to it (the canvas APT merges)."""
    return [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=image_size, keep_ratio=True),
        dict(type="Pad", size=image_size, pad_val=dict(img=PAD_COLOR)),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]

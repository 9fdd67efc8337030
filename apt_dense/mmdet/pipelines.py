"""ViTDet's COCO data pipelines for a square canvas, as functions of its size: the configs at
1024, 1536 and the tiny CPU one share them instead of repeating them (mmengine fixes a base
config's variables when it parses it, so a size changed in a child would not reach the base's
pipelines). From mmdet's ``projects/ViTDet/configs/lsj-100e_coco-instance.py``, except that the
test pipeline pads with :class:`APTLetterboxPad`.
"""
from __future__ import annotations

from mmdet.datasets.transforms import Pad
from mmdet.registry import TRANSFORMS

__all__ = ["APTLetterboxPad", "PAD_COLOR", "letterbox_test_pipeline", "lsj_train_pipeline"]

PAD_COLOR = (114, 114, 114)


@TRANSFORMS.register_module()
class APTLetterboxPad(Pad):
    """mmdet's ``Pad`` to the canvas that keeps ``img_shape`` at the resized image's size, as
    padding in the data preprocessor does (``pad_shape`` is the canvas).

    The heads clip boxes to ``img_shape``. After mmdet's ``Pad`` that is the canvas, so a detection
    in the padding below or beside a non-square image survives, is rescaled beyond the original
    image, and mmdet's mask pasting on CPU (``_do_paste_mask(skip_empty=True)``, one box at a time)
    fails on a box wholly outside the image ("upper bound and lower bound inconsistent with step
    sign"), with adaptive patching or without. Clipped to the image, as detectron2's ViTDet clips
    them, every box lies on it.
    """

    def transform(self, results: dict) -> dict:
        image_shape = results["img_shape"]
        results = super().transform(results)
        results["img_shape"] = image_shape
        return results


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
    """Resize the longer side to ``image_size`` and pad bottom/right to it (the canvas APT merges);
    boxes are clipped to the image, not the canvas (:class:`APTLetterboxPad`)."""
    return [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=image_size, keep_ratio=True),
        dict(type="APTLetterboxPad", size=image_size, pad_val=dict(img=PAD_COLOR)),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]

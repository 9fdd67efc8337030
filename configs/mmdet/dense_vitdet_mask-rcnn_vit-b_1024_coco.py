# The dense baseline of apt_vitdet_mask-rcnn_vit-b_1024_coco: same weights and pipeline, no merging.
# With mmdet's released ViTDet-B checkpoint it is mmdet's ViTDet Mask R-CNN.
_base_ = ["./apt_vitdet_mask-rcnn_vit-b_1024_coco.py"]
model = dict(backbone=dict(adaptive=False))
find_unused_parameters = True  # the APT layers stay in the model (one checkpoint serves both) but are unused

"""COCO with large-scale jitter (ViTDet's recipe) on top of the model zoo's COCO loader."""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L


def lsj_train_augmentations(image_size):
    return [
        L(T.RandomFlip)(horizontal=True),
        L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
        L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
    ]


def test_augmentations(image_size):
    return [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]


dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = lsj_train_augmentations(1024)
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True  # boxes change with cropping
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = test_augmentations(1024)

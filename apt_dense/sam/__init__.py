"""Segment Anything plugin: an APT image encoder for SAM and SAM-HQ, builders and a swap.

``SamPredictor`` and ``SamAutomaticMaskGenerator`` (segment-anything's and sam-hq's) run
unchanged on the models built here::

    from apt_dense.sam import build_apt_sam_vit_b, swap_image_encoder
    sam = build_apt_sam_vit_b("sam_vit_b_01ec64.pth")          # a local checkpoint, read as data
    sam = swap_image_encoder(sam_model_registry["vit_b"]())    # or: a Sam built elsewhere

Importing this package needs ``segment-anything`` (``pip install 'apt-dense[sam]'``); the SAM-HQ
builders also need ``segment-anything-hq``. The core ``apt_dense`` package never imports them.
"""
try:
    import segment_anything  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without segment-anything
    raise ImportError(
        "apt_dense.sam needs segment-anything (and segment-anything-hq for SAM-HQ): "
        "pip install 'apt-dense[sam]', i.e. pip install segment-anything==1.0 segment-anything-hq==0.3 "
        f"(import failed: {err})"
    ) from err

from .build import (
    apt_sam_hq_model_registry,
    apt_sam_model_registry,
    build_apt_sam,
    build_apt_sam_hq_vit_b,
    build_apt_sam_hq_vit_h,
    build_apt_sam_hq_vit_l,
    build_apt_sam_vit_b,
    build_apt_sam_vit_h,
    build_apt_sam_vit_l,
    build_dense_sam,
    build_sam_pair,
    swap_image_encoder,
)
from .checkpoint import load_sam_checkpoint, read_sam_checkpoint
from .encoder import APTImageEncoderViT, APTImageEncoderViTHQ, check_sam_thresholds
from .images import check_image, sam_input

__all__ = [
    "APTImageEncoderViT",
    "APTImageEncoderViTHQ",
    "apt_sam_model_registry",
    "apt_sam_hq_model_registry",
    "build_apt_sam",
    "build_apt_sam_vit_b",
    "build_apt_sam_vit_l",
    "build_apt_sam_vit_h",
    "build_apt_sam_hq_vit_b",
    "build_apt_sam_hq_vit_l",
    "build_apt_sam_hq_vit_h",
    "build_dense_sam",
    "build_sam_pair",
    "check_image",
    "check_sam_thresholds",
    "load_sam_checkpoint",
    "read_sam_checkpoint",
    "sam_input",
    "swap_image_encoder",
]

"""Images as SAM takes them: the checks ``SamPredictor.set_image`` lacks, and the letterboxed,
normalised canvas it feeds the image encoder (for tools and benchmarks without a predictor)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from ..presets import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from ..sample_images import normalise

__all__ = ["check_image", "sam_input"]


def check_image(image: object, img_size: int = 1024) -> None:
    """Raise a clear error for images that ``SamPredictor.set_image`` would fail on deep inside
    (or, for float images outside 0..1, silently wrap): it takes ``(H, W, 3)`` uint8 pixels
    (float in 0..1 is scaled by 255), both sides non-zero and not so elongated that the resize of
    the longest side to ``img_size`` leaves the other at 0 pixels."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"SAM takes images as numpy arrays (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(f"grayscale image {tuple(image.shape)}: SAM takes RGB; convert it with "
                         "np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = "; drop the alpha channel with image[..., :3]" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise ValueError(f"SAM takes (H, W, 3) RGB images, got shape {tuple(image.shape)}{hint}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"the image is {h}x{w} pixels (empty); drop it")
    if np.issubdtype(image.dtype, np.floating):
        lo, hi = float(image.min()), float(image.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo and hi <= 1):
            raise ValueError(
                f"float image with values in [{lo:.4g}, {hi:.4g}]: SAM scales float images by 255, so they must "
                "lie in 0..1; pass uint8 0..255 pixels (image.clip(0, 255).round().astype(np.uint8))"
            )
    elif image.dtype != np.uint8:
        raise TypeError(f"SAM takes uint8 0..255 pixels, got {image.dtype}; convert them to uint8")
    short = min(ResizeLongestSide.get_preprocess_shape(h, w, img_size))
    if short == 0:
        raise ValueError(
            f"the image is {h}x{w}: resizing its longest side to {img_size} leaves the other at 0 pixels; "
            f"crop it to an aspect ratio below {2 * img_size}:1"
        )


def sam_input(
    image: np.ndarray,
    img_size: int = 1024,
    pixel_mean: Sequence[float] = IMAGENET_PIXEL_MEAN,
    pixel_std: Sequence[float] = IMAGENET_PIXEL_STD,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """What ``SamPredictor.set_image`` feeds the image encoder for an RGB image: the longest side
    resized to ``img_size`` with SAM's own ``ResizeLongestSide``, normalised, and zero-padded
    bottom/right to a square (``Sam.preprocess``).

    Returns:
        ``(1, 3, img_size, img_size)`` float32 and the resized content size ``(h, w)``.
    """
    check_image(image, img_size)
    resized = ResizeLongestSide(img_size).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).unsqueeze(0).float()
    h, w = x.shape[-2:]
    x = normalise(x, pixel_mean, pixel_std)
    return F.pad(x, (0, img_size - w, 0, img_size - h)), (h, w)

"""Real sample photographs and ViTDet-style letterboxing, for demos, tests and benchmarks."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SAMPLE_PHOTOS", "load_sample_photos", "letterbox"]

# Photographs bundled inside scikit-image (no download).
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def load_sample_photos(names: Sequence[str] = SAMPLE_PHOTOS) -> dict[str, np.ndarray]:
    """``{name: (H, W, 3) uint8}`` from scikit-image's bundled data."""
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("sample photos need scikit-image: pip install 'apt-dense[demo]'") from err
    return {name: np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]) for name in names}


def letterbox(
    image: np.ndarray, canvas: int, pixel_mean: Sequence[float] | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the longest side to ``canvas`` and pad bottom/right to a square, as ViTDet's LSJ
    pipeline does (detectron2 pads normalised images with zeros, i.e. raw ``pixel_mean``).

    Returns:
        ``(3, canvas, canvas)`` float32 raw 0..255 image (rounded to integers like a uint8 resize)
        and the resized content size ``(h, w)``.
    """
    h, w = image.shape[:2]
    scale = canvas / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255)[0]
    fill = torch.zeros(3) if pixel_mean is None else torch.as_tensor(pixel_mean, dtype=torch.float32)
    out = fill.view(3, 1, 1).expand(3, canvas, canvas).clone()
    out[:, :nh, :nw] = x
    return out, (nh, nw)

"""Real sample photographs and ViTDet-style letterboxing, for demos, tests and benchmarks."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SAMPLE_PHOTOS", "load_sample_photos", "load_image_folder", "letterbox", "normalise"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Photographs bundled inside scikit-image (no download).
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def load_sample_photos(names: Sequence[str] = SAMPLE_PHOTOS) -> dict[str, np.ndarray]:
    """``{name: (H, W, 3) uint8}`` from scikit-image's bundled data."""
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("sample photos need scikit-image: pip install 'apt-dense[demo]'") from err
    return {name: np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]) for name in names}


def load_image_folder(folder: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """``{file name: (H, W, 3) uint8}`` for the images in ``folder`` (sorted by name).

    Grayscale and RGBA/palette images are converted to RGB; files that cannot be read are
    skipped. Both are reported with a warning that names the file.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images: dict[str, np.ndarray] = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if limit is not None and len(images) >= limit:
            break
        try:
            with Image.open(path) as image:
                if image.mode != "RGB":
                    warnings.warn(f"{path.name}: {image.mode} image converted to RGB", stacklevel=2)
                    image = image.convert("RGB")
                images[path.name] = np.asarray(image)
        except (UnidentifiedImageError, OSError) as err:
            warnings.warn(f"{path.name}: skipped, cannot be read ({err})", stacklevel=2)
    if not images:
        raise ValueError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def normalise(raw: torch.Tensor, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> torch.Tensor:
    """``(B, 3, H, W)`` raw 0..255 -> ``(raw - mean) / std``."""
    mean = torch.as_tensor(pixel_mean, dtype=raw.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=raw.dtype).view(1, -1, 1, 1)
    return (raw - mean) / std


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

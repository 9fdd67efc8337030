"""Real sample photographs, image folders and ViTDet-style letterboxing, for demos, tests and
benchmarks."""
from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SAMPLE_PHOTOS", "load_sample_photos", "image_files", "read_image", "iter_image_folder", "load_image_folder",
    "image_source", "letterbox", "normalise",
]

logger = logging.getLogger(__name__)

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


def image_files(folder: str | Path) -> list[Path]:
    """The files in ``folder`` with an image suffix (``IMAGE_SUFFIXES``), sorted by name.
    Symbolic links are listed even when broken or looping: :func:`read_image` skips those with a
    warning, so that no file of the folder is dropped silently."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink()))


def _broken_link(path: Path) -> str | None:
    """Why the symbolic link ``path`` leads to no file, or None when it does (or is no link)."""
    if not path.is_symlink():
        return None
    try:
        target = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"a broken symbolic link (its target {os.readlink(path)} does not exist)"
    return None if stat.S_ISREG(target.st_mode) else f"a symbolic link to {os.readlink(path)}, which is not a file"


def _high_depth_to_uint8(image, name: str) -> np.ndarray | None:
    """``(H, W)`` uint8 from a 16/32-bit integer or float single-channel PIL image, scaled by its
    range, or None (with a warning) when the range is not one we can interpret."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if not np.isfinite(values).all():
            logger.warning("%s: skipped, float image with NaN or Inf pixels", name)
            return None
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0 and hi <= 1:
            logger.warning("%s: float image in 0..1 scaled by 255 and converted to RGB", name)
            values = values * 255
        elif lo >= 0 and hi <= 255:
            logger.warning("%s: float image with values up to %.4g read as 0..255 and converted to RGB", name, hi)
        else:
            logger.warning("%s: skipped, float pixel values span [%.4g, %.4g], neither 0..1 nor 0..255; "
                           "save it as an 8-bit image", name, lo, hi)
            return None
    else:
        # "I;16*" modes are 16-bit. "I" is 32-bit storage: older Pillow reads 16-bit PNGs so, and
        # TIFF says its bit depth in BitsPerSample (tag 258).
        bits = getattr(image, "tag_v2", {}).get(258, 16) if image.mode == "I" else 16
        bits = bits[0] if isinstance(bits, tuple) else int(bits)
        top = float(2**bits - 1)
        if values.min() < 0 or values.max() > top:
            logger.warning("%s: skipped, %d-bit image with values outside 0..%d; save it as an 8-bit image",
                           name, bits, int(top))
            return None
        logger.warning("%s: %d-bit image scaled to 8 bits (x 255/%d) and converted to RGB", name, bits, int(top))
        values = values * (255 / top)
    return np.round(values).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray | None:
    """``(H, W, 3)`` uint8 RGB pixels of one image file, or None when it is skipped.

    Other modes are converted, high bit depths scaled to 0..255 (16-bit by 255/65535, float in
    0..1 by 255). Unreadable files, broken or looping symbolic links and images over PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are skipped. Each conversion or skip logs one warning that
    names the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    broken = _broken_link(path)
    if broken:
        logger.warning("%s: skipped, %s", path.name, broken)
        return None
    with warnings.catch_warnings():
        # PIL only warns between the limit and twice the limit, then decodes the whole image.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                if image.mode == "RGB":
                    return np.array(image)
                if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                    gray = _high_depth_to_uint8(image, path.name)
                    return None if gray is None else np.repeat(gray[..., None], 3, axis=2)
                logger.warning("%s: %s image converted to RGB", path.name, image.mode)
                return np.array(image.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            logger.warning("%s: skipped, %s Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
                           path.name, err)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            logger.warning("%s: skipped, cannot be read (%s)", path.name, err)
    return None


def iter_image_folder(folder: str | Path, limit: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(file name, (H, W, 3) uint8)`` for up to ``limit`` readable images of ``folder``, read
    one at a time in name order (see :func:`read_image` for conversions and skips).

    Raises:
        ValueError: at the end, when no file could be read.
    """
    found = 0
    for path in image_files(folder):
        if limit is not None and found >= limit:
            return
        image = read_image(path)
        if image is not None:
            found += 1
            yield path.name, image
    if not found:
        raise ValueError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")


def load_image_folder(folder: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """``{file name: (H, W, 3) uint8}``: :func:`iter_image_folder` read at once."""
    return dict(iter_image_folder(folder, limit))


def image_source(folder: str | Path | None = None, limit: int | None = None) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
    """``(count, images)``: ``(name, (H, W, 3) uint8)`` pairs of up to ``limit`` images of ``folder``,
    read one at a time (:func:`iter_image_folder`), or of the sample photos when ``folder`` is
    None. ``count`` is how many are expected (image files, at most ``limit``), for progress lines."""
    if folder is None:
        photos = load_sample_photos(SAMPLE_PHOTOS[:limit])
        return len(photos), iter(photos.items())
    files = len(image_files(folder))
    return (files if limit is None else min(files, limit)), iter_image_folder(folder, limit)


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
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"letterbox takes (H, W, 3) RGB pixels, got shape {tuple(image.shape)}; "
                         "convert grayscale or RGBA images to RGB first (read_image does)")
    h, w = image.shape[:2]
    scale = canvas / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # A float32 copy: arrays from PIL are read-only, which torch.from_numpy warns about.
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255)[0]
    fill = torch.zeros(3) if pixel_mean is None else torch.as_tensor(pixel_mean, dtype=torch.float32)
    out = fill.view(3, 1, 1).expand(3, canvas, canvas).clone()
    out[:, :nh, :nw] = x
    return out, (nh, nw)

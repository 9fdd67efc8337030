"""Stage 1: per-patch content scores at every coarse level.

Every scorer maps a raw-intensity grayscale batch ``(B, H, W)`` (0..255 scale) to one score map
per coarse level ``k = 1..K``: ``(B, H / (p 2^k), W / (p 2^k))``. Lower score = more homogeneous
= more eligible for a large patch. All work is batched tensor ops on the input's device.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "GRAY_WEIGHTS",
    "CHANNEL_ORDERS",
    "check_channel_order",
    "pixel_statistics",
    "to_intensity",
    "intensity_extremes",
    "intensity_scale_problem",
    "EntropyScorer",
    "LaplacianScorer",
    "UpsampleMSEScorer",
    "CheckedScorer",
    "build_scorer",
]

# ITU-R 601 luma weights as used by the public APT code (not rounded to integers).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
CHANNEL_ORDERS = ("RGB", "BGR")


def check_channel_order(value: str, name: str = "channel_order") -> str:
    """``value`` if it is ``"RGB"`` or ``"BGR"`` (the order the grayscale weights are applied in)."""
    if value not in CHANNEL_ORDERS:
        raise ValueError(f"{name} must be 'RGB' or 'BGR', got {value!r}")
    return value


def pixel_statistics(
    pixel_mean: Sequence[float] | None, pixel_std: Sequence[float] | None, in_chans: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The input normalisation that scoring undoes, validated: two float32 ``(in_chans,)``
    tensors on the 0..255 scale, or ``(None, None)`` for raw 0..255 inputs."""
    _check_both_or_neither(pixel_mean, pixel_std)
    return _per_channel("pixel_mean", pixel_mean, in_chans), _per_channel("pixel_std", pixel_std, in_chans)


def _check_both_or_neither(pixel_mean: object, pixel_std: object) -> None:
    if (pixel_mean is None) != (pixel_std is None):
        raise ValueError("give both pixel_mean and pixel_std (to undo normalisation for scoring), or neither")


def _per_channel(name: str, values: Sequence[float] | None, in_chans: int) -> torch.Tensor | None:
    if values is None:
        return None
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    if isinstance(values, numbers.Real):
        raise TypeError(
            f"{name} must give one value per input channel (0..255 scale), got the scalar {values!r}; "
            f"for the same value on every channel pass ({values!r},) * {in_chans}"
        )
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of {in_chans} numbers (0..255 scale), got {values!r}")
    if len(values) != in_chans:
        raise ValueError(f"{name} has {len(values)} values for {in_chans} input channels; give one per channel")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite numbers (0..255 scale), got {values!r}")
    if name == "pixel_std" and not all(v > 0 for v in values):
        raise ValueError(
            f"pixel_std must be positive (it divides the pixels, and scoring multiplies by it to undo "
            f"normalisation), got {values!r}; use 1.0 for channels that are not scaled"
        )
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def to_intensity(
    images: torch.Tensor,
    pixel_mean: Sequence[float] | torch.Tensor | None = None,
    pixel_std: Sequence[float] | torch.Tensor | None = None,
    channel_order: str = "RGB",
) -> torch.Tensor:
    """Grayscale intensities on the raw 0..255 scale.

    Args:
        images: ``(B, C, H, W)`` float; raw 0..255 values, or normalised values when
            ``pixel_mean``/``pixel_std`` (0..255 scale, one per channel) are given to undo.
        channel_order: ``"RGB"`` or ``"BGR"`` (detectron2's yacs default), for three channels.
    Returns:
        ``(B, H, W)`` float32. Images with one channel are used as they are; three channels are
        combined with :data:`GRAY_WEIGHTS`.
    """
    check_channel_order(channel_order)
    _check_both_or_neither(pixel_mean, pixel_std)
    x = images.float()
    if pixel_mean is not None:
        # Pass tensors already on the images' device to avoid a host-to-device copy per call.
        mean = torch.as_tensor(pixel_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(pixel_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        # Snap to 1/256: the float round trip leaves ~1e-5 noise, which moves integer pixels
        # (the usual case) across histogram bin edges; on this grid they come back exactly.
        x = torch.round((x * std + mean) * 256.0) / 256.0
    if x.shape[1] == 1:
        return x[:, 0]
    if x.shape[1] != 3:
        raise ValueError(f"scoring needs 1 or 3 channels, got {x.shape[1]}")
    r, g, b = x.unbind(1) if channel_order == "RGB" else x.unbind(1)[::-1]
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


# Scale check. Scorers and their thresholds assume intensities on the raw 0..255 scale; inputs on
# another scale make every patch look flat (all merge) or saturate the histogram. The check reads
# the batch's grayscale extremes, which travel with the layout's one host sync.
# - Too dark: normalised inputs top out at (255 - mean) / std, 2.64 for ImageNet statistics, about
#   2.2 for CLIP's, 1.0 for [-1, 1] and 0..1 scaling; grayscale, a weighted mean, is no higher. A
#   genuine photo whose brightest pixel is below 4 / 255 (1.6% of full scale) is black to the eye,
#   so 4 leaves a 1.5x margin on both sides.
# - Too bright: undone normalised inputs stop at 255, and augmentation overshoot (bicubic resizing,
#   colour jitter) or even standard-normal test inputs (5 sigma: 123 + 5 * 58 = 413) stay far below
#   1000. Raw 0..255 input with ImageNet statistics undoes to up to 255 * 57 + 117 = 14,700; a dark
#   raw photo whose brightest pixel is 16 already exceeds 1000. Mean-only normalisation (std 1)
#   stays in range and cannot be told apart.
# - Constant batches (black frames, canvases of padding) score the same on every scale: no warning.
# The extremes are snapped to 1/256 (the grid to_intensity snaps to) and clamped to +-2**31 so
# they fit int64 next to the layout's counts.
_DARKEST_MAX_INTENSITY = 4.0
_BRIGHTEST_MAX_INTENSITY = 1000.0
_EXTREMES_SCALE = 256.0


def intensity_extremes(gray: torch.Tensor) -> torch.Tensor:
    """``(2,)`` int64 on the device: min and max of a grayscale batch in 1/256 steps (no sync)."""
    low, high = torch.aminmax(gray.flatten(), dim=0)  # over one dim: the form ONNX export translates
    return (torch.stack([low, high]).clamp(-(2.0**31), 2.0**31) * _EXTREMES_SCALE).round().long()


def intensity_scale_problem(extremes: Sequence[int], undone: bool) -> str | None:
    """What is wrong with the inputs' scale, from host :func:`intensity_extremes`, or None.

    Args:
        extremes: ``(min, max)`` as returned by :func:`intensity_extremes`, on the host.
        undone: ``pixel_mean``/``pixel_std`` were given and undone before measuring.
    """
    low, high = (v / _EXTREMES_SCALE for v in extremes)
    if high <= low:
        return None
    if high < _DARKEST_MAX_INTENSITY:
        if undone:
            return (
                f"the brightest grayscale value is {high:.2f} on the 0..255 scale after undoing "
                f"pixel_mean/pixel_std, so every patch looks flat and merges: give pixel_mean/pixel_std "
                f"on the 0..255 scale (e.g. apt_dense.presets.IMAGENET_PIXEL_MEAN/STD) as the inputs "
                f"were normalised with, or feed raw 0..255 pixels without them"
            )
        return (
            f"inputs look normalised or scaled to 0..1 (brightest grayscale value {high:.2f} on the "
            f"0..255 scale), so every patch looks flat and merges: pass pixel_mean/pixel_std "
            f"(0..255 scale) so APT can undo the normalisation, or feed raw 0..255 pixels"
        )
    if high > _BRIGHTEST_MAX_INTENSITY:
        if undone:
            return (
                f"values reach {high:.0f} after undoing pixel_mean/pixel_std (raw pixels stop at "
                f"255): inputs look raw 0..255, not normalised; drop pixel_mean/pixel_std, or "
                f"normalise the inputs with them"
            )
        return (
            f"values reach {high:.0f} (8-bit pixels stop at 255), beyond the scorer's 0..255 "
            f"scale: rescale the inputs to 0..255 (e.g. 16-bit images / 257)"
        )
    return None


def _sum_pool2x(x: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, ...) -> (B, h/2, w/2, ...)``: sum of each 2x2 block of cells."""
    b, h, w = x.shape[:3]
    return x.view(b, h // 2, 2, w // 2, 2, *x.shape[3:]).sum(dim=(2, 4))


class EntropyScorer:
    """Shannon entropy (bits) of the per-patch intensity histogram.

    Matches the public APT code: ``histc(bins, min=lo, max=hi)`` of the unrounded grayscale value,
    ``p = count / pixels``, ``H = -sum p log2(p + 1e-10)``. Values outside ``[lo, hi]`` are not
    counted (as ``histc`` does). Histograms are binned once at the finest coarse level and
    sum-pooled for coarser levels, so memory is ``B * (H/2p) * (W/2p) * bins`` counts.
    """

    def __init__(self, bins: int = 512, value_range: tuple[float, float] = (0.0, 255.0)):
        if bins < 2:
            raise ValueError(f"entropy needs at least 2 bins, got {bins}")
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.bins = int(bins)
        self.value_range = (float(lo), float(hi))

    def bin_index(self, gray: torch.Tensor) -> torch.Tensor:
        """Bin of each value as ``torch.histc`` computes it; ``bins`` marks values out of range."""
        lo, hi = self.value_range
        # Same float32 expression and order as histc's kernel, so bin edges agree bit for bit.
        idx = ((gray - lo) * self.bins / (hi - lo)).long().clamp_(max=self.bins - 1)
        outside = (gray < lo) | (gray > hi) | torch.isnan(gray)
        return idx.masked_fill_(outside, self.bins)

    def histograms(self, gray: torch.Tensor, patch: int) -> torch.Tensor:
        """Counts ``(B, H/patch, W/patch, bins)`` (float32) of ``patch x patch`` blocks."""
        b, h, w = gray.shape
        hp, wp = h // patch, w // patch
        idx = self.bin_index(gray)
        cell = (
            torch.arange(hp, device=gray.device).repeat_interleave(patch).view(1, h, 1) * wp
            + torch.arange(wp, device=gray.device).repeat_interleave(patch).view(1, 1, w)
        )
        slots = self.bins + 1
        flat = (torch.arange(b, device=gray.device).view(b, 1, 1) * (hp * wp) + cell) * slots + idx
        # index_put_ with accumulate, not bincount: CUDA bincount reads the max back to the host.
        counts = torch.zeros(b * hp * wp * slots, dtype=torch.float32, device=gray.device)
        counts.index_put_((flat.flatten(),), torch.ones((), device=gray.device).expand(flat.numel()), accumulate=True)
        return counts.view(b, hp, wp, slots)[..., : self.bins]

    def __call__(self, gray: torch.Tensor, base_patch_size: int, num_levels: int) -> list[torch.Tensor]:
        if num_levels == 0:
            return []
        hist = self.histograms(gray, base_patch_size * 2)
        scores = []
        for k in range(1, num_levels + 1):
            if k > 1:
                hist = _sum_pool2x(hist)
            pixels = float((base_patch_size << k) ** 2)
            p = hist / pixels
            scores.append(-(p * torch.log2(p + 1e-10)).sum(-1))
        return scores


def _mean_pool_levels(per_pixel: torch.Tensor, base_patch_size: int, num_levels: int) -> list[torch.Tensor]:
    """Per-patch means ``(B, H/(p 2^k), W/(p 2^k))`` of a ``(B, H, W)`` map for ``k = 1..K``."""
    level = F.avg_pool2d(per_pixel.unsqueeze(1), base_patch_size * 2).squeeze(1)
    out = [level]
    for _ in range(2, num_levels + 1):
        level = F.avg_pool2d(level.unsqueeze(1), 2).squeeze(1)
        out.append(level)
    return out


class LaplacianScorer:
    """Mean absolute 8-neighbour Laplacian of ``gray / 255`` per patch (edge-replicated border)."""

    def __call__(self, gray: torch.Tensor, base_patch_size: int, num_levels: int) -> list[torch.Tensor]:
        if num_levels == 0:
            return []
        kernel = torch.ones(1, 1, 3, 3, dtype=gray.dtype, device=gray.device)
        kernel[0, 0, 1, 1] = -8.0
        x = F.pad((gray / 255.0).unsqueeze(1), (1, 1, 1, 1), mode="replicate")
        response = F.conv2d(x, kernel).abs().squeeze(1)
        return _mean_pool_levels(response, base_patch_size, num_levels)


class UpsampleMSEScorer:
    """Per-patch mean squared error between ``gray / 255`` and its area-downsampled (by ``2^k``),
    bilinearly re-upsampled copy: how much a level-``k`` patch loses when represented at the base
    resolution."""

    def __call__(self, gray: torch.Tensor, base_patch_size: int, num_levels: int) -> list[torch.Tensor]:
        x = (gray / 255.0).unsqueeze(1)
        scores = []
        for k in range(1, num_levels + 1):
            factor = 1 << k
            low = F.avg_pool2d(x, factor)
            up = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
            err = (x - up).square()
            scores.append(F.avg_pool2d(err, base_patch_size << k).squeeze(1))
        return scores


_SCORERS = {"entropy": EntropyScorer, "laplacian": LaplacianScorer, "upsample_mse": UpsampleMSEScorer}


class CheckedScorer:
    """A scorer given as a callable, whose output is checked on every call (host metadata only,
    no device sync): a wrong return is an error that names the scorer and the shapes expected,
    not an index error deep inside the layout."""

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__qualname__", type(fn).__name__)

    def __call__(self, gray: torch.Tensor, base_patch_size: int, num_levels: int) -> list[torch.Tensor]:
        scores = self.fn(gray, base_patch_size, num_levels)
        b, h, w = gray.shape
        shapes = [(b, h // (base_patch_size << k), w // (base_patch_size << k)) for k in range(1, num_levels + 1)]
        contract = (
            f"a scorer returns a list of {num_levels} tensors, scores[k-1] of shape (B, H / (p 2^k), W / (p 2^k)), "
            f"here {shapes}, on the input's device ({gray.device})"
        )
        if not isinstance(scores, (list, tuple)):
            raise TypeError(f"scorer {self.name} returned {type(scores).__name__}; {contract}")
        if len(scores) != num_levels:
            raise ValueError(f"scorer {self.name} returned {len(scores)} score maps; {contract}")
        for k, (score, shape) in enumerate(zip(scores, shapes), start=1):
            what = f"scorer {self.name}'s scores[{k - 1}]"
            if not isinstance(score, torch.Tensor):
                raise TypeError(
                    f"{what} is a {type(score).__name__}, not a torch.Tensor; convert it with "
                    f"torch.as_tensor(score, device=gray.device) ({contract})"
                )
            if tuple(score.shape) != shape or score.device != gray.device:
                raise ValueError(f"{what} has shape {tuple(score.shape)} on {score.device}; {contract}")
            if score.is_complex() or score.dtype == torch.bool:
                raise TypeError(f"{what} has dtype {score.dtype}; scores must be real numbers (float)")
        return list(scores)


def build_scorer(scorer: "str | object", **kwargs) -> object:
    """A scorer from its name (``entropy``, ``laplacian``, ``upsample_mse``) or a callable with
    the scorer signature ``(gray, base_patch_size, num_levels) -> list[Tensor]`` (its output is
    checked on every call, see :class:`CheckedScorer`)."""
    if isinstance(scorer, str):
        if scorer not in _SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; choose one of {sorted(_SCORERS)}")
        return _SCORERS[scorer](**kwargs)
    if not callable(scorer):
        raise TypeError(f"scorer must be a name or a callable, got {type(scorer).__name__}")
    if kwargs:
        raise ValueError("scorer options apply only when the scorer is given by name")
    return scorer if isinstance(scorer, (*_SCORERS.values(), CheckedScorer)) else CheckedScorer(scorer)

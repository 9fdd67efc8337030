"""Stages 1-2: the non-learned half of APT, from images to a packed token layout.

1. scores: grayscale intensities on the raw 0..255 scale (the input normalisation undone), one
   score map per coarse level (``scoring.py``);
2a. levels: the quadtree rule with the schedule's thresholds (``schedule.py``);
2b. layout: tokens counted on the device, the one host sync, packing (``layout.py``).

The host sync carries the token counts together with the input checks that need pixel values:
non-finite pixels (an error) and, until it has warned once, the intensity scale (a warning).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .arguments import integer
from .layout import PatchLayout, PendingLayout
from .schedule import PatchSchedule, select_levels
from .scoring import (
    build_scorer, check_channel_order, intensity_extremes, intensity_scale_problem, pixel_statistics, to_intensity,
)

__all__ = ["TokenPlanner", "InputScaleWarning"]


class InputScaleWarning(UserWarning):
    """Inputs do not look like the scale ``pixel_mean``/``pixel_std`` imply (issued once per model)."""


class TokenPlanner(nn.Module):
    """Chooses a patch size for every region of a batch and lays the tokens out for attention.

    It has no learned parameters. It is a module so that its pixel statistics follow
    ``model.to(device)`` (as non-persistent buffers, outside state dicts).

    Args:
        patch_size: the host ViT's patch size ``p`` in pixels.
        thresholds: ``{patch_size: threshold}`` for every coarse size, e.g.
            ``{32: 2.0, 64: 2.0, 128: 0.3}``; None means base patches only. Keys may be digit
            strings (JSON/YAML) and values numpy or 0-d torch scalars.
        adaptive: False plans every cell as a base patch, without scoring.
        window_size: window side in cells for window attention (0: none); a multiple of the
            largest patch, so that no patch crosses a window.
        scorer: ``"entropy"`` (default; raw 0..255, 512-bin histogram), ``"laplacian"``,
            ``"upsample_mse"`` or a callable ``(gray, p, K) -> list[Tensor]``.
        scorer_kwargs: options of a named scorer (e.g. ``{"bins": 256}`` for entropy).
        pixel_mean, pixel_std: per-channel normalisation of the input on the 0..255 scale,
            undone for scoring; None when inputs are raw 0..255 pixels.
        input_format: channel order of the input, ``"RGB"`` or ``"BGR"``.
        in_chans: channels of the input.
    """

    def __init__(
        self,
        *,
        patch_size: int = 16,
        thresholds: Mapping[int, float] | None = None,
        adaptive: bool = True,
        window_size: int = 0,
        scorer: str | object = "entropy",
        scorer_kwargs: Mapping[str, object] | None = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        input_format: str = "RGB",
        in_chans: int = 3,
    ):
        super().__init__()
        self.schedule = PatchSchedule.create(patch_size, thresholds)
        self.adaptive = adaptive
        self.window_size = integer("window_size", window_size, 0, "use 0 for no window attention")
        self.in_chans = integer("in_chans", in_chans, 1)
        self.input_format = check_channel_order(input_format, "input_format")
        self.scorer = build_scorer(scorer, **dict(scorer_kwargs or {}))
        mean, std = pixel_statistics(pixel_mean, pixel_std, in_chans)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self._input_scale_warned = False
        window, patch = self.window_size, self.patch_size
        if window % (1 << self.schedule.num_levels):
            largest = self.schedule.largest_patch_size
            fits = patch * (window & -window)  # the largest power-of-two divisor
            raise ValueError(
                f"window_size {window} cells ({window * patch} px) is not a "
                f"multiple of the largest patch ({largest} px = {largest // patch} cells), so "
                f"patches would cross windows; drop patch sizes above {fits} px or use a window "
                f"that is a multiple of {largest // patch} cells"
            )

    @property
    def patch_size(self) -> int:
        return self.schedule.base_patch_size

    @property
    def merges(self) -> bool:
        """Adaptive patching is on and there is at least one coarse patch size."""
        return self.adaptive and self.schedule.num_levels > 0

    @property
    def levels(self) -> int:
        """The coarsest level a plan can hold (0 when nothing merges)."""
        return self.schedule.num_levels if self.merges else 0

    @property
    def size_divisibility(self) -> int:
        """Image sides must be multiples of this: the largest patch, or the patch when nothing merges."""
        return self.patch_size << self.levels

    def check_images(self, images: torch.Tensor) -> None:
        """A non-empty float ``(B, in_chans, H, W)`` tensor with real data (no device sync)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        if images.is_meta:
            raise ValueError(
                "images are on the meta device (shapes, no data), but APT chooses patches from pixel "
                "values and sizes its token tensors from them: pass real images (e.g. on 'cpu' or 'cuda')"
            )
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError("empty batch: images has batch size 0; pass at least one image")
        if h == 0 or w == 0:
            unit = self.size_divisibility
            raise ValueError(
                f"images are {h}x{w} pixels; drop empty images, or pad them (bottom/right) to at least "
                f"{unit}x{unit}"
            )
        if c != self.in_chans:
            raise ValueError(
                f"images have {c} channels but the model expects {self.in_chans}; convert them "
                f"(e.g. grayscale to RGB with images.expand(-1, 3, -1, -1)) or set in_chans"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images have integer dtype {images.dtype}; convert with images.float() (raw 0..255, "
                "or normalised with the model's pixel_mean/pixel_std)"
            )

    def check_size(self, images: torch.Tensor) -> None:
        """Sides are multiples of :attr:`size_divisibility` (checked images only)."""
        h, w = images.shape[-2:]
        unit = self.size_divisibility
        if h % unit or w % unit:
            what = "the largest patch size" if self.merges else "the patch size"
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {what} ({unit} px); pad the images "
                f"(bottom/right) to {-(-h // unit) * unit}x{-(-w // unit) * unit}"
            )

    def intensity(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` float32 grayscale on the raw 0..255 scale that the scorers expect."""
        return to_intensity(images, self.pixel_mean, self.pixel_std, self.input_format)

    def scores(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Stage 1 alone: ``scores[k-1]`` is ``(B, H / (p 2^k), W / (p 2^k))`` (to reuse across
        thresholds with :meth:`plan_scores`)."""
        return self.scorer(self.intensity(images), self.patch_size, self.schedule.num_levels)

    def cell_levels(
        self, images: torch.Tensor, gray: torch.Tensor | None = None, thresholds: Sequence | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stages 1-2a on the device, no host sync: ``(B, Hc, Wc)`` int64 level per cell (zeros
        when nothing merges). ``gray``: :meth:`intensity` of ``images``, if already computed;
        ``thresholds``: per-level thresholds instead of the schedule's (a ``(K,)`` tensor in
        exported programs, where they are an input)."""
        if not self.merges:
            b, _, h, w = images.shape
            grid = (h // self.patch_size, w // self.patch_size)
            return torch.zeros(b, *grid, dtype=torch.int64, device=images.device)
        gray = self.intensity(images) if gray is None else gray
        scores = self.scorer(gray, self.patch_size, self.schedule.num_levels)
        return select_levels(scores, self.schedule.thresholds if thresholds is None else thresholds)

    # Planning is host-side work on pixel values and ends in the host sync that sizes every
    # token tensor: always eager, also when called from compiled code.
    @torch.compiler.disable
    def forward(self, images: torch.Tensor) -> PatchLayout:
        """Plan a batch of ``(B, C, H, W)`` images, normalised as ``pixel_mean``/``pixel_std``
        say, sides multiples of :attr:`size_divisibility`. One host sync."""
        self.check_images(images)
        self.check_size(images)
        checks = [(~torch.isfinite(images)).any().view(1).long()]
        check_scale = self.merges and not self._input_scale_warned
        with torch.no_grad():
            gray = self.intensity(images) if self.merges else None
            if check_scale:
                checks.append(intensity_extremes(gray))
            cell_level = self.cell_levels(images, gray)
        layout, (non_finite, *extremes) = self._pack(cell_level, checks)
        if non_finite:
            raise ValueError("images contain NaN or Inf pixels; clean or drop those images before the model")
        if check_scale:
            problem = intensity_scale_problem(extremes, undone=self.pixel_mean is not None)
            if problem is not None:
                self._input_scale_warned = True
                warnings.warn(f"apt_dense: {problem} (warned once per model)", InputScaleWarning, stacklevel=2)
        return layout

    def plan_scores(self, scores: Sequence[torch.Tensor]) -> PatchLayout:
        """Stage 2 alone: the layout of :meth:`scores` under this planner's thresholds."""
        layout, _ = self._pack(select_levels(scores, self.schedule.thresholds), [])
        return layout

    def _pack(self, cell_level: torch.Tensor, checks: list[torch.Tensor]) -> tuple[PatchLayout, list[int]]:
        pending = PendingLayout.from_levels(cell_level, self.window_size)
        num_counts = len(pending.counts)
        # The one host sync: the token counts (they size the token tensors and the kernels' max
        # sequence lengths) and the device-side checks travel in a single transfer.
        values = torch.cat([pending.counts, *checks]).tolist()
        return pending.pack(values[:num_counts], self.levels), values[num_counts:]

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, thresholds={self.schedule.threshold_map()}, adaptive={self.adaptive}, "
                f"window_size={self.window_size}, input_format={self.input_format!r}")

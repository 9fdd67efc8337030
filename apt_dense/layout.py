"""Stage 2: from per-level scores to a packed token layout.

Tokens of a batch are ordered image-major, then window-major (windows in raster order, cells of
a window in raster order, a patch placed at its top-left cell). The same order serves global
blocks (one sequence per image) and window blocks (one sequence per window), only the sequence
boundaries differ. Windows follow ViTDet: the cell grid is zero-padded on the bottom/right to a
multiple of the window; the padded cells take part in window attention as zero vectors, so
window blocks see padding slots that are not tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .schedule import select_levels

__all__ = ["PackedSequences", "PatchLayout", "select_levels", "build_layout", "prepend_image_tokens"]


@dataclass(eq=False)
class PackedSequences:
    """Sequences that attention runs over, each a contiguous run of *slots*.

    Slots are tokens, or tokens plus zero padding slots for padded windows (then ``gather`` and
    ``scatter`` translate between the two).

    Attributes:
        cu_seqlens: ``(S + 1,)`` int32 sequence boundaries in slot order, leading 0.
        lengths: ``(S,)`` host int64 array of sequence lengths.
        max_len: longest sequence.
        positions: ``(T, 2)`` float32 centre (row, col) of every slot in base cells, relative to
            the sequence's frame (its window, or its image).
        frame_size: ``(rows, cols)`` of the frame in cells (window size, or the image grid).
        gather: ``(T,)`` token index of every slot, ``num_tokens`` for a padding slot; None when
            slots are exactly the tokens.
        scatter: ``(N,)`` slot of every token; None when slots are exactly the tokens.
        prefix: ``(T,)`` bool marking per-image prefix slots (a cls token), or None.
    """

    cu_seqlens: torch.Tensor
    lengths: np.ndarray
    max_len: int
    positions: torch.Tensor
    frame_size: tuple[int, int]
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def num_slots(self) -> int:
        return int(self.positions.shape[0])

    @property
    def uniform(self) -> bool:
        """All sequences have the same length (a dense layout): attention needs no masking."""
        return bool((self.lengths == self.max_len).all())


@dataclass(eq=False)
class PatchLayout:
    """Where every token of a batch sits. ``N`` tokens, ``B`` images, ``(Hc, Wc)`` base cells.

    Attributes:
        cell_level: ``(B, Hc, Wc)`` int64 level ``k`` of the patch covering each cell.
        token_image: ``(N,)`` int64 image of each token.
        token_cell: ``(N, 2)`` int64 top-left cell (row, col) of each token's patch.
        token_level: ``(N,)`` int64 level of each token (patch side = ``2**level`` cells).
        cell_to_token: ``(B, Hc, Wc)`` int64 token covering each cell (back to a dense grid).
        tokens_per_image: ``(B,)`` int64 on the device; ``tokens_per_image_host`` the same on host.
        images: one sequence per image (global attention).
        windows: one sequence per window (window attention), None without windows.
    """

    grid_size: tuple[int, int]
    window_size: int
    cell_level: torch.Tensor
    token_image: torch.Tensor
    token_cell: torch.Tensor
    token_level: torch.Tensor
    cell_to_token: torch.Tensor
    tokens_per_image: torch.Tensor
    tokens_per_image_host: tuple[int, ...]
    images: PackedSequences
    windows: PackedSequences | None

    @property
    def batch_size(self) -> int:
        return int(self.cell_level.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.token_image.shape[0])

    @property
    def kept_fraction(self) -> list[float]:
        """Tokens kept per image as a fraction of the dense token count."""
        cells = self.grid_size[0] * self.grid_size[1]
        return [n / cells for n in self.tokens_per_image_host]

    @property
    def mean_kept_fraction(self) -> float:
        """Tokens kept as a fraction of the dense count, averaged over the batch's images."""
        return sum(self.kept_fraction) / self.batch_size

    def token_centers(self) -> torch.Tensor:
        """``(N, 2)`` float32 centre (row, col) of each token in base cells (image frame)."""
        return patch_centers(self.token_cell, self.token_level)


def patch_centers(top_left: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` float32 centres of ``2^level``-cell patches given their ``(N, 2)`` top-left cells."""
    half_span = ((1 << level).float() - 1.0) / 2.0
    return top_left.float() + half_span.unsqueeze(1)


@dataclass(frozen=True)
class _Geometry:
    """Static facts of a (grid, window) pair, shared by every batch of that shape."""

    padded: tuple[int, int]
    cell_order: torch.Tensor  # (Hp*Wp,) raster index of each cell of the padded grid, window-major
    real_cells: np.ndarray  # (num_windows,) real (non-padding) cells per window
    pad_positions: torch.Tensor  # (P, 2) float32 padding cells of one image, window-major, window frame
    pad_cells: torch.Tensor  # (num_windows,) int64 padding cells per window
    window_origin_of_cell: torch.Tensor | None  # (Hp*Wp, 2) int64 origin of each cell's window


@functools.lru_cache(maxsize=64)
def _geometry(grid: tuple[int, int], window: int, device: torch.device) -> _Geometry:
    hc, wc = grid
    if window <= 0:
        order = torch.arange(hc * wc, device=device)
        return _Geometry(
            grid, order, np.array([hc * wc]), torch.zeros(0, 2, device=device),
            torch.zeros(1, dtype=torch.int64, device=device), None,
        )
    hp, wp = -(-hc // window) * window, -(-wc // window) * window
    nh, nw = hp // window, wp // window
    raster = np.arange(hp * wp).reshape(nh, window, nw, window).transpose(0, 2, 1, 3)
    rows, cols = np.divmod(raster, wp)
    real = (rows < hc) & (cols < wc)
    local_r, local_c = rows % window, cols % window
    pad = np.stack([local_r[~real], local_c[~real]], axis=1).astype(np.float32)  # window-major
    origin = np.stack([rows // window * window, cols // window * window], axis=-1).reshape(-1, 2)
    origin_raster = np.empty_like(origin)
    origin_raster[raster.reshape(-1)] = origin
    return _Geometry(
        padded=(hp, wp),
        cell_order=torch.from_numpy(raster.reshape(-1).copy()).to(device),
        real_cells=real.reshape(nh * nw, -1).sum(1),
        pad_positions=torch.from_numpy(pad).to(device),
        pad_cells=torch.from_numpy(window * window - real.reshape(nh * nw, -1).sum(1)).to(device),
        window_origin_of_cell=torch.from_numpy(origin_raster).to(device),
    )


def _cumsum0(counts: torch.Tensor) -> torch.Tensor:
    """``(S,) -> (S + 1,)`` int32 exclusive-then-total cumulative sum (``cu_seqlens``)."""
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def build_layout(
    cell_level: torch.Tensor | None,
    *,
    batch_size: int,
    grid_size: tuple[int, int],
    window_size: int,
    device: torch.device,
    sync_flags: torch.Tensor | None = None,
) -> tuple[PatchLayout, list[int]]:
    """Pack a batch's patches into a token layout.

    Args:
        cell_level: ``(B, Hc, Wc)`` from :func:`select_levels`, or None for a dense layout (every
            cell a base patch; its counts are known, so there is no host sync unless
            ``sync_flags`` asks for one).
        window_size: window side in base cells, 0 without window attention.
        sync_flags: optional ``(F,)`` int64 device values that the caller needs on the host;
            they travel with the layout's single host sync and are returned.
    Returns:
        The layout, and ``sync_flags`` as host ints (empty list when None).
    """
    hc, wc = grid_size
    geo = _geometry((hc, wc), window_size, torch.device(device))
    hp, wp = geo.padded
    b = batch_size
    num_windows = len(geo.real_cells)
    rows = torch.arange(hc, device=device).view(1, hc, 1)
    cols = torch.arange(wc, device=device).view(1, 1, wc)
    dense = cell_level is None
    if dense:
        cell_level = torch.zeros(b, hc, wc, dtype=torch.int64, device=device)
        anchors = torch.ones(b, hc, wc, dtype=torch.bool, device=device)
    else:
        step = 1 << cell_level
        anchors = (rows % step == 0) & (cols % step == 0)
    anchors_padded = F.pad(anchors, (0, wp - wc, 0, hp - hc)) if (hp, wp) != (hc, wc) else anchors
    anchors_ordered = anchors_padded.flatten(1)[:, geo.cell_order]  # (B, Hp*Wp) window-major
    counts = anchors_ordered.view(b * num_windows, -1).sum(1)  # tokens per window (or image)

    flags_host: list[int] = []
    if dense and sync_flags is None:
        counts_host = np.tile(geo.real_cells, b)
    else:
        extra = sync_flags if sync_flags is not None else counts.new_zeros(0)
        values = torch.cat([counts, extra.to(counts.dtype)]).tolist()  # the one host sync
        counts_host = np.asarray(values[: len(counts)], dtype=np.int64)
        flags_host = values[len(counts):]
    num_tokens = int(counts_host.sum())

    flat_anchor = anchors_ordered.flatten()
    token_of_ordered = flat_anchor.cumsum(0) - 1
    ordered_raster = (
        torch.arange(b, device=device).view(b, 1) * (hp * wp) + geo.cell_order.view(1, -1)
    ).flatten()
    target = torch.where(flat_anchor, token_of_ordered, num_tokens)
    token_raster = torch.zeros(num_tokens + 1, dtype=torch.int64, device=device)
    token_raster.scatter_(0, target, ordered_raster)
    token_raster = token_raster[:num_tokens]
    token_image = token_raster // (hp * wp)
    in_image = token_raster % (hp * wp)
    token_cell = torch.stack([in_image // wp, in_image % wp], dim=1)
    token_level = cell_level[token_image, token_cell[:, 0], token_cell[:, 1]]

    token_at_raster = torch.empty(b * hp * wp, dtype=torch.int64, device=device)
    token_at_raster[ordered_raster] = token_of_ordered
    anchor_row = (rows >> cell_level) << cell_level
    anchor_col = (cols >> cell_level) << cell_level
    image = torch.arange(b, device=device).view(b, 1, 1)
    cell_to_token = token_at_raster[image * (hp * wp) + anchor_row * wp + anchor_col]

    per_image = counts.view(b, num_windows).sum(1)
    per_image_host = counts_host.reshape(b, num_windows).sum(1)
    centers = patch_centers(token_cell, token_level)
    images = PackedSequences(
        cu_seqlens=_cumsum0(per_image),
        lengths=per_image_host,
        max_len=int(per_image_host.max()),
        positions=centers,
        frame_size=(hc, wc),
    )
    windows = None
    if window_size > 0:
        windows = _window_sequences(window_size, b, geo, counts, counts_host, centers, in_image)
    layout = PatchLayout(
        grid_size=(hc, wc),
        window_size=window_size,
        cell_level=cell_level,
        token_image=token_image,
        token_cell=token_cell,
        token_level=token_level,
        cell_to_token=cell_to_token,
        tokens_per_image=per_image,
        tokens_per_image_host=tuple(int(n) for n in per_image_host),
        images=images,
        windows=windows,
    )
    return layout, flags_host


def _window_sequences(
    window: int,
    b: int,
    geo: _Geometry,
    counts: torch.Tensor,
    counts_host: np.ndarray,
    centers: torch.Tensor,
    in_image: torch.Tensor,
) -> PackedSequences:
    """One sequence per window: its tokens, then its zero-padding cells (padded windows only)."""
    device = centers.device
    origin = geo.window_origin_of_cell[in_image].float()
    positions = centers - origin
    full = window * window
    pad_per_window = full - geo.real_cells
    if not pad_per_window.any():
        return PackedSequences(
            cu_seqlens=_cumsum0(counts),
            lengths=counts_host,
            max_len=int(counts_host.max()),
            positions=positions,
            frame_size=(window, window),
        )
    num_tokens = len(centers)
    pads_host = np.tile(pad_per_window, b)
    num_pads = int(pads_host.sum())
    pads = geo.pad_cells.repeat(b)
    lengths_host = counts_host + pads_host
    num_slots = num_tokens + num_pads
    seq_ids = torch.arange(len(pads_host), device=device)
    slot_start = _cumsum0(counts + pads).long()
    token_start = _cumsum0(counts).long()
    token_window = torch.repeat_interleave(seq_ids, counts, output_size=num_tokens)
    scatter = torch.arange(num_tokens, device=device) - token_start[token_window] + slot_start[token_window]
    pad_window = torch.repeat_interleave(seq_ids, pads, output_size=num_pads)
    pad_start = _cumsum0(pads).long()
    pad_slots = (
        torch.arange(num_pads, device=device) - pad_start[pad_window]
        + slot_start[pad_window] + counts[pad_window]
    )
    gather = torch.full((num_slots,), num_tokens, dtype=torch.int64, device=device)
    gather[scatter] = torch.arange(num_tokens, device=device)
    slot_positions = torch.empty(num_slots, 2, dtype=torch.float32, device=device)
    slot_positions[scatter] = positions
    slot_positions[pad_slots] = geo.pad_positions.repeat(b, 1)
    return PackedSequences(
        cu_seqlens=_cumsum0(counts + pads),
        lengths=lengths_host,
        max_len=int(lengths_host.max()),
        positions=slot_positions,
        frame_size=(window, window),
        gather=gather,
        scatter=scatter,
    )


def prepend_image_tokens(layout: PatchLayout) -> tuple[PackedSequences, torch.Tensor, torch.Tensor]:
    """Image sequences with one prefix slot (a cls token) before each image's tokens.

    Returns:
        The sequences (slot order: ``[cls_0, tokens of image 0, cls_1, ...]``; prefix slots sit at
        position (0, 0) and are marked in ``prefix``), the ``(N,)`` slot of every token and the
        ``(B,)`` slot of every prefix.
    """
    seqs = layout.images
    b, n = layout.batch_size, layout.num_tokens
    device = seqs.positions.device
    token_slot = torch.arange(n, device=device) + layout.token_image + 1
    prefix_slot = seqs.cu_seqlens[:-1].long() + torch.arange(b, device=device)
    positions = seqs.positions.new_zeros(n + b, 2)
    positions[token_slot] = seqs.positions
    prefix = torch.zeros(n + b, dtype=torch.bool, device=device)
    prefix[prefix_slot] = True
    prefixed = PackedSequences(
        cu_seqlens=seqs.cu_seqlens + torch.arange(b + 1, dtype=torch.int32, device=device),
        lengths=seqs.lengths + 1,
        max_len=seqs.max_len + 1,
        positions=positions,
        frame_size=seqs.frame_size,
        prefix=prefix,
    )
    return prefixed, token_slot, prefix_slot

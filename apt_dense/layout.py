"""Stage 2b: from per-cell levels to a packed token layout.

Tokens of a batch are ordered image-major, then window-major (windows in raster order, cells of
a window in raster order, a patch placed at its top-left cell). The same order serves global
blocks (one sequence per image) and window blocks (one sequence per window), only the sequence
boundaries differ. Windows follow ViTDet: the cell grid is zero-padded on the bottom/right to a
multiple of the window; the padded cells take part in window attention as zero vectors, so
window blocks see padding slots that are not tokens.

Packing is split by the forward pass's one host sync:

1. :meth:`PendingLayout.from_levels` (device): the cell where each patch starts, its *anchor*,
   in window-major order, counted per sequence;
2. the counts come to the host (:class:`~apt_dense.planner.TokenPlanner` sends its pixel checks
   in the same transfer);
3. :meth:`PendingLayout.pack`: token order, cell-to-token map, image and window sequences.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


__all__ = ["PackedSequences", "PatchLayout", "ImagePrefix", "PendingLayout"]


@dataclass(eq=False)
class PackedSequences:
    """Sequences that attention runs over, each a contiguous run of *slots*.

    Slots are the rows of the residual stream, plus zero padding slots in padded windows
    (:meth:`to_slots` and :meth:`from_slots` translate; ``gather``/``scatter`` are None when
    slots are exactly the rows).

    Attributes:
        cu_seqlens: ``(S + 1,)`` int32 sequence boundaries in slot order, leading 0.
        lengths: ``(S,)`` host int64 array of sequence lengths; None in traced programs
            (:meth:`PendingLayout.pack_traced`), whose counts stay on the device.
        max_len: longest sequence (a Python int, as the varlen kernels need); None when traced.
        positions: ``(T, 2)`` float32 centre (row, col) of every slot in base cells, relative to
            the sequence's frame (its window, or its image).
        frame_size: ``(rows, cols)`` of the frame in cells (window size, or the image grid).
        gather: ``(T,)`` row of every slot, ``R`` (the number of rows) for a padding slot.
        scatter: ``(R,)`` slot of every row.
        prefix: ``(T,)`` bool marking per-image prefix slots (a cls token), or None.
        max_slots: the most slots a sequence of this frame can hold (window or image cells, plus
            a prefix slot), fixed for a model and image size; None when unknown. Compiled code
            passes it to the varlen kernels as their ``max_seqlen`` bound, so no batch-dependent
            int reaches the compiler.
        ragged: lengths may differ between sequences. False when the planner cannot merge (a
            dense layout): compiled code then takes the equal-length path without a data check.
    """

    cu_seqlens: torch.Tensor
    lengths: np.ndarray | None
    max_len: int | None
    positions: torch.Tensor
    frame_size: tuple[int, int]
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    max_slots: int | None = None
    ragged: bool = True
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_slots(self) -> int:
        return self.positions.shape[0]

    @property
    def uniform(self) -> bool:
        """All sequences have the same length (a dense layout): attention needs no masking."""
        return bool((self.lengths == self.max_len).all())

    def to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, C)`` rows -> ``(T, C)`` slots; padding slots are zero vectors, as in ViTDet."""
        if self.gather is None:
            return x
        return torch.cat([x, x.new_zeros(1, x.shape[1])])[self.gather]

    def from_slots(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, C)`` slots -> ``(R, C)`` rows (padding slots dropped)."""
        return x if self.scatter is None else x[self.scatter]

    def with_slot_maps(self) -> "PackedSequences":
        """These sequences with ``gather``/``scatter`` given even where slots are exactly the rows
        (identity maps). Compiled blocks take them so that padded and unpadded windows (images
        whose grid the windows do or do not tile) trace the same code, without a guard on
        ``gather is None``; the bucket-plan cache is shared."""
        if self.gather is not None:
            return self
        rows = torch.arange(self.num_slots, device=self.positions.device)
        # two tensors: the compiler guards on which inputs alias
        return dataclasses.replace(self, gather=rows, scatter=rows.clone())


@dataclass(eq=False)
class PatchLayout:
    """Where every token of a batch sits. ``N`` tokens, ``B`` images, ``(Hc, Wc)`` base cells.

    Attributes:
        grid_size: ``(Hc, Wc)``.
        window_size: window side in cells, 0 without window attention.
        num_levels: the coarsest level the planner could choose (0: every token is a base patch).
        cell_level: ``(B, Hc, Wc)`` int64 level ``k`` of the patch covering each cell.
        token_image: ``(N,)`` int64 image of each token.
        token_cell: ``(N, 2)`` int64 top-left cell (row, col) of each token's patch.
        token_level: ``(N,)`` int64 level of each token (patch side = ``2**level`` cells).
        cell_to_token: ``(B, Hc, Wc)`` int64 token covering each cell (back to a dense grid).
        tokens_per_image: ``(B,)`` int64 on the device (``images.lengths`` on the host).
        images: one sequence per image (global attention).
        windows: one sequence per window (window attention), None without windows.
    """

    grid_size: tuple[int, int]
    window_size: int
    num_levels: int
    cell_level: torch.Tensor
    token_image: torch.Tensor
    token_cell: torch.Tensor
    token_level: torch.Tensor
    cell_to_token: torch.Tensor
    tokens_per_image: torch.Tensor
    images: PackedSequences
    windows: PackedSequences | None

    @property
    def batch_size(self) -> int:
        return self.cell_level.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_image.shape[0]

    @property
    def tokens_per_image_host(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.images.lengths)

    @property
    def is_dense(self) -> bool:
        """Every image keeps all its cells as base tokens (known on the host, no sync). A traced
        layout (:meth:`PendingLayout.pack_traced`) is dense only when nothing could merge: its
        token count is unknown while tracing, and the general path is exact on dense batches."""
        if self.num_levels == 0:
            return True
        if self.images.lengths is None:
            return False
        return self.num_tokens == self.batch_size * self.grid_size[0] * self.grid_size[1]

    @property
    def kept_fraction(self) -> list[float]:
        """Tokens kept per image as a fraction of the dense token count."""
        cells = self.grid_size[0] * self.grid_size[1]
        return [n / cells for n in self.tokens_per_image_host]

    @property
    def mean_kept_fraction(self) -> float:
        """Tokens kept as a fraction of the dense count, averaged over the batch's images."""
        return sum(self.kept_fraction) / self.batch_size


@dataclass(eq=False)
class ImagePrefix:
    """``P`` prefix slots (a cls token, then register tokens) before each image's tokens: the
    residual stream's rows are ``[prefixes of image 0, tokens of image 0, prefixes of image 1, ...]``
    (``N + B P`` slots).

    Attributes:
        images: the image sequences over those slots; prefix slots sit at position (0, 0) and are
            marked in ``images.prefix``.
        token_slot: ``(N,)`` int64 slot of every token.
        prefix_slot: ``(B, P)`` int64 slots of every image's prefixes, in prefix order.
        slot_image: ``(N + B P,)`` int64 image of every slot.
        source_row: ``(N + B P,)`` int64 row of every slot in ``cat([tokens, prefixes])``, the
            prefixes image-major.
    """

    images: PackedSequences
    token_slot: torch.Tensor
    prefix_slot: torch.Tensor
    slot_image: torch.Tensor
    source_row: torch.Tensor

    @property
    def num_prefix(self) -> int:
        return int(self.prefix_slot.shape[1])

    @classmethod
    def build(cls, layout: PatchLayout, num_prefix: int = 1) -> "ImagePrefix":
        if num_prefix < 1:
            raise ValueError(f"num_prefix must be at least 1, got {num_prefix}")
        seqs = layout.images
        b, n, p = layout.batch_size, layout.num_tokens, num_prefix
        device = seqs.positions.device
        token_slot = torch.arange(n, device=device) + (layout.token_image + 1) * p
        prefix_slot = (seqs.cu_seqlens[:-1].long() + torch.arange(b, device=device) * p).view(b, 1) + torch.arange(
            p, device=device
        )
        positions = seqs.positions.new_zeros(n + b * p, 2)
        positions[token_slot] = seqs.positions
        prefix = torch.zeros(n + b * p, dtype=torch.bool, device=device)
        prefix[prefix_slot.flatten()] = True
        images = PackedSequences(
            cu_seqlens=seqs.cu_seqlens + p * torch.arange(b + 1, dtype=torch.int32, device=device),
            lengths=None if seqs.lengths is None else seqs.lengths + p,
            max_len=None if seqs.max_len is None else seqs.max_len + p,
            positions=positions,
            frame_size=seqs.frame_size,
            prefix=prefix,
            max_slots=None if seqs.max_slots is None else seqs.max_slots + p,
            ragged=seqs.ragged,
        )
        source_row = torch.empty(n + b * p, dtype=torch.int64, device=device)
        source_row[token_slot] = torch.arange(n, device=device)
        source_row[prefix_slot.flatten()] = torch.arange(n, n + b * p, device=device)
        prefix_image = torch.arange(b, device=device).repeat_interleave(p)
        slot_image = torch.cat([layout.token_image, prefix_image])[source_row]
        return cls(images, token_slot, prefix_slot, slot_image, source_row)

    def insert(self, tokens: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` tokens and ``(P, C)`` prefix vectors (shared by all images) -> ``(N + B P, C)`` slots."""
        b = self.images.num_sequences
        return torch.cat([tokens, prefix.repeat(b, 1)])[self.source_row]

    def tokens(self, slots: torch.Tensor) -> torch.Tensor:
        """``(N + B P, C)`` slots -> ``(N, C)`` tokens (prefixes dropped)."""
        return slots[self.token_slot]

    def prefixes(self, slots: torch.Tensor) -> torch.Tensor:
        """``(N + B P, C)`` slots -> ``(B, P, C)`` prefix slots of every image."""
        return slots[self.prefix_slot]


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
    pad_window: torch.Tensor  # (P,) int64 window of each padding cell of one image
    pad_rank: torch.Tensor  # (P,) int64 index of each padding cell among its window's
    window_origin_of_cell: torch.Tensor | None  # (Hp*Wp, 2) int64 origin of each cell's window

    @property
    def pads_per_image(self) -> int:
        return int(self.pad_window.shape[0])


@functools.lru_cache(maxsize=64)
def _geometry(grid: tuple[int, int], window: int, device: torch.device) -> _Geometry:
    hc, wc = grid
    if window <= 0:
        order = torch.arange(hc * wc, device=device)
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return _Geometry(
            grid, order, np.array([hc * wc]), torch.zeros(0, 2, device=device),
            torch.zeros(1, dtype=torch.int64, device=device), none, none, None,
        )
    hp, wp = -(-hc // window) * window, -(-wc // window) * window
    nh, nw = hp // window, wp // window
    raster = np.arange(hp * wp).reshape(nh, window, nw, window).transpose(0, 2, 1, 3)
    rows, cols = np.divmod(raster, wp)
    real = (rows < hc) & (cols < wc)
    local_r, local_c = rows % window, cols % window
    pad = np.stack([local_r[~real], local_c[~real]], axis=1).astype(np.float32)  # window-major
    pads_per_window = window * window - real.reshape(nh * nw, -1).sum(1)
    pad_window = np.nonzero(~real.reshape(nh * nw, -1))[0]
    pad_rank = np.arange(len(pad_window)) - np.concatenate([[0], np.cumsum(pads_per_window)])[pad_window]
    origin = np.stack([rows // window * window, cols // window * window], axis=-1).reshape(-1, 2)
    origin_raster = np.empty_like(origin)
    origin_raster[raster.reshape(-1)] = origin
    return _Geometry(
        padded=(hp, wp),
        cell_order=torch.from_numpy(raster.reshape(-1).copy()).to(device),
        real_cells=real.reshape(nh * nw, -1).sum(1),
        pad_positions=torch.from_numpy(pad).to(device),
        pad_cells=torch.from_numpy(pads_per_window).to(device),
        pad_window=torch.from_numpy(pad_window.astype(np.int64)).to(device),
        pad_rank=torch.from_numpy(pad_rank.astype(np.int64)).to(device),
        window_origin_of_cell=torch.from_numpy(origin_raster).to(device),
    )


def _cumsum0(counts: torch.Tensor) -> torch.Tensor:
    """``(S,) -> (S + 1,)`` int32 exclusive-then-total cumulative sum (``cu_seqlens``)."""
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


@dataclass(eq=False)
class PendingLayout:
    """A layout whose token counts are still on the device (packing step 1).

    Attributes:
        cell_level: ``(B, Hc, Wc)`` int64 level of the patch covering each cell.
        window_size: window side in cells, 0 without window attention.
        anchors: ``(B, Hp * Wp)`` bool, True where a patch starts; cells of the padded grid in
            window-major order.
        counts: ``(S,)`` int64 tokens per sequence, on the device: per window (``S`` = ``B``
            times windows per image), or per image without windows. :meth:`pack` needs them on
            the host.
    """

    cell_level: torch.Tensor
    window_size: int
    anchors: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_levels(cls, cell_level: torch.Tensor, window_size: int = 0) -> "PendingLayout":
        """Anchors and counts of ``(B, Hc, Wc)`` levels (from :func:`select_levels`, or zeros
        for a dense layout); no host sync."""
        b, hc, wc = cell_level.shape
        device = cell_level.device
        geo = _geometry((hc, wc), window_size, device)
        hp, wp = geo.padded
        rows = torch.arange(hc, device=device).view(1, hc, 1)
        cols = torch.arange(wc, device=device).view(1, 1, wc)
        step = 1 << cell_level
        anchors = (rows % step == 0) & (cols % step == 0)
        if (hp, wp) != (hc, wc):
            anchors = F.pad(anchors, (0, wp - wc, 0, hp - hc))
        anchors = anchors.flatten(1)[:, geo.cell_order]
        counts = anchors.view(b * len(geo.real_cells), -1).sum(1)
        return cls(cell_level, window_size, anchors, counts)

    def pack(self, counts_host: Sequence[int], num_levels: int) -> PatchLayout:
        """Packing step 3, given :attr:`counts` on the host (as ints); no host sync.

        Args:
            num_levels: the coarsest level the planner could choose (recorded on the layout).
        """
        counts_host = np.asarray(counts_host, dtype=np.int64)
        return self._pack(int(counts_host.sum()), num_levels, counts_host)

    def pack_traced(self, num_tokens: int, num_levels: int) -> PatchLayout:
        """Packing step 3 without the host counts, for traced programs (:mod:`apt_dense.export`):
        ``num_tokens`` is the batch's token count as an (unbacked) ``SymInt``. The sequences'
        host ``lengths`` and ``max_len`` are None; nothing is read back from the device."""
        return self._pack(num_tokens, num_levels, None)

    def _pack(self, num_tokens: int, num_levels: int, counts_host: np.ndarray | None) -> PatchLayout:
        b, hc, wc = self.cell_level.shape
        geo = _geometry((hc, wc), self.window_size, self.cell_level.device)
        # Token t is the t-th anchor in window-major order.
        flat_anchor = self.anchors.flatten()
        token_of_ordered = flat_anchor.cumsum(0) - 1
        hp, wp = geo.padded
        ordered_raster = (
            torch.arange(b, device=flat_anchor.device).view(b, 1) * (hp * wp) + geo.cell_order.view(1, -1)
        ).flatten()
        token_image, token_cell, in_image = _token_cells(flat_anchor, token_of_ordered, ordered_raster, num_tokens, geo)
        token_level = self.cell_level[token_image, token_cell[:, 0], token_cell[:, 1]]
        centers = patch_centers(token_cell, token_level)
        per_image = self.counts.view(b, -1).sum(1)
        per_image_host = None if counts_host is None else counts_host.reshape(b, -1).sum(1)
        images = PackedSequences(
            cu_seqlens=_cumsum0(per_image),
            lengths=per_image_host,
            max_len=_host_max(per_image_host),
            positions=centers,
            frame_size=(hc, wc),
            max_slots=hc * wc,
            ragged=num_levels > 0,
        )
        windows = None
        if self.window_size > 0:
            windows = _window_sequences(
                self.window_size, b, geo, self.counts, counts_host, centers, token_image, in_image,
                ragged=num_levels > 0,
            )
        return PatchLayout(
            grid_size=(hc, wc),
            window_size=self.window_size,
            num_levels=num_levels,
            cell_level=self.cell_level,
            token_image=token_image,
            token_cell=token_cell,
            token_level=token_level,
            cell_to_token=_cell_to_token(self.cell_level, token_of_ordered, ordered_raster, geo),
            tokens_per_image=per_image,
            images=images,
            windows=windows,
        )


def _host_max(lengths: np.ndarray | None) -> int | None:
    return None if lengths is None else int(lengths.max())


def _token_cells(
    flat_anchor: torch.Tensor,
    token_of_ordered: torch.Tensor,
    ordered_raster: torch.Tensor,
    num_tokens: int,
    geo: _Geometry,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N,)`` image, ``(N, 2)`` top-left cell and ``(N,)`` raster index within the padded
    image of every token."""
    hp, wp = geo.padded
    # Non-anchors write to a spare last entry, so the scatter needs no boolean indexing (a sync).
    target = torch.where(flat_anchor, token_of_ordered, num_tokens)
    token_raster = torch.zeros(num_tokens + 1, dtype=torch.int64, device=flat_anchor.device)
    token_raster.scatter_(0, target, ordered_raster)
    token_raster = token_raster[:num_tokens]
    in_image = token_raster % (hp * wp)
    return token_raster // (hp * wp), torch.stack([in_image // wp, in_image % wp], dim=1), in_image


def _cell_to_token(
    cell_level: torch.Tensor, token_of_ordered: torch.Tensor, ordered_raster: torch.Tensor, geo: _Geometry
) -> torch.Tensor:
    """``(B, Hc, Wc)`` token covering each cell: the token anchored at the patch's top-left cell."""
    b, hc, wc = cell_level.shape
    hp, wp = geo.padded
    device = cell_level.device
    token_at_raster = torch.empty(b * hp * wp, dtype=torch.int64, device=device)
    token_at_raster[ordered_raster] = token_of_ordered
    anchor_row = (torch.arange(hc, device=device).view(1, hc, 1) >> cell_level) << cell_level
    anchor_col = (torch.arange(wc, device=device).view(1, 1, wc) >> cell_level) << cell_level
    image = torch.arange(b, device=device).view(b, 1, 1)
    return token_at_raster[image * (hp * wp) + anchor_row * wp + anchor_col]


def _window_sequences(
    window: int,
    b: int,
    geo: _Geometry,
    counts: torch.Tensor,
    counts_host: np.ndarray | None,
    centers: torch.Tensor,
    token_image: torch.Tensor,
    in_image: torch.Tensor,
    ragged: bool,
) -> PackedSequences:
    """One sequence per window: its tokens, then its zero-padding cells (padded windows only).
    Slot indices come from each token's window and the geometry's static padding pattern
    (no sizes read from ``counts``), so the same code runs traced."""
    device = centers.device
    origin = geo.window_origin_of_cell[in_image].float()
    positions = centers - origin
    full = window * window
    if not geo.pads_per_image:
        return PackedSequences(
            cu_seqlens=_cumsum0(counts),
            lengths=counts_host,
            max_len=_host_max(counts_host),
            positions=positions,
            frame_size=(window, window),
            max_slots=full,
            ragged=ragged,
        )
    num_tokens = centers.shape[0]
    windows_per_image = len(geo.real_cells)
    hp, wp = geo.padded
    pads = geo.pad_cells.repeat(b)
    num_pads = b * geo.pads_per_image
    num_slots = num_tokens + num_pads
    slot_start = _cumsum0(counts + pads).long()
    token_start = _cumsum0(counts).long()
    row, col = in_image // wp, in_image % wp
    token_window = token_image * windows_per_image + (row // window) * (wp // window) + col // window
    scatter = torch.arange(num_tokens, device=device) - token_start[token_window] + slot_start[token_window]
    pad_window = (
        torch.arange(b, device=device).view(b, 1) * windows_per_image + geo.pad_window.view(1, -1)
    ).flatten()
    pad_slots = slot_start[pad_window] + counts[pad_window] + geo.pad_rank.repeat(b)
    gather = torch.full((num_slots,), num_tokens, dtype=torch.int64, device=device)
    gather[scatter] = torch.arange(num_tokens, device=device)
    slot_positions = torch.empty(num_slots, 2, dtype=torch.float32, device=device)
    slot_positions[scatter] = positions
    slot_positions[pad_slots] = geo.pad_positions.repeat(b, 1)
    lengths_host = None if counts_host is None else counts_host + np.tile(full - geo.real_cells, b)
    return PackedSequences(
        cu_seqlens=_cumsum0(counts + pads),
        lengths=lengths_host,
        max_len=_host_max(lengths_host),
        positions=slot_positions,
        frame_size=(window, window),
        gather=gather,
        scatter=scatter,
        max_slots=full,
        ragged=ragged,
    )

"""Stage 4 (positions): position encodings evaluated at continuous token centres.

A base token sits at an integer cell; a ``2^k``-cell patch sits at the mean of its cells, a
half-integer for ``k >= 1``. At base positions both encodings reproduce the dense models exactly:
RoPE as EVA-02's ``VisionRotaryEmbeddingFast``, relative positions as detectron2's
``add_decomposed_rel_pos``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

__all__ = [
    "rope_tables",
    "apply_rope",
    "resized_rel_pos",
    "half_step_rel_pos",
    "rel_pos_query_tables",
    "decomposed_rel_pos_bias",
    "grid_rel_pos_bias",
    "BiasWorkspace",
    "RelPosBias",
]


def rope_tables(
    positions: torch.Tensor,
    head_dim: int,
    frame_len: int,
    pretrain_len: int = 16,
    theta: float = 10000.0,
    unrotated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary tables for ``(T, 2)`` positions (row, col) in cells.

    Positions are rescaled ``t = pos / frame_len * pretrain_len`` as EVA-02 does (``frame_len`` is
    its ``ft_seq_len``: the window size, or the image grid it was built for). The first half of
    the channels rotates with the row, the second half with the column; frequencies are
    repeated in interleaved pairs.
    Args:
        unrotated: optional ``(T,)`` bool rows that get the identity rotation (EVA-02 does not
            rotate its cls token).
    Returns:
        ``cos, sin``: ``(T, head_dim)`` float32.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device)[: dim // 2].float() / dim))
    t = positions.float() / frame_len * pretrain_len  # (T, 2)
    freqs = (t.unsqueeze(-1) * inv_freq).repeat_interleave(2, dim=-1)  # (T, 2, dim)
    freqs = freqs.flatten(1)  # rows' channels, then columns'
    cos, sin = freqs.cos(), freqs.sin()
    if unrotated is not None:
        keep = unrotated.unsqueeze(1)
        cos, sin = cos.masked_fill(keep, 1.0), sin.masked_fill(keep, 0.0)
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``(T, H, D)`` by ``(T, D)`` tables, in float32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * cos.unsqueeze(1) + _rotate_half(xf) * sin.unsqueeze(1)).to(x.dtype)


def resized_rel_pos(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """The ``(L, C)`` relative-position table resized to ``2 * size - 1`` entries (offsets
    ``-(size - 1) .. size - 1`` cells) by linear interpolation, as detectron2's ``get_rel_pos``."""
    full = 2 * size - 1
    if rel_pos.shape[0] == full:
        return rel_pos
    return F.interpolate(
        rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=full, mode="linear"
    ).reshape(-1, full).permute(1, 0)


def half_step_rel_pos(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Relative-position table at half-cell steps for a frame of ``size`` cells: the
    :func:`resized_rel_pos` table with midpoints inserted.
    Returns:
        ``(4 * size - 3, C)``: entry ``2 * (d + size - 1)`` is offset ``d`` (half-integer ``d``
        included), so integer offsets are the resized table's own rows.
    """
    rel_pos = resized_rel_pos(rel_pos, size)
    mids = (rel_pos[:-1] + rel_pos[1:]) * 0.5
    interleaved = torch.stack([rel_pos[:-1], mids], dim=1).flatten(0, 1)
    return torch.cat([interleaved, rel_pos[-1:]])


def _half_steps(positions: torch.Tensor) -> torch.Tensor:
    """Centres in cells -> int64 half-cell steps (exact: centres are integers or half-integers)."""
    return (positions * 2).round().long()


def rel_pos_query_tables(q: torch.Tensor, coords: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """One axis of the decomposed bias as per-query tables over the key's coordinate.

    The coordinates are steps on a lattice of ``V`` values and ``table`` holds the ``2V - 1``
    offsets between them (:func:`resized_rel_pos` for cells, :func:`half_step_rel_pos` for half
    cells). For a query ``i`` the bias term depends on a key only through the key's coordinate
    ``v``, so it is ``per_query[n, h, i, v] = q[n, h, i] . table[c_i - v + V - 1]``: one
    ``(L, D) x (D, 2V - 1)`` product and a small gather instead of an ``(L, L)`` one per head.
    Args:
        q: ``(n, H, L, D)`` queries.
        coords: ``(n, L)`` int64 query coordinates in ``0 .. V - 1``.
        table: ``(2V - 1, D)``, row ``m`` the offset ``m - (V - 1)``.
    Returns:
        ``(n, H, L, V)`` in ``q``'s dtype.
    """
    values = (table.shape[0] + 1) // 2
    q_dot = torch.matmul(q, table.to(q.dtype).t())  # (n, H, L, 2V - 1)
    index = (coords + (values - 1)).unsqueeze(-1) - torch.arange(values, device=q.device)
    return q_dot.gather(-1, index.unsqueeze(1).expand(-1, q.shape[1], -1, -1))


class BiasWorkspace:
    """Memory for the ``(n, H, L, L)`` attention biases of one kind of block, reused by every
    block of a forward pass.

    A fresh tensor that large costs more than building the bias into it: CPU allocators hand
    such blocks back to the system when freed, so each new one is zero-filled page by page
    (SAM's dense global blocks pay the same for their attention matrices). Reuse is only for
    passes that record no gradients: autograd keeps the mask it is given.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous ``shape`` tensor with ``like``'s dtype and device; the buffer ``name``
        is grown when it is too small and its contents are left as they are."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = like.new_empty(numel)
        return buffer[:numel].view(shape)


def traced() -> bool:
    """Code is being traced into a graph (``torch.compile``, ``torch.export``, TorchScript), which
    allocates its own buffers: no :class:`BiasWorkspace` there."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _reuse(workspace: BiasWorkspace | None, *tensors: torch.Tensor) -> BiasWorkspace | None:
    """``workspace`` when the bias built from ``tensors`` is not recorded for backward."""
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return None if recorded or traced() else workspace


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    positions: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    frame_size: tuple[int, int],
    key_padding: torch.Tensor | None = None,
    workspace: BiasWorkspace | None = None,
) -> torch.Tensor:
    """Decomposed relative-position attention bias (MViTv2 / ViTDet) at continuous positions.

    ``bias[n, h, i, j] = q[n, h, i] . (R_h[r_i - r_j] + R_w[c_i - c_j])`` with the tables
    resized to the frame, exactly as detectron2's ``add_decomposed_rel_pos`` at integer positions.
    Built from :func:`rel_pos_query_tables` by two gathers along the keys (the index a
    broadcast ``(n, 1, 1, L)`` view), so the only ``(n, H, L, L)`` tensor is the result.
    Args:
        q: ``(n, H, L, D)`` unscaled queries of ``n`` padded sequences.
        positions: ``(n, L, 2)`` centres (row, col) in cells, in the frame.
        rel_pos_h, rel_pos_w: ``(L_h, D)``, ``(L_w, D)`` learned tables.
        frame_size: ``(rows, cols)`` of the frame in cells.
        key_padding: optional ``(n, L)`` bool, True for padding entries: their keys get
            ``-inf`` (the attention mask of a padded batch, without another pass).
        workspace: where to build the bias when no gradient is recorded (see
            :class:`BiasWorkspace`); the result is then a view of it.
    Returns:
        ``(n, H, L, L)`` in ``q``'s dtype.
    """
    n, heads, length, _ = q.shape
    shape = (n, heads, length, length)
    workspace = _reuse(workspace, q, rel_pos_h, rel_pos_w)
    steps = _half_steps(positions)
    bias = None
    for axis, table, size in ((0, rel_pos_h, frame_size[0]), (1, rel_pos_w, frame_size[1])):
        key_index = steps[..., axis]
        per_query = rel_pos_query_tables(q, key_index, half_step_rel_pos(table, size))  # (n, H, L, 2S-1)
        if key_padding is not None and axis == 0:
            # Padding keys read an extra -inf column.
            per_query = F.pad(per_query, (0, 1), value=float("-inf"))
            key_index = key_index.masked_fill(key_padding, per_query.shape[-1] - 1)
        index = key_index.view(n, 1, 1, length).expand(shape)
        if workspace is None:
            term = per_query.gather(-1, index)
        else:
            term = torch.gather(per_query, -1, index, out=workspace.take("bias" if bias is None else "term", shape, q))
        bias = term if bias is None else bias.add_(term)
    return bias


def grid_rel_pos_bias(
    q: torch.Tensor,
    positions: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    frame_size: tuple[int, int],
    workspace: BiasWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decomposed_rel_pos_bias` for sequences whose keys are the frame's cells, each once
    (a dense layout), over the keys in raster order: one broadcast sum of per-query tables, as
    detectron2's ``add_decomposed_rel_pos`` adds them.
    Args:
        q: ``(n, H, L, D)``, ``L = rows * cols``.
        positions: ``(n, L, 2)`` integer centres (row, col), every cell of the frame once.
        workspace: as for :func:`decomposed_rel_pos_bias`.
    Returns:
        ``bias``: ``(n, H, L, L)``, key ``j`` the frame's cell ``j`` in raster order;
        ``key_order``: ``(n, L)`` int64 entry of the sequence at each raster cell (keys and
        values gathered by it match the bias).
    """
    rows, cols = frame_size
    cells = positions.round().long()
    at_row = rel_pos_query_tables(q, cells[..., 0], resized_rel_pos(rel_pos_h, rows))  # (n, H, L, rows)
    at_col = rel_pos_query_tables(q, cells[..., 1], resized_rel_pos(rel_pos_w, cols))  # (n, H, L, cols)
    out = _reuse(workspace, q, rel_pos_h, rel_pos_w)
    if out is not None:
        out = out.take("bias", (*at_row.shape, cols), q)
    bias = torch.add(at_row.unsqueeze(-1), at_col.unsqueeze(-2), out=out).flatten(-2)
    raster = cells[..., 0] * cols + cells[..., 1]
    entries = torch.arange(raster.shape[1], device=raster.device).expand_as(raster)
    return bias, torch.empty_like(raster).scatter_(1, raster, entries)


@dataclass(eq=False)
class RelPosBias:
    """The decomposed relative-position bias of one attention layer over packed slots, as a
    ``(slot_index (n, L), q (n, H, L, D)) -> (n, H, L, L)`` bias function; slot index ``T``
    (one past the last slot) is padding, and its keys get ``-inf`` (:attr:`masks_padding`).
    Sequences of uniform length whose slots are every cell of the frame (a dense layout) take
    :meth:`on_grid` instead.

    A dataclass of tensors rather than a closure, so that compiled attention can hand it to its
    custom op (:mod:`apt_dense.attention`) field by field. The slots must tile the frame (patch
    tokens and padding cells of a layout), so that a sequence as long as the frame has cells
    holds every cell once.
    """

    rel_pos_h: torch.Tensor
    rel_pos_w: torch.Tensor
    positions: torch.Tensor  # (T, 2) slot centres in the frame
    frame_size: tuple[int, int]
    workspace: BiasWorkspace | None = None

    masks_padding: ClassVar[bool] = True

    def __call__(self, slots: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        num_slots = self.positions.shape[0]
        positions = torch.cat([self.positions, self.positions.new_zeros(1, 2)])[slots]
        return decomposed_rel_pos_bias(
            q, positions, self.rel_pos_h, self.rel_pos_w, self.frame_size, slots == num_slots, self.workspace
        )

    def tiles_frame(self, length: int) -> bool:
        """Sequences of ``length`` slots hold every cell of the frame once."""
        return length == self.frame_size[0] * self.frame_size[1]

    def on_grid(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`grid_rel_pos_bias` for ``q`` ``(n, H, L, D)`` of all slots, ``n`` sequences of
        ``L`` consecutive slots that tile the frame (:meth:`tiles_frame`)."""
        n, _, length, _ = q.shape
        positions = self.positions.view(n, length, 2)
        return grid_rel_pos_bias(q, positions, self.rel_pos_h, self.rel_pos_w, self.frame_size, self.workspace)

"""Stage 4 (positions): position encodings evaluated at continuous token centres.

A base token sits at an integer cell; a ``2^k``-cell patch sits at the mean of its cells, a
half-integer for ``k >= 1``. At base positions both encodings reproduce the dense models exactly:
RoPE as EVA-02's ``VisionRotaryEmbeddingFast``, relative positions as detectron2's
``add_decomposed_rel_pos``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["rope_tables", "apply_rope", "half_step_rel_pos", "decomposed_rel_pos_bias", "RelPosBias"]


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


def half_step_rel_pos(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Relative-position table at half-cell steps for a frame of ``size`` cells.

    The ``(L, C)`` table is first resized to ``2 * size - 1`` entries as detectron2's
    ``get_rel_pos`` does (linear interpolation), then midpoints are inserted.
    Returns:
        ``(4 * size - 3, C)``: entry ``2 * (d + size - 1)`` is offset ``d`` (half-integer ``d``
        included), so integer offsets are the resized table's own rows.
    """
    full = 2 * size - 1
    if rel_pos.shape[0] != full:
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=full, mode="linear"
        ).reshape(-1, full).permute(1, 0)
    mids = (rel_pos[:-1] + rel_pos[1:]) * 0.5
    interleaved = torch.stack([rel_pos[:-1], mids], dim=1).flatten(0, 1)
    return torch.cat([interleaved, rel_pos[-1:]])


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    positions: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    frame_size: tuple[int, int],
) -> torch.Tensor:
    """Decomposed relative-position attention bias (MViTv2 / ViTDet) at continuous positions.

    ``bias[n, h, i, j] = q[n, h, i] . (R_h[r_i - r_j] + R_w[c_i - c_j])`` with the tables
    resized to the frame, exactly as detectron2's ``add_decomposed_rel_pos`` at integer positions.
    Args:
        q: ``(n, H, L, D)`` unscaled queries of ``n`` padded sequences.
        positions: ``(n, L, 2)`` centres (row, col) in cells, in the frame.
        rel_pos_h, rel_pos_w: ``(L_h, D)``, ``(L_w, D)`` learned tables.
        frame_size: ``(rows, cols)`` of the frame in cells.
    Returns:
        ``(n, H, L, L)`` in ``q``'s dtype.
    """
    bias = None
    for axis, table, size in ((0, rel_pos_h, frame_size[0]), (1, rel_pos_w, frame_size[1])):
        half = half_step_rel_pos(table, size).to(q.dtype)
        coord = positions[..., axis]
        offset = (coord.unsqueeze(-1) - coord.unsqueeze(-2)) * 2 + 2 * (size - 1)  # (n, L, L)
        index = offset.round().long()
        q_dot = torch.einsum("nhld,md->nhlm", q, half)  # (n, H, L, 4S-3)
        term = q_dot.gather(-1, index.unsqueeze(1).expand(-1, q.shape[1], -1, -1))
        bias = term if bias is None else bias + term
    return bias


@dataclass(eq=False)
class RelPosBias:
    """The decomposed relative-position bias of one attention layer over packed slots, as a
    ``(slot_index (n, L), q (n, H, L, D)) -> (n, H, L, L)`` bias function; slot index ``T``
    (one past the last slot) is padding.

    A dataclass of tensors rather than a closure, so that compiled attention can hand it to its
    custom op (:mod:`apt_dense.attention`) field by field.
    """

    rel_pos_h: torch.Tensor
    rel_pos_w: torch.Tensor
    positions: torch.Tensor  # (T, 2) slot centres in the frame
    frame_size: tuple[int, int]

    def __call__(self, slots: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        positions = torch.cat([self.positions, self.positions.new_zeros(1, 2)])
        return decomposed_rel_pos_bias(q, positions[slots], self.rel_pos_h, self.rel_pos_w, self.frame_size)

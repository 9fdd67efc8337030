"""Decomposed relative positions at continuous centres against a naive per-pair reference:
the bias functions, and attention with them on dense grids (keys reordered to raster), ragged
padded buckets (padding keys masked by the bias) and reused workspaces, values and gradients."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apt_dense import PackedSequences, packed_attention
from apt_dense.positions import BiasWorkspace, RelPosBias, decomposed_rel_pos_bias, grid_rel_pos_bias

from test_attention import naive


def naive_table_at(table, size, offsets):
    """Relative-position vectors at continuous ``offsets`` (cells): the table resized to
    ``2 * size - 1`` rows as detectron2's ``get_rel_pos``, then linearly interpolated."""
    full = 2 * size - 1
    if table.shape[0] != full:
        table = F.interpolate(table.T.unsqueeze(0), size=full, mode="linear").squeeze(0).T
    x = offsets + (size - 1)
    lo, hi = x.floor().long(), x.ceil().long()
    w = (x - lo).unsqueeze(-1)
    return table[lo] * (1 - w) + table[hi] * w


def naive_bias(q, positions, rel_h, rel_w, frame):
    """``(H, L, D)`` queries, ``(L, 2)`` centres -> ``(H, L, L)``, one pair at a time."""
    q, rel_h, rel_w, positions = q.double(), rel_h.double(), rel_w.double(), positions.double()
    d = positions.unsqueeze(1) - positions.unsqueeze(0)  # (L, L, 2)
    vectors = naive_table_at(rel_h, frame[0], d[..., 0]) + naive_table_at(rel_w, frame[1], d[..., 1])
    return torch.einsum("hid,ijd->hij", q, vectors)


def tables(dim, frame, resize=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * side - 1 + resize, dim, generator=g) * 0.5 for side in frame]


def half_positions(count, frame, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 2 * side - 1, (count,), generator=g) for side in frame], 1).float() / 2


@pytest.mark.parametrize("resize", [0, 5])  # the tables' own size, or resized to the frame
def test_bias_at_half_cells_matches_naive(resize):
    frame, heads, dim = (5, 7), 3, 8
    rel_h, rel_w = tables(dim, frame, resize)
    positions = half_positions(2 * 11, frame).view(2, 11, 2)
    q = torch.randn(2, heads, 11, dim)
    bias = decomposed_rel_pos_bias(q, positions, rel_h, rel_w, frame)
    for n in range(2):
        torch.testing.assert_close(bias[n], naive_bias(q[n], positions[n], rel_h, rel_w, frame).float(), atol=1e-5, rtol=1e-5)


def test_padding_keys_get_minus_infinity():
    frame = (4, 4)
    rel_h, rel_w = tables(8, frame)
    positions = half_positions(6, frame).view(1, 6, 2)
    padding = torch.tensor([[False, False, True, False, False, True]])
    q = torch.randn(1, 2, 6, 8)
    bias = decomposed_rel_pos_bias(q, positions, rel_h, rel_w, frame, key_padding=padding)
    assert torch.isneginf(bias[..., padding[0]]).all()
    torch.testing.assert_close(bias[..., ~padding[0]], decomposed_rel_pos_bias(q, positions, rel_h, rel_w, frame)[..., ~padding[0]])


def test_grid_bias_is_the_bias_over_raster_keys():
    frame = (3, 5)
    rel_h, rel_w = tables(8, frame, resize=2)
    cells = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij"), -1).view(-1, 2).float()
    positions = torch.stack([cells[torch.randperm(15)] for _ in range(2)])  # any order of the cells
    q = torch.randn(2, 3, 15, 8)
    bias, order = grid_rel_pos_bias(q, positions, rel_h, rel_w, frame)
    assert ((positions[torch.arange(2).unsqueeze(1), order] == cells).all())
    torch.testing.assert_close(bias, decomposed_rel_pos_bias(q, positions, rel_h, rel_w, frame).gather(
        -1, order.view(2, 1, 1, 15).expand(2, 3, 15, 15)))


def window_major_grid(batch, rows, cols, window):
    """Cell centres of ``batch`` full grids, windows in raster order, cells of a window in raster
    order (the layout's token order)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    key = (r // window) * 1000 + (c // window) * 100 + (r % window) * 10 + c % window
    order = key.flatten().argsort()
    cells = torch.stack([r.flatten(), c.flatten()], 1)[order].float()
    return cells.repeat(batch, 1)


def naive_attention(q, k, v, lengths, positions, rel_h, rel_w, frame):
    def bias_of_range(start, n):
        sl = slice(start, start + n)
        return naive_bias(q[sl].transpose(0, 1), positions[sl], rel_h, rel_w, frame)

    return naive(q, k, v, lengths, bias_of_range)


def seqs_of(lengths, positions, frame, ragged=True):
    lengths = np.asarray(lengths)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).int()
    return PackedSequences(cu, lengths, int(lengths.max()), positions, frame, ragged=ragged)


def layouts():
    """(lengths, positions, frame): a dense layout (every sequence the whole frame, window-major),
    and a ragged one at half cells (padded buckets)."""
    dense = ([30, 30], window_major_grid(2, 5, 6, 4), (5, 6))
    ragged_lengths = [9, 4, 17, 2, 15, 16, 8]  # buckets of 3, 2, 1 and 1 sequences
    ragged = (ragged_lengths, half_positions(sum(ragged_lengths), (6, 5), seed=3), (6, 5))
    return {"dense": dense, "ragged": ragged}


def qkv_of(total, heads=3, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, heads, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("case", ["dense", "ragged"])
def test_attention_with_rel_pos_matches_naive_values_and_gradients(case):
    lengths, positions, frame = layouts()[case]
    seqs = seqs_of(lengths, positions, frame, ragged=case == "ragged")
    rel_h, rel_w = tables(8, frame, resize=3)
    q, k, v = qkv_of(sum(lengths))
    leaves = [t.requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    out = packed_attention(q, k, v, seqs, "sdpa", RelPosBias(rel_h, rel_w, positions, frame))
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    reference = naive_attention(*ref_leaves[:3], lengths, positions, *ref_leaves[3:], frame)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (reference * weights).sum().backward()
    for ours, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["dense", "ragged"])
def test_workspace_is_reused_without_gradients_only(case):
    lengths, positions, frame = layouts()[case]
    seqs = seqs_of(lengths, positions, frame, ragged=case == "ragged")
    rel_h, rel_w = tables(8, frame)
    workspace = BiasWorkspace()
    bias = RelPosBias(rel_h, rel_w, positions, frame, workspace)
    with torch.no_grad():
        outputs = [packed_attention(*qkv_of(sum(lengths), seed=s), seqs, "sdpa", bias) for s in (1, 2)]
    buffers = {name: b.data_ptr() for name, b in workspace._buffers.items()}
    assert "bias" in buffers
    with torch.no_grad():  # the buffers are reused, and earlier outputs do not change with them
        again = packed_attention(*qkv_of(sum(lengths), seed=1), seqs, "sdpa", bias)
    assert {name: b.data_ptr() for name, b in workspace._buffers.items()} == buffers
    torch.testing.assert_close(again, outputs[0], atol=0, rtol=0)
    for seed, out in zip((1, 2), outputs):
        q, k, v = qkv_of(sum(lengths), seed=seed)
        torch.testing.assert_close(out, naive_attention(q, k, v, lengths, positions, rel_h, rel_w, frame),
                                   atol=1e-5, rtol=1e-5)
    # recorded for backward: autograd keeps the mask, so the workspace is left alone
    rel_h.requires_grad_()
    fresh = BiasWorkspace()
    packed_attention(*qkv_of(sum(lengths)), seqs, "sdpa", RelPosBias(rel_h, rel_w, positions, frame, fresh)).sum().backward()
    assert not fresh._buffers and rel_h.grad is not None and torch.isfinite(rel_h.grad).all()


def test_low_precision_bias_keeps_its_dtype():
    lengths, positions, frame = layouts()["ragged"]
    rel_h, rel_w = tables(8, frame)
    q, k, v = (t.bfloat16() for t in qkv_of(sum(lengths)))
    out = packed_attention(q, k, v, seqs_of(lengths, positions, frame), "sdpa", RelPosBias(rel_h, rel_w, positions, frame))
    reference = naive_attention(q.float(), k.float(), v.float(), lengths, positions, rel_h, rel_w, frame)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)

"""Every attention backend against a naive per-sequence softmax reference."""
import numpy as np
import pytest
import torch

from apt_dense import PackedSequences, available_backends, packed_attention
from apt_dense.attention import resolve_backend

CUDA = torch.cuda.is_available()


def naive(q, k, v, lengths, bias=None):
    out, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        logits = torch.einsum("ihd,jhd->hij", q[sl].double(), k[sl].double()) * q.shape[-1] ** -0.5
        if bias is not None:
            logits = logits + bias(start, n).double()
        out.append(torch.einsum("hij,jhd->ihd", logits.softmax(-1), v[sl].double()))
        start += n
    return torch.cat(out).to(q.dtype)


def make_seqs(lengths, device="cpu"):
    lengths = np.asarray(lengths)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).int().to(device)
    total = int(lengths.sum())
    positions = torch.randint(0, 8, (total, 2), device=device).float() / 2
    return PackedSequences(cu, lengths, int(lengths.max()), positions, (8, 8))


def qkv(total, heads=3, dim=8, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(total, heads, dim, generator=g, device=device).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("lengths", [[5], [7, 7, 7], [1, 9, 3, 30, 2, 17, 16, 8], [64, 3]])
def test_sdpa_matches_naive(lengths):
    seqs = make_seqs(lengths)
    q, k, v = qkv(sum(lengths))
    torch.testing.assert_close(packed_attention(q, k, v, seqs, "sdpa"), naive(q, k, v, lengths), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[6, 6], [1, 9, 3, 30, 2, 17]])
def test_sdpa_bias_matches_naive(lengths):
    seqs = make_seqs(lengths)
    total = sum(lengths)
    q, k, v = qkv(total)
    weights = torch.randn(3, 2)
    pos = seqs.positions

    def bias_of_slots(slots, q_batch):
        p = torch.cat([pos, pos.new_zeros(1, 2)])[slots]  # (n, L, 2)
        d = (p.unsqueeze(2) - p.unsqueeze(1))  # (n, L, L, 2)
        return torch.einsum("nijc,hc->nhij", d, weights)

    def bias_of_range(start, n):
        p = pos[start : start + n]
        return torch.einsum("ijc,hc->hij", p.unsqueeze(1) - p.unsqueeze(0), weights)

    out = packed_attention(q, k, v, seqs, "sdpa", bias_of_slots)
    torch.testing.assert_close(out, naive(q, k, v, lengths, bias_of_range), atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_bucketed_path():
    lengths = [3, 11, 5]
    seqs = make_seqs(lengths)
    q, k, v = (t.requires_grad_() for t in qkv(sum(lengths)))
    packed_attention(q, k, v, seqs, "sdpa").square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive(q2, k2, v2, lengths).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_backend_choice_and_errors():
    assert available_backends(torch.device("cpu"), torch.float32, False) == ["sdpa"]
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, False) == "sdpa"
    with pytest.raises(RuntimeError, match="cannot run"):
        resolve_backend("torch_varlen", torch.device("cpu"), torch.bfloat16, False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", torch.device("cpu"), torch.float32, False)


@pytest.mark.skipif(not CUDA, reason="CUDA attention backends need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backends_match_naive(dtype):
    lengths = [1, 9, 3, 130, 2, 17, 64]
    seqs = make_seqs(lengths, "cuda")
    q, k, v = qkv(sum(lengths), heads=4, dim=64, device="cuda", dtype=dtype)
    ref = naive(q, k, v, lengths)
    for backend in available_backends(torch.device("cuda"), dtype, False):
        out = packed_attention(q, k, v, seqs, backend)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=f"backend {backend}")

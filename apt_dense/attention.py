"""Attention over packed variable-length sequences.

Backends, resolved once per forward pass (:func:`resolve_backend`; ``"auto"`` picks the first
that applies) and then dispatched by :func:`packed_attention`:

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func``;
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10);
- ``sdpa``: portable. Equal-length sequences run as one batched
  ``scaled_dot_product_attention`` without a mask; ragged ones are grouped into buckets of
  similar length, padded, and masked. Supports an additive bias (relative positions).

The two fused backends call FlashAttention's varlen kernel, whose preconditions
:func:`available_backends` checks before choosing them: CUDA tensors in fp16/bf16, head dim at
most 256 and a multiple of 8, no additive bias. :func:`packed_attention` hands them ``(T, H, D)``
q/k/v with a contiguous last dim, ``cu_seqlens`` int32 with a leading 0 on the same device and
``max_seqlen`` a Python int.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .layout import PackedSequences

__all__ = ["BACKENDS", "check_backend_name", "available_backends", "resolve_backend", "packed_attention", "BucketPlan"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
FUSED_BACKENDS = ("flash_attn", "torch_varlen")
FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_FUSED_HEAD_DIM = 256

# A sequence joins the current bucket while its length is at least this fraction of the
# bucket's longest, bounding padding waste per bucket to about 1 - BUCKET_FILL.
BUCKET_FILL = 0.75

BiasFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# Kernel lookups are cached: a failed import costs about 0.1 ms, and the answer does not change
# within a process.
@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _fused_kernel(backend: str):
    return _flash_attn_func() if backend == "flash_attn" else _torch_varlen_func()


def _fused_kernels_run_on(device: torch.device) -> bool:
    """FlashAttention kernels exist for CUDA only (tests stand in a reference kernel on CPU)."""
    return device.type == "cuda"


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def available_backends(
    device: torch.device, dtype: torch.dtype, has_bias: bool, head_dim: int | None = None
) -> list[str]:
    """Backends that can run on ``device`` with ``dtype`` (and an additive bias when asked), in
    ``auto``'s order of preference. ``head_dim`` None skips the head-dim preconditions."""
    head_dim_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= MAX_FUSED_HEAD_DIM)
    fused_ok = _fused_kernels_run_on(device) and dtype in FUSED_DTYPES and not has_bias and head_dim_ok
    names = [name for name in FUSED_BACKENDS if fused_ok and _fused_kernel(name) is not None]
    return names + ["sdpa"]


_reported: set[tuple[str, str, str]] = set()


def resolve_backend(
    requested: str, device: torch.device, dtype: torch.dtype, has_bias: bool, head_dim: int | None = None
) -> str:
    """The backend that ``requested`` means here; a forced backend that cannot run is an error.
    Each distinct choice is logged once per process."""
    check_backend_name(requested)
    usable = available_backends(device, dtype, has_bias, head_dim)
    if requested == "auto":
        chosen = usable[0]
    elif requested in usable:
        chosen = requested
    else:
        if has_bias:
            why = "an additive bias (relative positions)"
        elif head_dim is not None and _fused_kernels_run_on(device) and dtype in FUSED_DTYPES:
            why = f"head dim {head_dim} (needs a multiple of 8, at most {MAX_FUSED_HEAD_DIM})"
        else:
            why = f"{device.type}/{dtype}"
        raise RuntimeError(
            f"attention backend {requested!r} cannot run with {why}; usable here: {usable}. "
            "Use attention_backend='auto' or 'sdpa'"
        )
    key = (requested, chosen, f"{device.type}/{dtype}/{'bias' if has_bias else 'nobias'}/d{head_dim}")
    if key not in _reported:
        _reported.add(key)
        logger.info("apt_dense attention: %s -> %s for %s", requested, chosen, key[2])
    return chosen


@dataclass(frozen=True)
class BucketPlan:
    """Padded batches for the ragged case, built once per layout on the host.

    ``slots[i]`` is ``(n_i, L_i)`` slot indices of bucket ``i`` (``T`` = a zero padding row);
    ``valid[i]`` marks real entries; ``inverse`` maps each slot to its row in the concatenation
    of all buckets' valid outputs.
    """

    slots: tuple[torch.Tensor, ...]
    valid: tuple[torch.Tensor, ...]
    valid_rows: tuple[torch.Tensor, ...]
    inverse: torch.Tensor


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        # Pinned + non_blocking: a host-to-device copy that does not wait for the GPU queue.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def bucket_plan(seqs: PackedSequences, device: torch.device) -> BucketPlan:
    """Group sequences by length (longest first) into buckets padded to their longest member."""
    key = ("buckets", str(device))
    if key in seqs.cache:
        return seqs.cache[key]
    lengths = seqs.lengths
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.argsort(-lengths, kind="stable")
    groups = []
    first = 0
    while first < len(order):
        longest = lengths[order[first]]
        last = first + 1
        while last < len(order) and lengths[order[last]] >= BUCKET_FILL * longest:
            last += 1
        groups.append(order[first:last])
        first = last
    total = int(lengths.sum())
    slots, valid, valid_rows, flat_valid_slots = [], [], [], []
    for group in groups:
        width = int(lengths[group].max())
        cols = np.arange(width)
        mask = cols[None, :] < lengths[group][:, None]
        index = np.where(mask, starts[group][:, None] + cols[None, :], total)
        rows = np.flatnonzero(mask.ravel())
        slots.append(_to_device(index.astype(np.int64), device))
        valid.append(_to_device(mask, device))
        valid_rows.append(_to_device(rows.astype(np.int64), device))
        flat_valid_slots.append(index.ravel()[rows])
    concat = np.concatenate(flat_valid_slots)
    inverse = np.empty(total, dtype=np.int64)
    inverse[concat] = np.arange(total)
    plan = BucketPlan(tuple(slots), tuple(valid), tuple(valid_rows), _to_device(inverse, device))
    seqs.cache[key] = plan
    return plan


def _sdpa_uniform(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, bias: torch.Tensor | None):
    t, h, d = q.shape
    shape = (t // length, length, h, d)
    qb, kb, vb = (x.view(shape).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias)
    return out.transpose(1, 2).reshape(t, h, d)


def _sdpa_bucketed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BucketPlan, bias_fn: BiasFn | None
) -> torch.Tensor:
    t, h, d = q.shape
    pad = q.new_zeros(1, h, d)
    qp, kp, vp = (torch.cat([x, pad]) for x in (q, k, v))
    outputs = []
    for slots, valid, rows in zip(plan.slots, plan.valid, plan.valid_rows):
        n, width = slots.shape
        qb, kb, vb = (x[slots].transpose(1, 2) for x in (qp, kp, vp))  # (n, H, L, D)
        key_ok = valid.view(n, 1, 1, width)
        if bias_fn is None:
            mask = key_ok
        else:
            bias = bias_fn(slots, qb)
            mask = bias.masked_fill(~key_ok, float("-inf"))
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        outputs.append(out.transpose(1, 2).reshape(n * width, h, d)[rows])
    return torch.cat(outputs)[plan.inverse]


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqs: PackedSequences,
    backend: str = "auto",
    bias_fn: BiasFn | None = None,
) -> torch.Tensor:
    """Softmax attention within each sequence of ``seqs``, scale ``head_dim ** -0.5``.

    Args:
        q, k, v: ``(T, H, D)`` slot-ordered projections, same dtype.
        seqs: the sequence boundaries.
        backend: a backend as :func:`resolve_backend` returns it (the model resolves once per
            forward pass), or ``"auto"`` to resolve it here for ``q``'s device and dtype.
        bias_fn: optional ``(slot_index (n, L), q (n, H, L, D)) -> (n or 1, H, L, L)`` additive
            attention bias for a padded batch of sequences; only the sdpa backend takes one.
    Returns:
        ``(T, H, D)``.
    """
    check_backend_name(backend)
    if backend == "auto":
        backend = resolve_backend(backend, q.device, q.dtype, bias_fn is not None, q.shape[-1])
    if backend == "sdpa":
        return _sdpa(q, k, v, seqs, bias_fn)
    if bias_fn is not None:
        raise ValueError(f"attention backend {backend!r} takes no additive bias (relative positions); use 'sdpa'")
    kernel = _fused_kernel(backend)
    if kernel is None:
        raise RuntimeError(f"attention backend {backend!r} is not installed here; use 'auto' or 'sdpa'")
    cu = seqs.cu_seqlens
    return kernel(q, k, v, cu, cu, seqs.max_len, seqs.max_len)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSequences, bias_fn: BiasFn | None):
    if seqs.uniform:
        bias = None
        if bias_fn is not None:
            slots = torch.arange(q.shape[0], device=q.device).view(-1, seqs.max_len)
            bias = bias_fn(slots, q.view(-1, seqs.max_len, *q.shape[1:]).transpose(1, 2))
        return _sdpa_uniform(q, k, v, seqs.max_len, bias)
    return _sdpa_bucketed(q, k, v, bucket_plan(seqs, q.device), bias_fn)

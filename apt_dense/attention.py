"""Attention over packed variable-length sequences.

Backends, chosen per call by ``"auto"`` or forced by name:

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, no bias);
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA, fp16/bf16,
  no bias);
- ``sdpa``: portable. Equal-length sequences run as one batched
  ``scaled_dot_product_attention`` without a mask; ragged ones are grouped into buckets of
  similar length, padded, and masked. Supports an additive bias (relative positions).

``auto`` prefers flash_attn, then torch_varlen, then sdpa, among those that apply.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .layout import PackedSequences

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "packed_attention", "BucketPlan"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")

# A sequence joins the current bucket while its length is at least this fraction of the
# bucket's longest, bounding padding waste per bucket to about 1 - BUCKET_FILL.
BUCKET_FILL = 0.75

BiasFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available_backends(device: torch.device, dtype: torch.dtype, has_bias: bool) -> list[str]:
    """Backends that can run on ``device`` with ``dtype`` (and an additive bias when asked)."""
    names = []
    fused_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not has_bias
    if fused_ok and _flash_attn_func() is not None:
        names.append("flash_attn")
    if fused_ok and _torch_varlen_func() is not None:
        names.append("torch_varlen")
    names.append("sdpa")
    return names


_reported: set[tuple[str, str, str]] = set()


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, has_bias: bool) -> str:
    """The backend that ``requested`` means here; a forced backend that cannot run is an error."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    usable = available_backends(device, dtype, has_bias)
    if requested == "auto":
        chosen = usable[0]
    elif requested in usable:
        chosen = requested
    else:
        why = "an additive bias (relative positions)" if has_bias else f"{device.type}/{dtype}"
        raise RuntimeError(
            f"attention backend {requested!r} cannot run with {why}; usable here: {usable}. "
            "Use attention_backend='auto' or 'sdpa'"
        )
    key = (requested, chosen, f"{device.type}/{dtype}/{'bias' if has_bias else 'nobias'}")
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
        q, k, v: ``(T, H, D)`` slot-ordered projections.
        seqs: the sequence boundaries.
        bias_fn: optional ``(slot_index (n, L), q (n, H, L, D)) -> (n or 1, H, L, L)`` additive
            attention bias for a padded batch of sequences; only the sdpa backend takes one.
    Returns:
        ``(T, H, D)``.
    """
    chosen = resolve_backend(backend, q.device, q.dtype, bias_fn is not None)
    if chosen == "flash_attn":
        cu = seqs.cu_seqlens
        return _flash_attn_func()(q, k, v, cu, cu, seqs.max_len, seqs.max_len)
    if chosen == "torch_varlen":
        cu = seqs.cu_seqlens
        return _torch_varlen_func()(q, k, v, cu, cu, seqs.max_len, seqs.max_len)
    if seqs.uniform:
        bias = None
        if bias_fn is not None:
            slots = torch.arange(q.shape[0], device=q.device).view(-1, seqs.max_len)
            bias = bias_fn(slots, q.view(-1, seqs.max_len, *q.shape[1:]).transpose(1, 2))
        return _sdpa_uniform(q, k, v, seqs.max_len, bias)
    return _sdpa_bucketed(q, k, v, bucket_plan(seqs, q.device), bias_fn)

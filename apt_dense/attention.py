"""Attention over packed variable-length sequences.

Backends, resolved once per forward pass (:func:`resolve_backend`; ``"auto"`` picks the first
that applies) and then dispatched by :func:`packed_attention`:

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func``;
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10);
- ``sdpa``: portable. Equal-length sequences run as one batched
  ``scaled_dot_product_attention`` without a mask; ragged ones are grouped into at most
  :data:`MAX_BUCKETS` buckets of similar length, padded, and masked. Supports an additive bias
  (relative positions).

Under ``torch.compile`` (see :meth:`apt_dense.APTViT.compile_blocks`) nothing here reads a
batch-dependent Python value, so one graph serves every batch:

- ragged ``sdpa`` runs as the custom op ``apt_dense::bucketed_sdpa`` (a fake implementation for
  the compiler, autograd through an eager recomputation); its bucket index tensors have unbacked
  sizes, and their number is fixed, so neither the bucket shapes nor their count are guarded;
- ``torch_varlen`` is already a custom op with a fake implementation; it gets the frame's slot
  capacity (:attr:`~apt_dense.layout.PackedSequences.max_slots`), a static upper bound, as
  ``max_seqlen``;
- ``flash_attn`` is not offered: flash-attn's varlen function breaks ``torch.compile``
  (flash-attn issue 1894), so ``auto`` takes ``torch_varlen``, the same FlashAttention kernel.

The two fused backends call FlashAttention's varlen kernel, whose preconditions
:func:`available_backends` checks before choosing them: CUDA tensors in fp16/bf16, head dim at
most 256 and a multiple of 8, no additive bias. :func:`packed_attention` hands them ``(T, H, D)``
q/k/v with a contiguous last dim, ``cu_seqlens`` int32 with a leading 0 on the same device and
``max_seqlen`` a Python int.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .layout import PackedSequences
from .positions import RelPosBias

__all__ = ["BACKENDS", "check_backend_name", "available_backends", "resolve_backend", "packed_attention", "BucketPlan"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
FUSED_BACKENDS = ("flash_attn", "torch_varlen")
FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_FUSED_HEAD_DIM = 256

# A sequence joins the current bucket while its length is at least this fraction of the
# bucket's longest, bounding padding waste per bucket to about 1 - BUCKET_FILL.
BUCKET_FILL = 0.75
# At most this many buckets, always passed as this many tensors (unused ones empty): a fixed
# argument count is what lets one compiled graph take every batch.
MAX_BUCKETS = 4

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


def _exporting() -> bool:
    """Inside ``torch.export`` tracing (torch 2.4 has no way to ask, nor does it export here)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def available_backends(
    device: torch.device, dtype: torch.dtype, has_bias: bool, head_dim: int | None = None, compiled: bool = False
) -> list[str]:
    """Backends that can run on ``device`` with ``dtype`` (and an additive bias when asked), in
    ``auto``'s order of preference. ``head_dim`` None skips the head-dim preconditions.
    ``compiled``: the blocks run under ``torch.compile``, which flash-attn's varlen function breaks."""
    if _exporting():
        return ["sdpa"]  # exported programs hold plain aten ops (ONNX has no varlen kernel)
    head_dim_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= MAX_FUSED_HEAD_DIM)
    fused_ok = _fused_kernels_run_on(device) and dtype in FUSED_DTYPES and not has_bias and head_dim_ok
    fused = [name for name in FUSED_BACKENDS if not (compiled and name == "flash_attn")]
    names = [name for name in fused if fused_ok and _fused_kernel(name) is not None]
    return names + ["sdpa"]


_reported: set[tuple[str, str, str]] = set()


def resolve_backend(
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    has_bias: bool,
    head_dim: int | None = None,
    compiled: bool = False,
) -> str:
    """The backend that ``requested`` means here (``compiled``: for blocks under
    ``torch.compile``); a forced backend that cannot run is an error. Each distinct choice is
    logged once per process."""
    check_backend_name(requested)
    usable = available_backends(device, dtype, has_bias, head_dim, compiled)
    if requested == "auto":
        chosen = usable[0]
    elif requested in usable:
        chosen = requested
    else:
        if _exporting():
            why = "torch.export (exported programs run attention as plain sdpa)"
        elif compiled and requested == "flash_attn":
            why = "torch.compile (flash-attn's varlen function breaks it, flash-attn issue 1894)"
        elif has_bias:
            why = "an additive bias (relative positions)"
        elif head_dim is not None and _fused_kernels_run_on(device) and dtype in FUSED_DTYPES:
            why = f"head dim {head_dim} (needs a multiple of 8, at most {MAX_FUSED_HEAD_DIM})"
        else:
            why = f"{device.type}/{dtype}"
        raise RuntimeError(
            f"attention backend {requested!r} cannot run with {why}; usable here: {usable}. "
            "Use attention_backend='auto' or 'sdpa'"
        )
    key = (requested, chosen,
           f"{device.type}/{dtype}/{'bias' if has_bias else 'nobias'}/d{head_dim}{'/compiled' if compiled else ''}")
    if key not in _reported:
        _reported.add(key)
        logger.info("apt_dense attention: %s -> %s for %s", requested, chosen, key[2])
    return chosen


@dataclass(frozen=True)
class BucketPlan:
    """Padded batches for the ragged case, built once per layout on the host.

    ``slots`` holds exactly :data:`MAX_BUCKETS` tensors: ``slots[i]`` is ``(n_i, L_i)`` slot
    indices of bucket ``i`` (``T`` for padding), an unused bucket is ``(0, 1)``. ``key_ok[i]``
    says which entries are real: an ``(n_i, L_i)`` mask for a padded bucket; ``(0, 1)`` when
    it has no padding (attention runs unmasked); ``(0, 2)`` when, moreover, it is every slot
    in order, i.e. all sequences have the same length (q/k/v are viewed, not gathered). The
    tensors' sizes are unbacked for the compiler
    (:func:`torch._dynamo.decorators.mark_unbacked`): they only enter the
    ``apt_dense::bucketed_sdpa`` op and are never guarded on, so neither the bucket shapes nor
    these cases recompile. ``frame_size`` is the sequences' frame ``(rows, cols)`` as a ``(2,)``
    int64 host tensor: data for the op's relative positions, so that a new image size (a new
    frame for global blocks) is not a guard either.

    ``padded``: None, except in a plan built inside an exported graph (:mod:`apt_dense.export`),
    whose sizes are unknown while tracing: there ``padded[i]`` says (a symbolic bool) whether
    bucket ``i`` holds padding, every bucket runs (an empty one on empty tensors), and
    ``key_ok[i]`` is an ``(n_i, L_i)`` additive float mask, 0 for real entries and ``-inf`` for
    padding (ONNX translates a boolean sdpa mask with an extra pass that clears NaNs).
    """

    slots: tuple[torch.Tensor, ...]
    key_ok: tuple[torch.Tensor, ...]
    frame_size: torch.Tensor
    padded: tuple | None = None


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        # Pinned + non_blocking: a host-to-device copy that does not wait for the GPU queue.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _opaque(tensor: torch.Tensor) -> torch.Tensor:
    """Sizes that the compiler neither specialises (0/1) nor guards."""
    for dim in range(tensor.dim()):
        torch._dynamo.decorators.mark_unbacked(tensor, dim)
    return tensor


def bucket_groups(lengths: np.ndarray) -> list[np.ndarray]:
    """Sequence indices per bucket, longest first: a sequence joins a bucket while it is at least
    :data:`BUCKET_FILL` of the bucket's longest; beyond :data:`MAX_BUCKETS` buckets, the
    neighbours whose merge adds the least padded attention work (sequences x width^2) merge."""
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
    while len(groups) > MAX_BUCKETS:
        widths = np.array([lengths[g[0]] for g in groups], dtype=np.float64)
        sizes = np.array([len(g) for g in groups], dtype=np.float64)
        added = sizes[1:] * (widths[:-1] ** 2 - widths[1:] ** 2)
        i = int(np.argmin(added))
        groups[i : i + 2] = [np.concatenate(groups[i : i + 2])]
    return groups


def _plan_key(device: torch.device) -> tuple[str, str]:
    return ("buckets", str(device))


@torch.compiler.disable
def bucket_plan(seqs: PackedSequences, device: torch.device) -> BucketPlan:
    """Group sequences by length into buckets padded to their longest member (cached on ``seqs``;
    host work, kept out of compiled graphs)."""
    key = _plan_key(device)
    if key in seqs.cache:
        return seqs.cache[key]
    lengths = seqs.lengths
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())

    # Empty entries are (0, 1) or (0, 2), never (0, 0): their strides match those of used
    # entries, so the compiler's contiguity guards on the (fixed) argument lists always hold.
    def empty(dtype: torch.dtype, width: int = 1) -> torch.Tensor:
        return _opaque(torch.zeros(0, width, dtype=dtype, device=device))

    slots, key_ok = [], []
    groups = bucket_groups(lengths)
    for group in groups:
        width = int(lengths[group].max())
        cols = np.arange(width)
        real = cols[None, :] < lengths[group][:, None]
        index = np.where(real, starts[group][:, None] + cols[None, :], total)
        slots.append(_opaque(_to_device(index.astype(np.int64), device)))
        if not real.all():
            key_ok.append(_opaque(_to_device(real, device)))
        else:  # no padding; a lone bucket then holds every slot in order (the sort is stable)
            key_ok.append(empty(torch.bool, 2 if len(groups) == 1 else 1))
    unused = MAX_BUCKETS - len(slots)
    slots += [empty(torch.int64) for _ in range(unused)]
    key_ok += [empty(torch.bool) for _ in range(unused)]
    plan = BucketPlan(tuple(slots), tuple(key_ok), torch.tensor(seqs.frame_size, dtype=torch.int64))
    seqs.cache[key] = plan
    return plan


def _sdpa_uniform(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, bias_fn: BiasFn | None):
    """Sequences of ``length`` consecutive slots each: one batched SDPA."""
    t, h, d = q.shape
    n = t // length
    qb = q.view(n, length, h, d).transpose(1, 2)
    bias = None
    if isinstance(bias_fn, RelPosBias) and bias_fn.tiles_frame(length):
        # Attention does not depend on the order of the keys: in the frame's raster order they
        # take the grid bias, one broadcast sum (window-major keys would need a gather per entry).
        bias, order = bias_fn.on_grid(qb)
        rows = (order + torch.arange(0, t, length, device=q.device).unsqueeze(1)).flatten()
        k, v = k[rows], v[rows]
    elif bias_fn is not None:
        bias = bias_fn(torch.arange(t, device=q.device).view(n, length), qb)
    kb, vb = (x.view(n, length, h, d).transpose(1, 2) for x in (k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias)
    if _exporting():
        # The reshape below is traced as a view when this kernel's output strides allow one; the
        # ONNX exporter re-traces sdpa with other strides, where that view fails. A copy fixes them.
        out = out.contiguous()
    return out.transpose(1, 2).reshape(t, h, d)


def _sdpa_bucketed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: Sequence[torch.Tensor],
    key_ok: Sequence[torch.Tensor],
    bias_fn: BiasFn | None,
    padded: Sequence | None = None,
) -> torch.Tensor:
    """``padded``: a traced plan's per-bucket flags (:class:`BucketPlan`); None for a host plan."""
    traced = padded is not None
    t, h, d = q.shape
    out = q.new_empty(t + 1, h, d)  # row t takes the padded entries' outputs
    for i, (index, real) in enumerate(zip(slots, key_ok)):
        n, width = index.shape
        # A traced plan's sizes are symbols: no branch may read them.
        if not traced and n == 0:
            continue
        if not traced and real.shape == (0, 2):  # every slot in order: equal lengths
            return _sdpa_uniform(q, k, v, width, bias_fn)
        # Padded entries read a real row instead of a zero row (no padded copy of q/k/v):
        # as keys they are masked, as queries their outputs land in row t.
        rows = index.clamp(max=t - 1)
        qb, kb, vb = (x[rows].transpose(1, 2) for x in (q, k, v))  # (n, H, L, D)
        mask = None if bias_fn is None else bias_fn(index, qb)
        if traced and mask is None:
            result = _traced_bucket_sdpa(padded[i], qb, kb, vb, real.view(n, 1, 1, width).to(qb.dtype))
        else:
            # A padded bucket (a traced one may be) masks its padding keys, unless the bias does.
            if (traced or real.numel()) and not getattr(bias_fn, "masks_padding", False):
                real = real.view(n, 1, 1, width)
                if traced:  # an additive float mask
                    mask = mask + real.to(mask.dtype)
                else:
                    mask = real if mask is None else mask.masked_fill(~real, float("-inf"))
            result = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        out[index] = result.transpose(1, 2)  # (n, L, H, D)
    return out[:t]


def _traced_bucket_sdpa(padded, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor):
    """A bucket of a traced plan without a bias: masked only where it holds padding
    (``torch.cond`` on its flag), since the additive mask is one more pass over the attention
    weights where sdpa is not fused (ONNX Runtime); a bucket of equal-length sequences runs as
    the dense model's attention. (A relative-position bias masks padding keys itself.)"""
    return torch.cond(padded, _sdpa_with_mask, _sdpa_plain, (q, k, v, key_bias))


def _sdpa_plain(q, k, v, key_bias):
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_with_mask(q, k, v, key_bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)


# The ragged sdpa path as one opaque op for compiled graphs. Eager code calls _sdpa_bucketed
# directly (native autograd, no recomputation).

def _op_bias(rel_pos_h, rel_pos_w, positions, frame_size: torch.Tensor) -> RelPosBias | None:
    if rel_pos_h is None:
        return None
    return RelPosBias(rel_pos_h, rel_pos_w, positions, tuple(frame_size.tolist()))  # a host tensor: no sync


@torch.library.custom_op("apt_dense::bucketed_sdpa", mutates_args=())
def _bucketed_sdpa_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: list[torch.Tensor],
    key_ok: list[torch.Tensor],
    rel_pos_h: torch.Tensor | None,
    rel_pos_w: torch.Tensor | None,
    positions: torch.Tensor | None,
    frame_size: torch.Tensor,
) -> torch.Tensor:
    return _sdpa_bucketed(q, k, v, slots, key_ok, _op_bias(rel_pos_h, rel_pos_w, positions, frame_size))


@_bucketed_sdpa_op.register_fake
def _(q, k, v, slots, key_ok, rel_pos_h, rel_pos_w, positions, frame_size):
    return torch.empty_like(q)


@torch.library.custom_op("apt_dense::bucketed_sdpa_backward", mutates_args=())
def _bucketed_sdpa_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: list[torch.Tensor],
    key_ok: list[torch.Tensor],
    rel_pos_h: torch.Tensor | None,
    rel_pos_w: torch.Tensor | None,
    positions: torch.Tensor | None,
    frame_size: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradients of q, k, v (and the relative-position tables) by recomputing the forward pass
    eagerly: the padded buckets are not kept between forward and backward. (``torch.func.vjp``,
    because a custom op's body runs with autograd's dispatch keys excluded.)"""
    tables = () if rel_pos_h is None else (rel_pos_h, rel_pos_w)

    def forward(q, k, v, *tables):
        return _sdpa_bucketed(q, k, v, slots, key_ok, _op_bias(*(tables or (None, None)), positions, frame_size))

    _, vjp = torch.func.vjp(forward, q, k, v, *tables)
    return list(vjp(grad))


@_bucketed_sdpa_backward_op.register_fake
def _(grad, q, k, v, slots, key_ok, rel_pos_h, rel_pos_w, positions, frame_size):
    tables = [] if rel_pos_h is None else [torch.empty_like(rel_pos_h), torch.empty_like(rel_pos_w)]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *tables]


def _bucketed_sdpa_setup(ctx, inputs, output):
    q, k, v, slots, key_ok, rel_pos_h, rel_pos_w, positions, frame_size = inputs
    ctx.save_for_backward(q, k, v, rel_pos_h, rel_pos_w, positions, *slots, *key_ok)
    ctx.frame_size = frame_size


def _bucketed_sdpa_grad(ctx, grad):
    q, k, v, rel_pos_h, rel_pos_w, positions, *plan = ctx.saved_tensors
    slots, key_ok = plan[:MAX_BUCKETS], plan[MAX_BUCKETS:]
    grads = _bucketed_sdpa_backward_op(grad, q, k, v, slots, key_ok, rel_pos_h, rel_pos_w, positions, ctx.frame_size)
    dq, dk, dv, *tables = grads
    d_rel_h, d_rel_w = tables or (None, None)
    return dq, dk, dv, [None] * MAX_BUCKETS, [None] * MAX_BUCKETS, d_rel_h, d_rel_w, None, None


_bucketed_sdpa_op.register_autograd(_bucketed_sdpa_grad, setup_context=_bucketed_sdpa_setup)


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
            Under ``torch.compile`` a ragged layout's bias must be a :class:`RelPosBias`.
    Returns:
        ``(T, H, D)``.
    """
    check_backend_name(backend)
    compiling = torch.compiler.is_compiling()
    if backend == "auto":
        backend = resolve_backend(backend, q.device, q.dtype, bias_fn is not None, q.shape[-1], compiling)
    if backend == "sdpa":
        return _sdpa_compiled(q, k, v, seqs, bias_fn) if compiling else _sdpa(q, k, v, seqs, bias_fn)
    if bias_fn is not None:
        raise ValueError(f"attention backend {backend!r} takes no additive bias (relative positions); use 'sdpa'")
    kernel = _fused_kernel(backend)
    if kernel is None:
        raise RuntimeError(f"attention backend {backend!r} is not installed here; use 'auto' or 'sdpa'")
    cu = seqs.cu_seqlens
    # Compiled: the static capacity, an upper bound the kernels accept, instead of this batch's
    # longest sequence (an int the compiler would guard on).
    max_len = seqs.max_slots if compiling and seqs.max_slots is not None else seqs.max_len
    return kernel(q, k, v, cu, cu, max_len, max_len)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSequences, bias_fn: BiasFn | None):
    if seqs.uniform:
        return _sdpa_uniform(q, k, v, seqs.max_len, bias_fn)
    plan = bucket_plan(seqs, q.device)
    return _sdpa_bucketed(q, k, v, plan.slots, plan.key_ok, bias_fn)


def _sdpa_compiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSequences, bias_fn: BiasFn | None):
    """:func:`_sdpa` without reading lengths: the layout's static ``ragged`` flag picks the path."""
    if not seqs.ragged:
        return _sdpa_uniform(q, k, v, seqs.max_slots, bias_fn)
    if bias_fn is not None and not isinstance(bias_fn, RelPosBias):
        raise TypeError("under torch.compile, ragged sdpa attention takes a RelPosBias as its bias (the custom op "
                        f"needs tensors), got {type(bias_fn).__name__}")
    # The model builds the plan before the blocks (APTViT.block_context): a traced cache hit.
    # Without one, the (disabled) builder runs eagerly at the cost of a graph break.
    plan = seqs.cache.get(_plan_key(q.device)) or bucket_plan(seqs, q.device)
    if plan.padded is not None:  # exported: plain aten ops, which AOTInductor fuses and ONNX can express
        return _sdpa_bucketed(q, k, v, plan.slots, plan.key_ok, bias_fn, plan.padded)
    tables = (None, None, None) if bias_fn is None else (bias_fn.rel_pos_h, bias_fn.rel_pos_w, bias_fn.positions)
    return _bucketed_sdpa_op(q, k, v, list(plan.slots), list(plan.key_ok), *tables, plan.frame_size)

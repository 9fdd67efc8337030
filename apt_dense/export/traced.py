"""The traced forward pass: :meth:`APTViT.forward_features` with data-dependent sizes as symbols.

Eager APT reads the token counts back to the host once per pass and packs on the host. An
exported program has no host, so the same stages run in the graph, and every size the eager pass
reads from the host becomes an *unbacked* size (``Tensor.item()`` in the graph, bounded with
``torch._check``):

1-2a. scores and levels: :meth:`TokenPlanner.cell_levels`, with the thresholds as a graph input;
2b. layout: :meth:`PendingLayout.pack_traced` with the batch's token count ``N`` as a symbol;
3. embedding: :meth:`APTViT.embed`, unchanged;
4. blocks: :meth:`APTViT.block_context` and :meth:`APTViT.run_blocks`, unchanged. Ragged
   sequences run on a :class:`~apt_dense.attention.BucketPlan` built here, in the graph
   (:func:`traced_bucket_plan`): sequences sorted by length, cut into at most
   :data:`~apt_dense.attention.MAX_BUCKETS` buckets by eager's rule, each padded to its
   longest member and masked where it holds padding (``torch.cond``: a bucket of
   equal-length sequences, e.g. any image alone in its batch, runs unmasked). Bucket shapes are
   symbols too;
5. dense maps: :meth:`APTViT.run_blocks`, cropped to the input.

Sizes read back per pass: ``N`` (one read), then every bucket's count and width for both
attention kinds (one read of one small tensor). The dense model (nothing can merge) has none:
its sizes are static and its attention is one unmasked batched sdpa, as eager.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..attention import BUCKET_FILL, MAX_BUCKETS, BucketPlan, _plan_key
from ..layout import ImagePrefix, PackedSequences, PatchLayout, PendingLayout
from ..model import APTViT, _pad_bottom_right
from ..scoring import intensity_extremes

__all__ = ["TracedBackbone", "traced_layout", "traced_bucket_plans"]

# Narrowest bucket width: a width that might be 1 would make sdpa's mask broadcasting a guard.
_MIN_WIDTH = 2


class TracedBackbone(nn.Module):
    """The module that is exported: ``images [, thresholds] -> {name: output}``.

    Args:
        model: an :class:`APTViT` (or subclass) in eval mode; its parameters are shared, not copied.

    Inputs:
        images: ``(B, C, H, W)`` float, normalised as ``model`` expects; ``H, W`` fixed per export.
        thresholds: ``(K,)`` float32 thresholds of levels ``1..K`` (only when the planner can
            merge): one export serves every threshold setting.

    Outputs, by name:
        the model's :meth:`~apt_dense.APTViT.head_outputs` (``features_{i}``: a ``(B, C,
        ceil(H/p), ceil(W/p))`` map per ``out_indices`` entry; SAM's ``image_embeddings``, ...),
        ``tokens_per_image`` ``(B,)`` int64, and ``input_checks`` ``(3,)`` int64: any non-finite
        pixel, and the grayscale extremes in 1/256 steps
        (:func:`~apt_dense.scoring.intensity_extremes`; zeros when nothing merges) for the
        runner's scale warning.
    """

    def __init__(self, model: APTViT):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, thresholds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        model = self.model
        planner = model.planner
        crop = tuple(-(-side // model.patch_size) for side in images.shape[-2:])
        images = _pad_bottom_right(images, model.size_divisibility)                 # 0.
        checks = [(~torch.isfinite(images)).any().view(1).long()]
        gray = planner.intensity(images) if planner.merges else None
        checks.append(intensity_extremes(gray) if gray is not None else checks[0].new_zeros(2))
        cell_level = planner.cell_levels(images, gray, thresholds)                   # 1-2a.
        layout = traced_layout(cell_level, planner.window_size, planner.levels)      # 2b.
        prefix = ImagePrefix.build(layout, model.num_prefix_tokens) if model.cls_token is not None else None
        x = model.embed(images, layout, prefix, crop)                                # 3.
        ctx = model.block_context(layout, prefix, x)
        traced_bucket_plans([a.seqs for a in (ctx.image, ctx.window) if a is not None], x.device)
        features, _ = model.run_blocks(x, ctx, layout, crop)                         # 4-5.
        outputs = model.head_outputs(features)
        return {**outputs, "tokens_per_image": layout.tokens_per_image, "input_checks": torch.cat(checks)}


def traced_layout(cell_level: torch.Tensor, window_size: int, num_levels: int) -> PatchLayout:
    """Stage 2b in the graph: the packed layout of ``(B, Hc, Wc)`` levels. With ``num_levels``
    0 (nothing merges) the token count is the static ``B * Hc * Wc``; otherwise it is read in
    the graph as an unbacked size, between ``B`` (one token per image at least) and that."""
    pending = PendingLayout.from_levels(cell_level, window_size)
    b, hc, wc = cell_level.shape
    if num_levels == 0:
        return pending.pack_traced(b * hc * wc, num_levels)
    num_tokens = pending.counts.sum().item()
    torch._check(num_tokens >= b)
    torch._check(num_tokens <= b * hc * wc)
    return pending.pack_traced(num_tokens, num_levels)


def traced_bucket_plans(sequences: list[PackedSequences], device: torch.device) -> None:
    """Give every ragged sequence set its bucket plan, computed in the graph (where
    ``packed_attention`` looks for it, as for compiled blocks). The bucket sizes of all sets
    are read in one go."""
    ragged = [seqs for seqs in sequences if seqs.ragged]
    if not ragged:
        return
    cuts = [_bucket_cuts(seqs) for seqs in ragged]
    sizes = torch.stack([value for cut in cuts for value in cut[2]]).tolist()
    per_set = len(cuts[0][2])
    for i, (seqs, (order, lengths, _)) in enumerate(zip(ragged, cuts)):
        seqs.cache[_plan_key(device)] = _bucket_plan(seqs, order, lengths, sizes[per_set * i : per_set * (i + 1)])


def _bucket_cuts(seqs: PackedSequences) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Sequences sorted longest first and cut by eager's rule (a sequence joins the current
    bucket while it is at least ``BUCKET_FILL`` of the bucket's longest; the last bucket takes
    the rest). Returns the order, the lengths, and ``[count_0, width_0, padded_0, count_1, ...]``
    as 0-d int64 device tensors to read back (widths at least ``_MIN_WIDTH``; ``padded``: 1 when
    a member is shorter than the width)."""
    cu = seqs.cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    by_length, order = torch.sort(lengths, descending=True)  # ties in any order: buckets only bound padding
    last = by_length.shape[0] - 1
    rank = torch.arange(last + 1, device=cu.device)
    start = torch.zeros((), dtype=torch.long, device=cu.device)
    cut = []
    for i in range(MAX_BUCKETS):
        longest = by_length[start.clamp(max=last)]
        if i + 1 < MAX_BUCKETS:
            end = (by_length.double() >= BUCKET_FILL * longest.double()).sum().clamp(min=start)
        else:
            end = torch.full_like(start, last + 1)
        width = longest.clamp(min=_MIN_WIDTH)
        padded = ((rank >= start) & (rank < end) & (by_length < width)).any().long()
        cut += [end - start, width, padded]
        start = end
    return order, lengths, cut


def _bucket_plan(seqs: PackedSequences, order: torch.Tensor, lengths: torch.Tensor, sizes: list) -> BucketPlan:
    """The ``(n_i, L_i)`` slot index and additive key mask of every bucket, from the symbolic sizes."""
    cu = seqs.cu_seqlens.long()
    total = seqs.num_slots
    first = 0
    slots, key_ok, padded = [], [], []
    for count, width, has_padding in zip(sizes[0::3], sizes[1::3], sizes[2::3]):
        torch._check(count >= 0)
        torch._check(width >= _MIN_WIDTH)
        torch._check(has_padding >= 0)
        torch._check(has_padding <= 1)
        padded.append(has_padding == 1)
        # narrow, not a slice: the slice's size would be a Min/Max expression of the symbols,
        # which every later shape (and the compiler's sympy work) would carry.
        torch._check(first + count <= order.shape[0])
        members = order.narrow(0, first, count)
        first = first + count
        cols = torch.arange(width, device=cu.device)
        real = cols.view(1, -1) < lengths[members].view(-1, 1)
        slots.append(torch.where(real, cu[members].view(-1, 1) + cols.view(1, -1), total))
        key_ok.append(torch.zeros(real.shape, device=cu.device).masked_fill(~real, float("-inf")))
    return BucketPlan(tuple(slots), tuple(key_ok), torch.tensor(seqs.frame_size, dtype=torch.int64), tuple(padded))

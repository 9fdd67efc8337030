"""Stage 4: transformer blocks on packed tokens ``(N, C)``.

Two families keep the host checkpoints' key names:

- ViTDet / MAE (detectron2 ``ViT``): ``norm1, attn.qkv, attn.proj, [attn.rel_pos_h/w], norm2,
  mlp.fc1, mlp.fc2``;
- EVA-02: ``norm1, attn.{q,k,v}_proj, attn.q_bias, attn.v_bias, attn.proj, norm2,
  mlp.{w1, w2, ffn_ln, w3}`` with 2D RoPE;
- DINOv2 (transformers' ``Dinov2Layer``): ``norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1,
  norm2, mlp.{fc1, fc2}`` (or SwiGLU ``mlp.{gate,up,down}_proj``), ``layer_scale2.lambda1``;
  global attention only.

A window block attends within each window's sequence, a global block within each image's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import packed_attention
from .layout import ImagePrefix, PackedSequences
from .positions import BiasWorkspace, RelPosBias, apply_rope, traced

__all__ = [
    "AttentionContext",
    "PackedContext",
    "DropPath",
    "Mlp",
    "SwiGLU",
    "ViTDetAttention",
    "EVA02Attention",
    "Block",
    "LayerScale",
    "DINOv2Attention",
    "DINOv2SwiGLU",
    "DINOv2Block",
]


@dataclass
class AttentionContext:
    """What one kind of block (window or global) needs for one forward pass.

    Attributes:
        seqs: the sequences and slot positions.
        rope: ``(cos, sin)`` ``(T, head_dim)`` float32 tables, or None.
        backend: the attention backend resolved for this pass (``flash_attn``, ``torch_varlen``
            or ``sdpa``; see :func:`apt_dense.attention.resolve_backend`).
        workspace: memory the blocks' relative-position biases reuse in eager passes without
            gradients (freed with the context at the end of the pass).
    """

    seqs: PackedSequences
    rope: tuple[torch.Tensor, torch.Tensor] | None
    backend: str
    workspace: BiasWorkspace = field(default_factory=BiasWorkspace)


@dataclass
class PackedContext:
    """Per-forward state shared by all blocks, built once per forward pass.

    The blocks run on the residual stream's ``R`` rows: the layout's ``N`` tokens, or with a cls
    token ``N + B`` slots (``prefix``).

    Attributes:
        slot_image: ``(R,)`` int64 image of every row (stochastic depth drops whole images).
        batch_size: ``B``.
        image: global blocks' sequences (one per image).
        window: window blocks' sequences (one per window), None without window blocks.
        prefix: where the cls tokens sit, None without them.
    """

    slot_image: torch.Tensor
    batch_size: int
    image: AttentionContext
    window: AttentionContext | None
    prefix: ImagePrefix | None = None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, C)`` stream -> ``(N, C)`` in the layout's token order."""
        return x if self.prefix is None else self.prefix.tokens(x)


class DropPath(nn.Module):
    """Stochastic depth per image: all tokens of a dropped image skip the residual branch."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        scale = x.new_empty(ctx.batch_size).bernoulli_(keep).div_(keep)
        return x * scale[ctx.slot_image].unsqueeze(1)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """``fc1 -> act -> fc2`` (timm's ``Mlp`` key names)."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """EVA-02's gated MLP: ``w3(ffn_ln(silu(w1 x) * w2 x))``."""

    def __init__(self, dim: int, hidden: int, norm_layer: type[nn.Module] = nn.LayerNorm, subln: bool = True):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.ffn_ln = norm_layer(hidden) if subln else nn.Identity()
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))


class ViTDetAttention(nn.Module):
    """Fused-qkv attention with optional decomposed relative positions (detectron2 ``ViT``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need input_size (the frame in cells)")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t, c = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, -1).unbind(1)
        bias = None
        if self.use_rel_pos:
            # Graphs allocate their own buffers (and must not guard on the workspace).
            workspace = None if traced() else ctx.workspace
            bias = RelPosBias(self.rel_pos_h, self.rel_pos_w, ctx.seqs.positions, ctx.seqs.frame_size, workspace)
        out = packed_attention(q, k, v, ctx.seqs, ctx.backend, bias)
        return self.proj(out.reshape(t, c))


class EVA02Attention(nn.Module):
    """EVA-02 attention: separate bias-free q/k/v projections, q and v biases, 2D RoPE."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias).view(t, self.num_heads, -1)
        k = F.linear(x, self.k_proj.weight).view(t, self.num_heads, -1)
        v = F.linear(x, self.v_proj.weight, self.v_bias).view(t, self.num_heads, -1)
        if ctx.rope is not None:
            q = apply_rope(q, *ctx.rope).type_as(v)
            k = apply_rope(k, *ctx.rope).type_as(v)
        out = packed_attention(q, k, v, ctx.seqs, ctx.backend)
        return self.proj(out.reshape(t, c))


class Block(nn.Module):
    """Pre-norm transformer block on packed tokens.

    Args:
        use_window: attend within windows (else within images).
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp: nn.Module,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        drop_path: float = 0.0,
        use_window: bool = False,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        self.use_window = use_window

    def forward(self, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        """``(R, C) -> (R, C)``."""
        actx = ctx.window if self.use_window else ctx.image
        h = self.attn(actx.seqs.to_slots(self.norm1(x)), actx)
        x = x + self.drop_path(actx.seqs.from_slots(h), ctx)
        return x + self.drop_path(self.mlp(self.norm2(x)), ctx)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2's ``lambda1``)."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class DINOv2Attention(nn.Module):
    """DINOv2 attention: separate q/k/v projections with biases, then ``o_proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t, c = x.shape
        q, k, v = (proj(x).view(t, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = packed_attention(q, k, v, ctx.seqs, ctx.backend)
        return self.o_proj(out.reshape(t, c))


class DINOv2SwiGLU(nn.Module):
    """DINOv2-giant's gated MLP ``down_proj(silu(gate_proj x) * up_proj x)``, without a sub-LN.

    ``hidden`` is the plain MLP's width; like DINOv2, two thirds of it, rounded up to a multiple
    of 8, is used.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DINOv2Block(nn.Module):
    """Pre-norm DINOv2 block with LayerScale after attention and MLP; global attention only."""

    use_window = False

    def __init__(
        self,
        dim: int,
        attention: nn.Module,
        mlp: nn.Module,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        layerscale_value: float = 1.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attention = attention
        self.layer_scale1 = LayerScale(dim, layerscale_value)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        self.layer_scale2 = LayerScale(dim, layerscale_value)

    def forward(self, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        """``(R, C) -> (R, C)``."""
        x = x + self.drop_path(self.layer_scale1(self.attention(self.norm1(x), ctx.image)), ctx)
        return x + self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))), ctx)

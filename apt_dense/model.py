"""``APTViT``: the learned half of APT (patch embedding, blocks) around a :class:`TokenPlanner`.

:meth:`APTViT.forward_features` is the contract every framework adapter translates:

0. pad the images to :attr:`~APTViT.size_divisibility` (bottom/right);
1-2. plan: scores -> levels -> packed layout, with the one host sync (``planner.py``);
3. embed: adaptive patch embedding, position embeddings, optional prefix slots: a cls token,
   then register tokens (``embedding.py``, ``layout.py``);
4. blocks on packed tokens; sequences, RoPE tables and the attention backend are prepared once
   per pass (``blocks.py``, ``attention.py``, ``positions.py``);
5. dense maps: tokens repeated over their cells, cropped back to the input (``dense_map.py``).

Under ``torch.compile`` steps 0-3 and the per-pass preparation run eagerly
(``torch.compiler.disable``): they depend on pixel values and hold the host sync. The blocks are
compiled with the token dimension dynamic (:meth:`APTViT.compile_blocks`; ``torch.compile(model)``
also compiles step 5).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .arguments import block_indices, integer, real
from .attention import bucket_plan, check_backend_name, resolve_backend
from .blocks import (
    AttentionContext, Block, DINOv2Attention, DINOv2Block, DINOv2SwiGLU, EVA02Attention, Mlp, PackedContext, SwiGLU,
    ViTDetAttention,
)
from .dense_map import tokens_to_dense
from .embedding import AdaptivePatchEmbed, dinov2_pos_grid, grid_position_embeddings, position_embeddings
from .layout import ImagePrefix, PackedSequences, PatchLayout
from .planner import TokenPlanner
from .positions import rope_tables

__all__ = ["APTViT", "APTOutput", "TokenStats", "BLOCK_TYPES", "POS_EMBED_RESIZES", "host_window_arguments"]

BLOCK_TYPES = ("vitdet", "eva02", "dinov2")
# How the pretrained position grid is resized to the cells: detectron2's get_abs_pos (to the padded
# grid), transformers' Dinov2Embeddings / Dinov2WithRegistersEmbeddings (to the image's own cells).
POS_EMBED_RESIZES = ("detectron2", "dinov2", "dinov2_registers")


@dataclass
class APTOutput:
    """Result of :meth:`APTViT.forward_features`.

    Attributes:
        features: one ``(B, C, ceil(H/p), ceil(W/p))`` map per entry of ``out_indices``, in that order.
        tokens_per_image: ``(B,)`` int64 tokens each image kept (device tensor).
        layout: the packed layout of the padded images (token positions, sizes, sequences).
        prefix_tokens: with a cls token, one ``(B, P, C)`` tensor per entry of ``out_indices``: the
            cls token, then the register tokens, after that block; None without.
    """

    features: list[torch.Tensor]
    tokens_per_image: torch.Tensor
    layout: PatchLayout
    prefix_tokens: list[torch.Tensor] | None = None


@dataclass
class TokenStats:
    """Running count of tokens kept, for logging mean fractions over many batches."""

    images: int = 0
    tokens: int = 0
    cells: int = 0

    def update(self, layout: PatchLayout) -> None:
        kept = layout.tokens_per_image_host
        self.images += len(kept)
        self.tokens += sum(kept)
        self.cells += layout.grid_size[0] * layout.grid_size[1] * len(kept)

    @property
    def kept_fraction(self) -> float:
        return self.tokens / self.cells if self.cells else float("nan")


class APTViT(nn.Module):
    """A plain ViT backbone (ViTDet / MAE or EVA-02 blocks) with Adaptive Patch Transformers.

    Host arguments follow detectron2's ``ViT`` (and EVA-02's fork) so that checkpoints keep their
    key names (``patch_embed.proj``, ``pos_embed``, ``blocks.{i}.*``); the APT arguments come last.

    Args:
        img_size: the size the host was configured for; sets the RoPE grid of global blocks
            (``img_size // patch_size`` cells) and the relative-position table size.
        use_cls_token: a learned cls token leads every image's sequence (EVA-02 segmentation /
            BEiT / DINOv2 style; global attention only, no RoPE on it); it takes the position
            embedding's cls entry and is not part of the dense maps (``APTOutput.prefix_tokens``).
        num_register_tokens: learned register tokens after the cls token (DINOv2 with registers),
            without position embedding; they need ``use_cls_token``.
        block_type: ``"vitdet"`` (fused qkv, GELU MLP, optional relative positions),
            ``"eva02"`` (q/k/v projections with q/v biases, 2D RoPE, SwiGLU with sub-LN) or
            ``"dinov2"`` (q/k/v projections with biases, LayerScale, GELU MLP or SwiGLU; global
            attention only).
        layerscale_value: initial LayerScale of ``"dinov2"`` blocks.
        use_swiglu_ffn: ``"dinov2"`` blocks with DINOv2-giant's SwiGLU MLP.
        pos_embed_resize: how the pretrained position grid is resized to the cells:
            ``"detectron2"`` (bicubic to the padded cell grid, as ``get_abs_pos``), ``"dinov2"``
            or ``"dinov2_registers"`` (as transformers' ``Dinov2Embeddings`` /
            ``Dinov2WithRegistersEmbeddings``: bicubic in float32 to the image's own cells, the
            latter antialiased; padding cells repeat the edge).
        window_size: window side in cells for ``window_block_indexes``; 0 (global attention
            everywhere) without them.
        out_indices: blocks whose outputs are returned as dense maps, a list of indices or one
            index (default: the last).
        rope_pretrain_len: EVA-02's ``pt_hw_seq_len`` (16).
        adaptive: False turns adaptive patching off (every cell a base patch, no scoring).
        thresholds: ``{patch_size: threshold}`` for every coarse patch size, e.g.
            ``{32: 2.0, 64: 2.0, 128: 0.3}``; None means base patches only. Keys may be digit
            strings (JSON/YAML configs) and values numpy or 0-d torch scalars.
        scorer: ``"entropy"`` (default; raw 0..255, 512-bin histogram), ``"laplacian"``,
            ``"upsample_mse"`` or a callable ``(gray, p, K) -> list[Tensor]``.
        scorer_kwargs: options of a named scorer (e.g. ``{"bins": 256}`` for entropy).
        pixel_mean, pixel_std: per-channel (0..255 scale) normalisation of the input, undone for
            scoring, one value per channel (std positive). None when inputs are raw 0..255 pixels.
            Inputs whose intensities do not fit this choice (normalised or 0..1 inputs without
            them, raw inputs with them) get an :class:`InputScaleWarning`, once per model.
        input_format: channel order of the input, ``"RGB"`` or ``"BGR"`` (for the grayscale
            weights of the scorer; ``pixel_mean``/``pixel_std`` are in the same order).
        attention_backend: ``"auto"``, ``"flash_attn"``, ``"torch_varlen"`` or ``"sdpa"``.

    The non-learned planning (scorer, thresholds, pixel statistics, input format, window
    geometry, pixel checks) lives in :attr:`planner`, a :class:`TokenPlanner`.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (),
        use_act_checkpoint: bool = False,
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        use_cls_token: bool = False,
        num_register_tokens: int = 0,
        block_type: str = "vitdet",
        layerscale_value: float = 1.0,
        use_swiglu_ffn: bool = False,
        pos_embed_resize: str = "detectron2",
        rope_pretrain_len: int = 16,
        rope_theta: float = 10000.0,
        out_indices: Sequence[int] | None = None,
        adaptive: bool = True,
        thresholds: Mapping[int, float] | None = None,
        scorer: str | object = "entropy",
        scorer_kwargs: Mapping[str, object] | None = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        input_format: str = "RGB",
        attention_backend: str = "auto",
    ):
        super().__init__()
        img_size, patch_size, in_chans, embed_dim, depth, num_heads = (
            integer(name, value, 1) for name, value in (
                ("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads))
        )
        if use_abs_pos:
            pretrain_img_size = integer("pretrain_img_size", pretrain_img_size, 1)
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if block_type == "eva02" and use_rel_pos:
            raise ValueError("EVA-02 blocks use RoPE; use_rel_pos applies to block_type='vitdet'")
        mlp_ratio = real("mlp_ratio", mlp_ratio, above=0, hint="the MLP is mlp_ratio * embed_dim wide (ViT: 4.0)")
        if int(embed_dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} gives an MLP of 0 hidden units at embed_dim {embed_dim}; ViT uses 4.0")
        drop_path_rate = real(
            "drop_path_rate", drop_path_rate, at_least=0, below=1,
            hint="it is the probability that the last block's residual branches are dropped (ViTDet-B: 0.1)",
        )
        rope_theta = real("rope_theta", rope_theta, above=0, hint="RoPE's frequency base (EVA-02: 10000)")
        rope_pretrain_len = real("rope_pretrain_len", rope_pretrain_len, above=0, hint="EVA-02's pt_hw_seq_len (16)")
        _check_dinov2_arguments(block_type, use_rel_pos, window_block_indexes, use_swiglu_ffn)
        if pos_embed_resize not in POS_EMBED_RESIZES:
            raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_RESIZES}, got {pos_embed_resize!r}")
        if pos_embed_resize != "detectron2" and use_abs_pos and not pretrain_use_cls_token:
            raise ValueError(f"pos_embed_resize={pos_embed_resize!r} expects DINOv2's position embedding with a cls "
                             "entry (pretrain_use_cls_token=True)")
        if num_register_tokens < 0 or (num_register_tokens and not use_cls_token):
            raise ValueError(f"num_register_tokens={num_register_tokens}: register tokens follow a cls token; "
                             "set use_cls_token=True (or num_register_tokens=0)")
        check_backend_name(attention_backend)
        window_size = integer("window_size", window_size, 0, "use 0 for global attention in every block")
        window_block_indexes = block_indices("window_block_indexes", window_block_indexes, depth)
        if use_cls_token and (window_block_indexes or window_size):
            raise ValueError(
                "a cls token needs global attention in every block; drop window_size and window_block_indexes"
            )
        if use_cls_token and use_abs_pos and not pretrain_use_cls_token:
            raise ValueError("use_cls_token needs a position embedding with a cls entry (pretrain_use_cls_token=True)")
        if window_block_indexes and not window_size:
            raise ValueError("window_block_indexes need a positive window_size (the window side in cells)")
        if window_size and not window_block_indexes:
            raise ValueError(
                f"window_size={window_size} does nothing without window_block_indexes: list the blocks that "
                "attend within windows (ViTDet-B: [0, 1, 3, 4, 6, 7, 9, 10]), or set window_size=0 for "
                "global attention in every block"
            )
        out_indices = (depth - 1,) if out_indices is None else block_indices("out_indices", out_indices, depth)
        if not out_indices:
            raise ValueError(f"out_indices must name at least one block (0..{depth - 1}), got none")

        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.block_type = block_type
        self.use_rel_pos = use_rel_pos
        self.window_size = window_size
        self.rope_grid = img_size // patch_size
        self.rope_pretrain_len = rope_pretrain_len
        self.rope_theta = rope_theta
        self.out_indices = out_indices
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.pos_embed_resize = pos_embed_resize
        self.attention_backend = attention_backend
        self.use_act_checkpoint = use_act_checkpoint
        self._compiled_block = None  # set by compile_blocks

        self.planner = TokenPlanner(
            patch_size=patch_size, thresholds=thresholds, adaptive=adaptive, window_size=self.window_size,
            scorer=scorer, scorer_kwargs=scorer_kwargs, pixel_mean=pixel_mean, pixel_std=pixel_std,
            input_format=input_format, in_chans=in_chans,
        )
        self.patch_embed = AdaptivePatchEmbed(patch_size, in_chans, embed_dim, self.planner.schedule.num_levels)
        if use_abs_pos:
            cells = (pretrain_img_size // patch_size) ** 2
            self.pos_embed = nn.Parameter(torch.zeros(1, cells + int(pretrain_use_cls_token), embed_dim))
        else:
            self.pos_embed = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        drop_rates = [float(x) for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList()
        for i in range(depth):
            in_window = i in window_block_indexes
            if block_type == "dinov2":
                hidden = int(embed_dim * mlp_ratio)
                mlp = DINOv2SwiGLU(embed_dim, hidden) if use_swiglu_ffn else Mlp(embed_dim, hidden, act_layer)
                attn = DINOv2Attention(embed_dim, num_heads, qkv_bias)
                self.blocks.append(DINOv2Block(embed_dim, attn, mlp, norm_layer, layerscale_value, drop_rates[i]))
                continue
            if block_type == "vitdet":
                frame = (window_size, window_size) if in_window else (self.rope_grid, self.rope_grid)
                attn = ViTDetAttention(embed_dim, num_heads, qkv_bias, use_rel_pos, rel_pos_zero_init, frame)
                mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio), act_layer)
            else:
                attn = EVA02Attention(embed_dim, num_heads, qkv_bias)
                mlp = SwiGLU(embed_dim, int(embed_dim * mlp_ratio), norm_layer)
            self.blocks.append(Block(embed_dim, attn, mlp, norm_layer, drop_rates[i], in_window))

        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for prefix in (self.cls_token, self.register_tokens):
            if prefix is not None:
                nn.init.trunc_normal_(prefix, std=0.02)
        self.apply(self._init_weights)
        self.patch_embed.reset_apt_parameters()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @property
    def num_prefix_tokens(self) -> int:
        """Slots leading every image's sequence: the cls token, then the register tokens."""
        if self.cls_token is None:
            return 0
        return 1 + (0 if self.register_tokens is None else self.register_tokens.shape[1])

    @property
    def size_divisibility(self) -> int:
        """:meth:`forward_features` pads the input sides to multiples of this."""
        return self.planner.size_divisibility

    def attention_backends(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, str]:
        """The attention backend each kind of block uses on ``device`` when q/k/v are ``dtype``
        (with the blocks compiled, if :meth:`compile_blocks` was called)."""
        backend = self._attention_backend(torch.device(device), dtype, self._compiled_block is not None)
        return {"global": backend, "window": backend} if self.window_size else {"global": backend}

    def compile_blocks(self, **compile_kwargs) -> "APTViT":
        """Run the transformer blocks through ``torch.compile`` from now on; returns ``self``.

        Planning, embedding and the per-pass preparation stay eager (one host sync per forward,
        as uncompiled). One graph is compiled per kind of block (window, global) and per
        device, dtype and grad mode; the blocks of a kind share it. The token dimension and the
        sequence lengths are dynamic, so batches with new token counts, batch sizes or image
        sizes do not recompile (relative positions take the frame size as data, padded and
        unpadded windows share one path), and attention has no graph break: ``sdpa`` runs ragged batches as the custom op
        ``apt_dense::bucketed_sdpa``, ``torch_varlen`` is a custom op itself, and ``flash_attn``
        (which breaks ``torch.compile``) gives way to ``torch_varlen`` under ``auto``.

        Args:
            compile_kwargs: passed to :func:`torch.compile`; ``fullgraph=True`` unless given
                (a graph break inside a block is an error, not a slow path).
        """
        compile_kwargs.setdefault("fullgraph", True)
        self._compiled_block = torch.compile(_run_block, **compile_kwargs)
        return self

    def check_input(self, images: torch.Tensor, any_size: bool = False) -> None:
        """Shape, dtype and device checks (no device sync); non-finite pixels and the intensity
        scale are checked by the planner, on its one host sync. ``any_size``: sides need not be
        multiples of :attr:`size_divisibility` (:meth:`forward_features` pads them)."""
        self.planner.check_images(images)
        self.patch_embed.check_dtype(images)
        if not any_size:
            self.planner.check_size(images)

    def forward(self, images: torch.Tensor) -> APTOutput:
        """:meth:`forward_features` for images whose sides are already multiples of
        :attr:`size_divisibility`; other sizes raise an error that says how to pad."""
        self.check_input(images)
        return self.forward_features(images)

    def forward_features(self, images: torch.Tensor) -> APTOutput:
        """Dense feature maps for images of any size: the contract that framework adapters translate.

        Args:
            images: ``(B, C, H, W)`` float, normalised as the host expects (``pixel_mean`` /
                ``pixel_std`` tell the planner how to undo it for scoring).
        Returns:
            Maps of ``ceil(H / p) x ceil(W / p)`` cells. The images are zero-padded (bottom/right)
            to :attr:`size_divisibility` and the maps cropped back; padding is a flat region of
            the normalised input, so APT merges it into large patches.
        """
        self.check_input(images, any_size=True)
        rows, cols = (-(-side // self.patch_size) for side in images.shape[-2:])
        images = _pad_bottom_right(images, self.size_divisibility)
        compiled = self._compiled_block is not None or torch.compiler.is_compiling()
        layout, x, ctx = self._plan_and_embed(images, compiled, (rows, cols))  # 1-3 (eager)
        features, prefix_tokens = self.run_blocks(x, ctx, layout, (rows, cols))  # 4-5
        return APTOutput(features, layout.tokens_per_image, layout, prefix_tokens)

    def run_blocks(
        self, x: torch.Tensor, ctx: PackedContext, layout: PatchLayout, crop: tuple[int, int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Stages 4-5: the blocks on the ``(R, C)`` stream, and one ``(B, C, rows, cols)`` dense
        map per entry of ``out_indices`` (``crop``: ``(rows, cols)`` of the unpadded input), with
        each image's ``(B, P, C)`` prefix tokens after those blocks when there are any (else None).
        Eager and exported programs (:mod:`apt_dense.export`) share it."""
        run = self._compiled_block or _run_block
        maps, prefixes = {}, {}
        for i, block in enumerate(self.blocks):
            if self._compiled_block is not None:
                torch._dynamo.maybe_mark_dynamic(x, 0)  # rows differ from batch to batch
            if self.use_act_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(run, block, x, ctx, use_reentrant=False)
            else:
                x = run(block, x, ctx)
            if i in self.out_indices:
                maps[i] = tokens_to_dense(ctx.tokens(x), layout)[..., : crop[0], : crop[1]]
                if ctx.prefix is not None:
                    prefixes[i] = ctx.prefix.prefixes(x)
        return [maps[i] for i in self.out_indices], [prefixes[i] for i in self.out_indices] if prefixes else None

    def head_outputs(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's named outputs from :meth:`run_blocks`' maps: here one map per
        ``out_indices`` entry. Subclasses with a head (SAM's encoder and its neck) return what
        their ``forward`` returns; exported programs (:mod:`apt_dense.export`) return this."""
        return {f"features_{i}": f for i, f in zip(self.out_indices, features)}

    @torch.compiler.disable
    def _plan_and_embed(
        self, images: torch.Tensor, compiled: bool, grid: tuple[int, int] | None = None
    ) -> tuple[PatchLayout, torch.Tensor, PackedContext]:
        """Stages 1-3 and the blocks' per-pass state. Eager even inside ``torch.compile(model)``:
        the plan depends on pixel values, its host sync sizes the token tensors, and the
        branches on it (dense or not, cls slots) would otherwise each be a guard. ``grid``: the
        images' own cells before padding (see :meth:`embed`)."""
        layout = self.planner(images)                                     # 1-2. scores -> levels -> layout
        prefix = ImagePrefix.build(layout, self.num_prefix_tokens) if self.cls_token is not None else None
        x = self.embed(images, layout, prefix, grid)                      # 3. (N, C) tokens [+ B P prefix slots]
        if compiled:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        return layout, x, self.block_context(layout, prefix, x, compiled)

    def embed(
        self,
        images: torch.Tensor,
        layout: PatchLayout,
        prefix: ImagePrefix | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Stage 3: ``(N, C)`` tokens with position embeddings; with a ``prefix``, ``(N + B P, C)``
        slots with the cls token (with its position embedding), then the register tokens, leading
        each image.

        Args:
            grid: the images' own cells before padding, to which DINOv2's position grid is
                resized (default: the layout's grid).
        """
        x = self.patch_embed(images, layout)
        if self.pos_embed is not None:
            x = x + self._token_positions(layout, grid or layout.grid_size)
        if prefix is None:
            return x
        vectors = self.cls_token[0]
        if self.pos_embed is not None:
            vectors = vectors + self.pos_embed[0, :1]
        if self.register_tokens is not None:
            vectors = torch.cat([vectors, self.register_tokens[0]])
        return prefix.insert(x, vectors)

    def _token_positions(self, layout: PatchLayout, grid: tuple[int, int]) -> torch.Tensor:
        if self.pos_embed_resize == "detectron2":
            return position_embeddings(self.pos_embed, layout, self.pretrain_use_cls_token)
        antialias = self.pos_embed_resize == "dinov2_registers"
        return grid_position_embeddings(dinov2_pos_grid(self.pos_embed, grid, antialias), layout)

    def block_context(
        self, layout: PatchLayout, prefix: ImagePrefix | None, x: torch.Tensor, compiled: bool = False
    ) -> PackedContext:
        """What every block needs in this pass, prepared once: the sequences of both attention
        kinds, their RoPE tables and the attention backend for ``x``'s device and compute dtype.

        ``compiled``: the blocks run under ``torch.compile``. The sdpa bucket plans are then
        built here, outside the graph, window sequences always carry their slot maps, and every
        per-slot tensor is marked dynamic in its first dimension, so that the first compilation
        already serves every token count and image size.
        """
        backend = self._attention_backend(x.device, _compute_dtype(x), compiled)
        images = layout.images if prefix is None else prefix.images
        image = AttentionContext(images, self._rope(images, self.rope_grid), backend)
        window = None
        if layout.windows is not None:
            seqs = layout.windows.with_slot_maps() if compiled else layout.windows
            window = AttentionContext(seqs, self._rope(seqs, self.window_size), backend)
        slot_image = layout.token_image if prefix is None else prefix.slot_image
        ctx = PackedContext(slot_image, layout.batch_size, image, window, prefix)
        if compiled:
            _prepare_compiled(ctx, x.device)
        return ctx

    def _rope(self, seqs: PackedSequences, frame_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.block_type != "eva02":
            return None
        head_dim = self.embed_dim // self.num_heads
        return rope_tables(seqs.positions, head_dim, frame_len, self.rope_pretrain_len, self.rope_theta, seqs.prefix)

    def _attention_backend(self, device: torch.device, dtype: torch.dtype, compiled: bool = False) -> str:
        has_bias = self.block_type == "vitdet" and self.use_rel_pos
        return resolve_backend(self.attention_backend, device, dtype, has_bias, self.embed_dim // self.num_heads, compiled)


def host_window_arguments(window_size: int, window_block_indexes: Sequence[int]) -> tuple[int, Sequence[int]]:
    """``(window_size, window_block_indexes)`` for :class:`APTViT` from a host ViT's (detectron2's
    and mmdet's ``ViT``, SAM's encoder), where a block attends within windows only when it is
    listed *and* the window size is positive, and either alone means global attention
    everywhere. APTViT refuses either alone (a window size that does nothing is a mistake
    there); adapters that keep their host's meaning translate with this."""
    if window_size and window_block_indexes:
        return window_size, window_block_indexes
    return 0, ()


def _check_dinov2_arguments(
    block_type: str, use_rel_pos: bool, window_block_indexes: tuple[int, ...], use_swiglu_ffn: bool
) -> None:
    if use_swiglu_ffn and block_type != "dinov2":
        raise ValueError(f"use_swiglu_ffn selects DINOv2-giant's MLP; it needs block_type='dinov2', not {block_type!r}")
    if block_type != "dinov2":
        return
    if use_rel_pos:
        raise ValueError("DINOv2 blocks have no relative positions; use_rel_pos applies to block_type='vitdet'")
    if window_block_indexes:
        raise ValueError("DINOv2 blocks attend globally; drop window_block_indexes")


def _prepare_compiled(ctx: PackedContext, device: torch.device) -> None:
    """Bucket plans built and per-slot tensors marked dynamic (dim 0) before compiled blocks
    see ``ctx``."""
    for actx in (ctx.image, ctx.window):
        if actx is None:
            continue
        seqs = actx.seqs
        if actx.backend == "sdpa" and seqs.ragged:
            bucket_plan(seqs, device)
        for tensor in (seqs.positions, seqs.gather, seqs.scatter, seqs.prefix, *(actx.rope or ())):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
    torch._dynamo.maybe_mark_dynamic(ctx.slot_image, 0)
    if ctx.prefix is not None:
        torch._dynamo.maybe_mark_dynamic(ctx.prefix.token_slot, 0)


def _run_block(block: Block, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
    """One block; :meth:`APTViT.compile_blocks` compiles this function, so that the blocks of a
    kind share one graph (their parameters are graph inputs)."""
    return block(x, ctx)


def _pad_bottom_right(images: torch.Tensor, unit: int) -> torch.Tensor:
    pad_h, pad_w = (-images.shape[-2]) % unit, (-images.shape[-1]) % unit
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the blocks' linear layers produce from ``x``: autocast's, if it is on (it casts
    every float dtype but float64), else ``x``'s."""
    device_type = x.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype

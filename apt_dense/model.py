"""``APTViT``: adaptive patches, packed blocks, dense feature maps."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .attention import BACKENDS, resolve_backend
from .blocks import AttentionContext, Block, EVA02Attention, Mlp, PackedContext, SwiGLU, ViTDetAttention
from .dense_map import tokens_to_dense
from .embedding import AdaptivePatchEmbed, abs_pos_grid, area_pooled_levels, gather_level_maps, layout_is_dense
from .layout import PackedSequences, PatchLayout, build_layout, prepend_image_tokens
from .positions import rope_tables
from .schedule import PatchSchedule, select_levels, thresholds_from_sequence
from .scoring import (
    build_scorer, check_channel_order, intensity_extremes, intensity_scale_problem, pixel_statistics, to_intensity,
)

__all__ = ["APTViT", "APTOutput", "TokenStats", "InputScaleWarning", "BLOCK_TYPES"]

BLOCK_TYPES = ("vitdet", "eva02")


class InputScaleWarning(UserWarning):
    """Inputs do not look like the scale ``pixel_mean``/``pixel_std`` imply (issued once per model)."""


@dataclass
class APTOutput:
    """Result of :meth:`APTViT.forward`.

    Attributes:
        features: one ``(B, C, H/p, W/p)`` map per entry of ``out_indices``, in that order.
        tokens_per_image: ``(B,)`` int64 tokens each image kept (device tensor).
        layout: the packed layout (token positions, sizes, sequences).
    """

    features: list[torch.Tensor]
    tokens_per_image: torch.Tensor
    layout: PatchLayout


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
            BEiT style; global attention only, no RoPE on it); it takes the position embedding's
            cls entry and is not part of the dense outputs.
        block_type: ``"vitdet"`` (fused qkv, GELU MLP, optional relative positions) or
            ``"eva02"`` (q/k/v projections with q/v biases, 2D RoPE, SwiGLU with sub-LN).
        window_size: window side in cells for ``window_block_indexes`` (0: none).
        out_indices: blocks whose outputs are returned as dense maps (default: the last).
        rope_pretrain_len: EVA-02's ``pt_hw_seq_len`` (16).
        adaptive: False turns adaptive patching off (every cell a base patch, no scoring).
        thresholds: ``{patch_size: threshold}`` for every coarse patch size, e.g.
            ``{32: 2.0, 64: 2.0, 128: 0.3}``; None means base patches only. Keys may be digit
            strings (JSON/YAML configs) and values numpy or 0-d torch scalars.
        patch_sizes: ``(p, 2p, 4p, ...)`` when ``thresholds`` is the ascending sequence that
            detectron2's yacs builder passes (converted with
            :func:`~apt_dense.schedule.thresholds_from_sequence`; this argument goes once the
            builder converts itself).
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
        block_type: str = "vitdet",
        rope_pretrain_len: int = 16,
        rope_theta: float = 10000.0,
        out_indices: Sequence[int] | None = None,
        adaptive: bool = True,
        thresholds: Mapping[int, float] | Sequence[float] | None = None,
        patch_sizes: Sequence[int] | None = None,
        scorer: str | object = "entropy",
        scorer_kwargs: Mapping[str, object] | None = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        input_format: str = "RGB",
        attention_backend: str = "auto",
    ):
        super().__init__()
        sizes = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                     depth=depth, num_heads=num_heads)
        if use_abs_pos:
            sizes["pretrain_img_size"] = pretrain_img_size
        for name, value in sizes.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if block_type == "eva02" and use_rel_pos:
            raise ValueError("EVA-02 blocks use RoPE; use_rel_pos applies to block_type='vitdet'")
        if attention_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attention_backend!r}; choose one of {BACKENDS}")
        window_block_indexes = tuple(window_block_indexes)
        if use_cls_token and window_block_indexes:
            raise ValueError("a cls token needs global attention in every block; drop window_block_indexes")
        if use_cls_token and use_abs_pos and not pretrain_use_cls_token:
            raise ValueError("use_cls_token needs a position embedding with a cls entry (pretrain_use_cls_token=True)")
        if window_block_indexes and window_size <= 0:
            raise ValueError("window_block_indexes need a positive window_size")
        if any(not 0 <= i < depth for i in window_block_indexes):
            raise ValueError(f"window_block_indexes {window_block_indexes} out of range for depth {depth}")
        out_indices = (depth - 1,) if out_indices is None else tuple(out_indices)
        if not out_indices or any(not 0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices} must be non-empty block indices below {depth}")

        if patch_sizes is not None:
            thresholds = thresholds_from_sequence(thresholds, patch_sizes)
        self.schedule = PatchSchedule.create(patch_size, thresholds)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.block_type = block_type
        self.window_size = window_size if window_block_indexes else 0
        self.rope_grid = img_size // patch_size
        self.rope_pretrain_len = rope_pretrain_len
        self.rope_theta = rope_theta
        self.out_indices = out_indices
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.adaptive = adaptive
        self.attention_backend = attention_backend
        self.use_act_checkpoint = use_act_checkpoint
        mean, std = pixel_statistics(pixel_mean, pixel_std, in_chans)
        # Non-persistent buffers: they follow .to(device) and stay out of checkpoints.
        self.register_buffer("pixel_mean", mean, False)
        self.register_buffer("pixel_std", std, False)
        self._input_scale_warned = False
        self.input_format = check_channel_order(input_format, "input_format")
        self.scorer = build_scorer(scorer, **dict(scorer_kwargs or {}))
        if self.window_size and self.window_size % (1 << self.schedule.num_levels):
            largest = self.schedule.largest_patch_size
            raise ValueError(
                f"window_size {self.window_size} cells ({self.window_size * patch_size} px) is not a "
                f"multiple of the largest patch ({largest} px = {largest // patch_size} cells), so "
                f"patches would cross windows; drop patch sizes above "
                f"{patch_size * _largest_pow2_divisor(self.window_size)} px or use a window that is a "
                f"multiple of {largest // patch_size} cells"
            )

        self.patch_embed = AdaptivePatchEmbed(patch_size, in_chans, embed_dim, self.schedule.num_levels)
        if use_abs_pos:
            cells = (pretrain_img_size // patch_size) ** 2
            self.pos_embed = nn.Parameter(torch.zeros(1, cells + int(pretrain_use_cls_token), embed_dim))
        else:
            self.pos_embed = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None

        drop_rates = [float(x) for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList()
        for i in range(depth):
            in_window = i in window_block_indexes
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
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
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
    def size_divisibility(self) -> int:
        """Input sides must be multiples of this (see :meth:`forward_padded`)."""
        return self.schedule.largest_patch_size if self.merges else self.patch_size

    @property
    def merges(self) -> bool:
        """Adaptive patching is on and there is at least one coarse patch size."""
        return self.adaptive and self.schedule.num_levels > 0

    def attention_backends(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, str]:
        """The attention backend each kind of block uses on ``device`` with ``dtype``."""
        device = torch.device(device)
        has_bias = self.block_type == "vitdet" and getattr(self.blocks[0].attn, "use_rel_pos", False)
        kinds = {"global": resolve_backend(self.attention_backend, device, dtype, has_bias)}
        if self.window_size:
            kinds["window"] = kinds["global"]
        return kinds

    def check_input(self, images: torch.Tensor) -> None:
        """Shape/dtype/device checks (no device sync); non-finite pixels and the intensity scale
        are checked in :meth:`build_layout`."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        if images.is_meta:
            raise ValueError(
                "images are on the meta device (shapes, no data), but APT chooses patches from pixel "
                "values and sizes its token tensors from them: pass real images (e.g. on 'cpu' or 'cuda')"
            )
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError("empty batch: images has batch size 0; pass at least one image")
        unit = self.size_divisibility
        if h == 0 or w == 0:
            raise ValueError(
                f"images are {h}x{w} pixels; drop empty images, or pad them (bottom/right) to at least "
                f"{unit}x{unit}"
            )
        if c != self.in_chans:
            raise ValueError(
                f"images have {c} channels but the model expects {self.in_chans}; convert them "
                f"(e.g. grayscale to RGB with images.expand(-1, 3, -1, -1)) or set in_chans"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images have integer dtype {images.dtype}; convert with images.float() (raw 0..255, "
                "or normalised with the model's pixel_mean/pixel_std)"
            )
        self._check_dtype(images)
        what = "the largest patch size" if self.merges else "the patch size"
        if h % unit or w % unit:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {what} ({unit} px); pad the images "
                f"(bottom/right) to {-(-h // unit) * unit}x{-(-w // unit) * unit}"
            )

    def _check_dtype(self, images: torch.Tensor) -> None:
        """Images and weights share a float dtype, or autocast casts both (it never casts float64)."""
        weight = self.patch_embed.proj.weight
        if images.dtype == weight.dtype:
            return
        device_type = images.device.type
        autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        if autocast and torch.float64 not in (images.dtype, weight.dtype):
            return
        fix = f"convert the images (images{_to_dtype(weight.dtype)}) or the model (model{_to_dtype(images.dtype)})"
        if torch.float64 not in (images.dtype, weight.dtype):
            fix += ", or run mixed precision under torch.autocast"
        raise TypeError(f"images are {images.dtype} but the model's weights are {weight.dtype}: {fix}")

    def build_layout(self, images: torch.Tensor) -> PatchLayout:
        """Score, select and pack. One host sync, which also carries the finite-pixel check and,
        until it has warned once, the intensity-scale check (:class:`InputScaleWarning`)."""
        self.check_input(images)
        b, _, h, w = images.shape
        grid = (h // self.patch_size, w // self.patch_size)
        flags = [(~torch.isfinite(images)).any().view(1).long()]
        cell_level = None
        check_scale = self.merges and not self._input_scale_warned
        if self.merges:
            with torch.no_grad():
                gray = to_intensity(images, self.pixel_mean, self.pixel_std, self.input_format)
                if check_scale:
                    flags.append(intensity_extremes(gray))
                scores = self.scorer(gray, self.patch_size, self.schedule.num_levels)
                cell_level = select_levels(scores, self.schedule.thresholds)
        layout, (bad, *extremes) = build_layout(
            cell_level,
            batch_size=b,
            grid_size=grid,
            window_size=self.window_size,
            device=images.device,
            sync_flags=torch.cat(flags),
        )
        if bad:
            raise ValueError("images contain NaN or Inf pixels; clean or drop those images before the model")
        if check_scale:
            problem = intensity_scale_problem(extremes, undone=self.pixel_mean is not None)
            if problem is not None:
                self._input_scale_warned = True
                warnings.warn(f"APTViT: {problem} (warned once per model)", InputScaleWarning, stacklevel=2)
        return layout

    def _context(self, layout: PatchLayout, image_seqs: PackedSequences, slot_image: torch.Tensor) -> PackedContext:
        head_dim = self.embed_dim // self.num_heads

        def kind(seqs: PackedSequences, frame_len: int) -> AttentionContext:
            rope = None
            if self.block_type == "eva02":
                cos, sin = rope_tables(seqs.positions, head_dim, frame_len, self.rope_pretrain_len, self.rope_theta)
                if seqs.prefix is not None:  # cls tokens are not rotated (identity rotation)
                    prefix = seqs.prefix.unsqueeze(1)
                    cos, sin = cos.masked_fill(prefix, 1.0), sin.masked_fill(prefix, 0.0)
                rope = (cos, sin)
            return AttentionContext(seqs, rope, self.attention_backend)

        window = kind(layout.windows, self.window_size) if layout.windows is not None else None
        return PackedContext(slot_image, layout.batch_size, kind(image_seqs, self.rope_grid), window)

    def embed(self, images: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        """``(B, C_in, H, W) -> (N, C)`` tokens with position embeddings."""
        # In training the APT layers run even when nothing merged, so distributed data parallel
        # always sees them used.
        use_levels = self.merges and (self.training or not layout_is_dense(layout))
        tokens = self.patch_embed(images, layout, use_levels)
        if self.pos_embed is not None:
            grid = abs_pos_grid(self.pos_embed, self.pretrain_use_cls_token, layout.grid_size)
            levels = self.schedule.num_levels if use_levels else 0
            tokens = tokens + gather_level_maps(area_pooled_levels(grid, levels), layout)
        return tokens

    def forward(self, images: torch.Tensor) -> APTOutput:
        """Run the backbone.

        Args:
            images: ``(B, C, H, W)`` float, normalised as the host expects (``pixel_mean`` /
                ``pixel_std`` tell the scorer how to undo it), H and W multiples of the largest
                patch size (of the patch size when adaptive patching is off).
        """
        layout = self.build_layout(images)
        x = self.embed(images, layout)
        image_seqs, slot_image, token_slot = layout.images, layout.token_image, None
        if self.cls_token is not None:
            x, image_seqs, slot_image, token_slot = self._prepend_cls_tokens(x, layout)
        ctx = self._context(layout, image_seqs, slot_image)
        wanted = set(self.out_indices)
        by_index = {}
        for i, block in enumerate(self.blocks):
            if self.use_act_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
            if i in wanted:
                by_index[i] = tokens_to_dense(x if token_slot is None else x[token_slot], layout)
        features = [by_index[i] for i in self.out_indices]
        return APTOutput(features, layout.tokens_per_image, layout)

    def _prepend_cls_tokens(self, tokens: torch.Tensor, layout: PatchLayout):
        """Residual stream in slot order with a cls token first in each image's sequence.

        Returns:
            ``(N + B, C)`` slots, the image sequences with prefix slots, the ``(N + B,)`` image of
            every slot and the ``(N,)`` slot of every token.
        """
        image_seqs, token_slot, cls_slot = prepend_image_tokens(layout)
        cls = self.cls_token[0]
        if self.pos_embed is not None:
            cls = cls + self.pos_embed[0, :1]
        b, n = layout.batch_size, layout.num_tokens
        row_of_slot = torch.empty(n + b, dtype=torch.int64, device=tokens.device)
        row_of_slot[token_slot] = torch.arange(n, device=tokens.device)
        row_of_slot[cls_slot] = torch.arange(n, n + b, device=tokens.device)
        slots = torch.cat([tokens, cls.expand(b, -1)])[row_of_slot]
        slot_image = torch.cat([layout.token_image, torch.arange(b, device=tokens.device)])[row_of_slot]
        return slots, image_seqs, slot_image, token_slot

    def forward_padded(self, images: torch.Tensor) -> APTOutput:
        """:meth:`forward` for any size: zero-pad (bottom/right) to :attr:`size_divisibility`, then
        crop the maps back to ``ceil(H / p) x ceil(W / p)`` cells. Padding is a flat region in
        the normalised input, so APT merges it into large patches."""
        h, w = images.shape[-2:]
        unit = self.size_divisibility
        pad_h, pad_w = (-h) % unit, (-w) % unit
        # APTViT.forward, not self(): framework subclasses override forward with this method.
        if not (pad_h or pad_w):
            return APTViT.forward(self, images)
        out = APTViT.forward(self, F.pad(images, (0, pad_w, 0, pad_h)))
        rows, cols = -(-h // self.patch_size), -(-w // self.patch_size)
        out.features = [f[..., :rows, :cols] for f in out.features]
        return out


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def _to_dtype(dtype: torch.dtype) -> str:
    """The tensor/module method call that converts to ``dtype``, e.g. ``.float()``."""
    names = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16", torch.float64: "double"}
    return f".{names[dtype]}()" if dtype in names else f".to({dtype})"

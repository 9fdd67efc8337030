"""Builders of whole ``Sam`` models with the APT image encoder, and the swap for one already built.

The prompt encoder and mask decoder are built by segment-anything's (or sam-hq's) own builder,
so they are exactly SAM's; only the image encoder is replaced. Checkpoints are local files read
as data (nothing is downloaded) and checked before any model is built: a file of another size,
of SAM-HQ for SAM (or the reverse), or of another SAM family is an error that says so.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from functools import partial

import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT, Sam

from ..checkpoints import is_apt_layer, load_state_dict_checked
from ..presets import APT_SETTINGS, SAM_ENCODERS
from .checkpoint import SamCheckpoint, describe_encoder, load_sam_checkpoint, read_sam_checkpoint
from .encoder import APTImageEncoderViT, APTImageEncoderViTHQ

__all__ = [
    "build_apt_sam", "build_dense_sam", "build_sam_pair", "swap_image_encoder", "encoder_config",
    "build_apt_sam_vit_b", "build_apt_sam_vit_l", "build_apt_sam_vit_h",
    "build_apt_sam_hq_vit_b", "build_apt_sam_hq_vit_l", "build_apt_sam_hq_vit_h",
    "apt_sam_model_registry", "apt_sam_hq_model_registry",
]

MODEL_TYPES = (*SAM_ENCODERS, "default", "auto")


def _read(checkpoint: str | os.PathLike | SamCheckpoint | None, allow_pickle: bool) -> SamCheckpoint | None:
    if checkpoint is None or isinstance(checkpoint, SamCheckpoint):
        return checkpoint
    return read_sam_checkpoint(checkpoint, allow_pickle=allow_pickle)


def _host_builder(hq: bool):
    """segment-anything's (or sam-hq's) ``_build_sam(embed_dim, depth, num_heads, global_attn_indexes)``."""
    if not hq:
        from segment_anything.build_sam import _build_sam
        return _build_sam
    try:
        from segment_anything_hq.build_sam import _build_sam
    except ImportError as err:
        raise ImportError(
            f"SAM-HQ models need segment-anything-hq: pip install segment-anything-hq==0.3 (import failed: {err})"
        ) from err
    return _build_sam


def _encoder_shape(model_type: str, checkpoint: SamCheckpoint | None, depth: int | None) -> tuple:
    """``(embed_dim, depth, num_heads, global_attn_indexes)`` for ``model_type``, checked against
    the checkpoint's encoder (``"auto"``: the checkpoint's own)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if depth is not None and checkpoint is not None:
        raise ValueError("depth changes the architecture, so it cannot be used with a checkpoint")
    if model_type == "auto":
        if checkpoint is None:
            raise ValueError("model_type='auto' reads the architecture from a checkpoint; pass one, or name vit_b/l/h")
        if None in checkpoint.encoder:
            raise ValueError(f"{checkpoint.path} has no relative-position tables to tell the encoder's heads and "
                             "global blocks from; name the model type (vit_b, vit_l or vit_h)")
        return checkpoint.encoder
    name = "vit_h" if model_type == "default" else model_type
    shape = SAM_ENCODERS[name]
    if checkpoint is not None and checkpoint.model_type != name:
        found = checkpoint.model_type
        fix = f"use model type {found!r} (build_apt_sam_{found})" if found else "use model_type='auto'"
        raise ValueError(
            f"{checkpoint.path} holds a SAM {describe_encoder(checkpoint.encoder)} image encoder, but "
            f"{name} is {describe_encoder(shape)}: {fix}"
        )
    if depth is None:
        return shape
    return shape[0], depth, shape[2], tuple(i for i in shape[3] if i < depth)


def encoder_config(encoder: nn.Module) -> dict:
    """``ImageEncoderViT``'s constructor arguments, read from a built one (segment-anything's or
    sam-hq's), for an :class:`APTImageEncoderViT` of the same shape."""
    blocks = list(encoder.blocks)
    if not blocks:
        raise ValueError("the image encoder has no blocks")
    first = blocks[0]
    proj = encoder.patch_embed.proj
    if proj.kernel_size != proj.stride or proj.kernel_size[0] != proj.kernel_size[1] or any(proj.padding):
        raise ValueError(f"unsupported patch embedding {proj}: APT needs square, non-overlapping patches")
    if type(first.norm1) is not nn.LayerNorm:
        raise ValueError(f"unsupported norm layer {type(first.norm1).__name__}: SAM's encoder uses nn.LayerNorm")
    return dict(
        img_size=encoder.img_size, patch_size=proj.kernel_size[0], in_chans=proj.in_channels,
        embed_dim=proj.out_channels, depth=len(blocks), num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.lin1.out_features / proj.out_channels, out_chans=encoder.neck[0].out_channels,
        qkv_bias=first.attn.qkv.bias is not None, norm_layer=partial(nn.LayerNorm, eps=first.norm1.eps),
        act_layer=type(first.mlp.act), use_abs_pos=encoder.pos_embed is not None,
        use_rel_pos=first.attn.use_rel_pos, window_size=max(b.window_size for b in blocks),
        global_attn_indexes=tuple(i for i, b in enumerate(blocks) if b.window_size == 0),
    )


def _apt_encoder(sam: Sam, config: dict, hq: bool, thresholds, apt_kwargs: dict) -> APTImageEncoderViT:
    """The APT encoder for ``sam``: planning undoes ``sam``'s own pixel statistics."""
    kwargs = dict(pixel_mean=sam.pixel_mean.flatten().tolist(), pixel_std=sam.pixel_std.flatten().tolist(),
                  input_format=sam.image_format)
    kwargs.update(apt_kwargs)
    thresholds = APT_SETTINGS["sam"] if thresholds is None else thresholds
    return (APTImageEncoderViTHQ if hq else APTImageEncoderViT)(**config, thresholds=thresholds, **kwargs)


def _host_encoder_kind(sam) -> bool:
    """True for SAM-HQ's ``ImageEncoderViT``, False for segment-anything's; else a clear error."""
    encoder = getattr(sam, "image_encoder", None)
    if isinstance(encoder, APTImageEncoderViT):
        raise ValueError("the model's image encoder is already APT's (APTImageEncoderViT)")
    if isinstance(encoder, ImageEncoderViT):
        return False
    if type(encoder).__module__.startswith("segment_anything_hq.") and type(encoder).__name__ == "ImageEncoderViT":
        return True
    raise ValueError(
        f"swap_image_encoder needs a Sam model whose image_encoder is segment-anything's or sam-hq's "
        f"ImageEncoderViT (ViT-B/L/H), got {type(encoder).__name__ if encoder is not None else type(sam).__name__}"
        " (TinyViT / MobileSAM, SAM 2 and EfficientSAM encoders are not supported)"
    )


def swap_image_encoder(sam: Sam, thresholds: Mapping[int, float] | None = None, **apt_kwargs) -> Sam:
    """Replace ``sam.image_encoder`` (SAM's or SAM-HQ's ``ImageEncoderViT``) by the APT encoder
    of the same shape, in place, and return ``sam``.

    The weights are copied; device, dtype and train/eval mode are kept, and so is each weight's
    ``requires_grad`` (the new APT layers are trainable). Planning undoes ``sam.pixel_mean`` /
    ``sam.pixel_std``. ``SamPredictor`` and ``SamAutomaticMaskGenerator`` (sam-hq's for SAM-HQ)
    then run unchanged.

    Args:
        thresholds: ``{32: threshold}``; None: the calibrated SAM setting ``APT_SETTINGS["sam"]``.
            SAM's 14-cell windows admit only 32 px patches.
        apt_kwargs: other :class:`APTImageEncoderViT` keyword arguments (``adaptive``, ``scorer``,
            ``attention_backend``, ...).
    """
    hq = _host_encoder_kind(sam)
    host = sam.image_encoder
    encoder = _apt_encoder(sam, encoder_config(host), hq, thresholds, apt_kwargs)
    missing, unexpected = load_state_dict_checked(encoder, host.state_dict())
    if missing or unexpected:  # the two layouts are the same by construction
        raise RuntimeError(f"APT encoder keys differ from the host's: missing {missing}, unexpected {unexpected}")
    weight = host.patch_embed.proj.weight
    encoder.to(device=weight.device, dtype=weight.dtype).train(host.training)
    _match_trainable(encoder, host)
    sam.image_encoder = encoder
    return sam


def _match_trainable(encoder: APTImageEncoderViT, host: nn.Module) -> None:
    """Each weight takes its host counterpart's ``requires_grad`` (sam-hq's builder freezes the
    encoder), else the patch embedding's; the APT layers stay trainable."""
    trainable = {name: p.requires_grad for name, p in host.named_parameters()}
    default = trainable["patch_embed.proj.weight"]
    for name, p in encoder.named_parameters():
        if not is_apt_layer(name):
            p.requires_grad_(trainable.get(name, default))


def build_dense_sam(
    model_type: str = "vit_h",
    checkpoint: str | os.PathLike | SamCheckpoint | None = None,
    *,
    hq: bool = False,
    depth: int | None = None,
    allow_pickle: bool = False,
) -> Sam:
    """segment-anything's (sam-hq's) own model, with the checkpoint read as data and checked like
    :func:`build_apt_sam`'s; the dense baseline of the tools and tests.

    Args:
        model_type: ``vit_b``, ``vit_l``, ``vit_h`` (``default``), or ``auto``: the checkpoint's.
        depth: fewer encoder blocks (global blocks past it dropped), random weights only.
    """
    ckpt = _read(checkpoint, allow_pickle)
    embed_dim, depth, num_heads, global_blocks = _encoder_shape(model_type, ckpt, depth)
    sam = _host_builder(hq)(embed_dim, depth, num_heads, list(global_blocks), checkpoint=None)
    if ckpt is not None:
        load_sam_checkpoint(sam, ckpt)
    return sam


def build_apt_sam(
    model_type: str = "vit_h",
    checkpoint: str | os.PathLike | SamCheckpoint | None = None,
    *,
    hq: bool = False,
    thresholds: Mapping[int, float] | None = None,
    depth: int | None = None,
    allow_pickle: bool = False,
    **apt_kwargs,
) -> Sam:
    """A ``Sam`` (SAM-HQ's with ``hq=True``) in eval mode with the APT image encoder.

    Args:
        model_type: ``vit_b``, ``vit_l``, ``vit_h`` (``default``), or ``auto``: the checkpoint's.
        checkpoint: a local SAM (SAM-HQ) checkpoint, read as data, or one already read
            (:func:`read_sam_checkpoint`); only the APT layers may be missing. None: random weights.
        thresholds: ``{32: threshold}``; None: the calibrated SAM setting ``APT_SETTINGS["sam"]``.
        depth: fewer encoder blocks (global blocks past it dropped), random weights only.
        allow_pickle: read a trusted checkpoint that holds other pickled objects.
        apt_kwargs: other :class:`APTImageEncoderViT` keyword arguments.
    """
    ckpt = _read(checkpoint, allow_pickle)
    embed_dim, depth, num_heads, global_blocks = _encoder_shape(model_type, ckpt, depth)
    # SAM's builder with a one-block (window) encoder: the prompt encoder and mask decoder as SAM
    # builds them, and an encoder to read the shared block arguments from.
    sam = _host_builder(hq)(embed_dim, 1, num_heads, [], checkpoint=None)
    config = dict(encoder_config(sam.image_encoder), depth=depth, global_attn_indexes=tuple(global_blocks))
    encoder = _apt_encoder(sam, config, hq, thresholds, apt_kwargs).eval()
    _match_trainable(encoder, sam.image_encoder)
    sam.image_encoder = encoder
    if ckpt is not None:
        load_sam_checkpoint(sam, ckpt)
    return sam


def build_sam_pair(
    model_type: str = "vit_h",
    checkpoint: str | os.PathLike | SamCheckpoint | None = None,
    *,
    hq: bool = False,
    depth: int | None = None,
    allow_pickle: bool = False,
    **apt_kwargs,
) -> tuple[Sam, Sam]:
    """``(dense, apt)``: :func:`build_dense_sam`'s model and a copy with the APT encoder
    (``apt_kwargs``: :func:`swap_image_encoder`'s, e.g. ``thresholds``), so both have the same
    weights, the checkpoint's or the same random ones; both in eval mode."""
    dense = build_dense_sam(model_type, checkpoint, hq=hq, depth=depth, allow_pickle=allow_pickle).eval()
    return dense, swap_image_encoder(copy.deepcopy(dense), **apt_kwargs)


def _named_builder(model_type: str, hq: bool):
    def build(checkpoint: str | os.PathLike | None = None, thresholds: Mapping[int, float] | None = None, **kwargs) -> Sam:
        return build_apt_sam(model_type, checkpoint, hq=hq, thresholds=thresholds, **kwargs)

    kind = "SAM-HQ" if hq else "SAM"
    build.__name__ = f"build_apt_sam_{'hq_' if hq else ''}{model_type}"
    build.__doc__ = (f"{kind} {model_type} with the APT image encoder: ``build_apt_sam({model_type!r}, checkpoint, "
                     f"hq={hq}, thresholds=thresholds, **kwargs)``.")
    return build


build_apt_sam_vit_b = _named_builder("vit_b", hq=False)
build_apt_sam_vit_l = _named_builder("vit_l", hq=False)
build_apt_sam_vit_h = _named_builder("vit_h", hq=False)
build_apt_sam_hq_vit_b = _named_builder("vit_b", hq=True)
build_apt_sam_hq_vit_l = _named_builder("vit_l", hq=True)
build_apt_sam_hq_vit_h = _named_builder("vit_h", hq=True)

# As segment-anything's sam_model_registry: apt_sam_model_registry["vit_b"](checkpoint=...).
apt_sam_model_registry = {"default": build_apt_sam_vit_h, "vit_h": build_apt_sam_vit_h,
                          "vit_l": build_apt_sam_vit_l, "vit_b": build_apt_sam_vit_b}
apt_sam_hq_model_registry = {"default": build_apt_sam_hq_vit_h, "vit_h": build_apt_sam_hq_vit_h,
                             "vit_l": build_apt_sam_hq_vit_l, "vit_b": build_apt_sam_hq_vit_b}

"""Segment Anything checkpoints as data: what a file holds, and loading it with every shape checked.

SAM's (``sam_vit_b_01ec64.pth``, ...) and SAM-HQ's (``sam_hq_vit_b.pth``, ...) files are a whole
``Sam`` model's state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``; SAM-HQ
adds ``mask_decoder.hf_token``, ``hf_mlp``, ``compress_vit_feat``, ``embedding_encoder``,
``embedding_maskfeature``). Files of other SAM families are recognised by their keys and refused
with a message saying what they are.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints import load_state_dict_checked, read_checkpoint, unwrap_state_dict
from ..presets import SAM_ENCODERS

__all__ = ["SamCheckpoint", "read_sam_checkpoint", "load_sam_checkpoint", "describe_encoder", "SAM_CHECKPOINT_NAMES"]

SAM_CHECKPOINT_NAMES = (
    "SAM: sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth; "
    "SAM-HQ: sam_hq_vit_b.pth, sam_hq_vit_l.pth, sam_hq_vit_h.pth"
)

# (what the file is, a key pattern only that family has)
_OTHER_FAMILIES = (
    ("a SAM 2 checkpoint (Hiera image encoder with memory attention)",
     re.compile(r"^(image_encoder\.trunk\.|memory_attention\.|memory_encoder\.|sam_mask_decoder\.)")),
    ("an EfficientSAM checkpoint (a plain ViT image encoder without windows or relative positions)",
     re.compile(r"^image_encoder\.blocks\.\d+\.mlp\.fc1\.")),
    ("a MobileSAM / SAM-HQ vit_tiny checkpoint (TinyViT image encoder)", re.compile(r"^image_encoder\.layers\.")),
)
_HQ_KEY = re.compile(r"^mask_decoder\.(hf_token|hf_mlp|compress_vit_feat|embedding_encoder|embedding_maskfeature)\.")
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
_PATCH_EMBED = "image_encoder.patch_embed.proj.weight"


@dataclass(frozen=True)
class SamCheckpoint:
    """A SAM or SAM-HQ checkpoint read as data.

    Attributes:
        path: the file.
        state: its state dict.
        hq: it has SAM-HQ's decoder layers.
        encoder: ``(embed_dim, depth, num_heads, global_attn_indexes)`` of its image encoder;
            the last two are None when it has no relative-position tables to tell them.
    """

    path: Path
    state: dict[str, torch.Tensor]
    hq: bool
    encoder: tuple[int, int, int | None, tuple[int, ...] | None]

    @property
    def model_type(self) -> str | None:
        """``vit_b``/``vit_l``/``vit_h`` when the encoder has one of SAM's shapes, else None."""
        return _model_type(self.encoder)


def _model_type(encoder: tuple) -> str | None:
    for name, shape in SAM_ENCODERS.items():
        if encoder[:2] == shape[:2] and all(got is None or got == want for got, want in zip(encoder[2:], shape[2:])):
            return name
    return None


def describe_encoder(encoder: tuple) -> str:
    """E.g. ``"ViT-B (vit_b: embed_dim 768, 12 blocks)"``."""
    embed_dim, depth = encoder[:2]
    name = _model_type(encoder)
    shape = f"embed_dim {embed_dim}, {depth} blocks"
    return f"ViT-{name[-1].upper()} ({name}: {shape})" if name else f"a ViT with {shape}"


def read_sam_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> SamCheckpoint:
    """Read a SAM / SAM-HQ checkpoint as data and tell what it holds.

    Raises:
        ValueError: the file is a SAM 2, EfficientSAM or MobileSAM checkpoint, or not a whole
            Segment Anything model's state dict.
        UnsafeCheckpointError: it needs pickled Python objects (``allow_pickle=True`` for a
            trusted file).
    """
    path = Path(path)
    state = unwrap_state_dict(read_checkpoint(path, allow_pickle=allow_pickle))
    for what, pattern in _OTHER_FAMILIES:
        example = next((k for k in state if pattern.search(k)), None)
        if example is not None:
            raise ValueError(
                f"{path} is {what}, e.g. key {example!r}; it is not supported: apt_dense.sam takes "
                f"Segment Anything's ViT checkpoints ({SAM_CHECKPOINT_NAMES})"
            )
    if _PATCH_EMBED not in state or not isinstance(state[_PATCH_EMBED], torch.Tensor):
        first = ", ".join(list(state)[:5]) or "none"
        raise ValueError(
            f"{path} is not a Segment Anything checkpoint: it has no {_PATCH_EMBED} (first keys: {first}). "
            f"Pass a whole SAM model's state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*): {SAM_CHECKPOINT_NAMES}"
        )
    return SamCheckpoint(path, state, any(_HQ_KEY.search(k) for k in state), _encoder_shape(state))


def _encoder_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int | None, tuple[int, ...] | None]:
    """``(embed_dim, depth, num_heads, global_attn_indexes)`` from the tensors' shapes: the
    relative-position tables are ``(2 * side - 1, head_dim)``, longest in global blocks."""
    embed_dim = int(state[_PATCH_EMBED].shape[0])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    tables = [state.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    if not depth or any(t is None for t in tables):
        return embed_dim, depth, None, None
    longest = max(t.shape[0] for t in tables)
    num_heads = embed_dim // int(tables[0].shape[1])
    return embed_dim, depth, num_heads, tuple(i for i, t in enumerate(tables) if t.shape[0] == longest)


def load_sam_checkpoint(sam: nn.Module, checkpoint: SamCheckpoint) -> None:
    """Load a checkpoint into a whole ``Sam`` (dense or APT): every shape must match, and only
    the APT layers may be missing.

    Raises:
        ValueError: SAM-HQ weights for a SAM model or the reverse, a shape mismatch (every key
            listed), or weights the model needs that the file lacks.
    """
    model_hq = hasattr(sam.mask_decoder, "hf_token")
    if checkpoint.hq and not model_hq:
        raise ValueError(
            f"{checkpoint.path} is a SAM-HQ checkpoint (it has SAM-HQ's mask_decoder.hf_token, hf_mlp, ...): build "
            "it with the SAM-HQ builders (build_apt_sam_hq_vit_b/l/h, or build_apt_sam(..., hq=True))"
        )
    if model_hq and not checkpoint.hq:
        raise ValueError(
            f"{checkpoint.path} is a SAM checkpoint without SAM-HQ's decoder layers (mask_decoder.hf_token, "
            "hf_mlp, ...), so the HQ decoder would stay random: build it with build_apt_sam_vit_b/l/h, or "
            "pass a SAM-HQ checkpoint (sam_hq_vit_b.pth, sam_hq_vit_l.pth, sam_hq_vit_h.pth)"
        )
    missing, _ = load_state_dict_checked(sam, checkpoint.state)
    if missing:
        raise ValueError(
            f"{checkpoint.path} lacks {len(missing)} weights of the model (they would stay random): "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )

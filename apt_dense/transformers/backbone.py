"""``APTDinov2Backbone``: transformers' ``Dinov2Backbone`` / ``Dinov2WithRegistersBackbone`` with APT.

The backbone keeps transformers' module tree, so its state-dict keys are the dense backbone's
(``embeddings.{cls_token, mask_token, position_embeddings, [register_tokens],
patch_embeddings.projection}``, ``encoder.layer.N.*``, ``layernorm``) plus the APT layers
``embeddings.patch_embeddings.{downsample, detail}``. The APT forward pass is the core's: an
:class:`~apt_dense.APTViT` registered as ``apt`` holds the planner and reads its learned parts
where this tree keeps them (:data:`PARTS`).
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn as nn
from transformers import Dinov2Config, Dinov2WithRegistersConfig, PretrainedConfig
from transformers.modeling_outputs import BackboneOutput

from ..checkpoints import is_apt_layer
from ..embedding import AdaptivePatchEmbed
from ..model import APTViT, TokenStats
from ..presets import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD

__all__ = ["APTDinov2Backbone", "apt_kwargs_from_config", "PARTS"]

# APTViT's learned parts, and where transformers' DINOv2 backbones keep them (their state-dict keys).
PARTS = {
    "patch_embed": "embeddings.patch_embeddings",
    "pos_embed": "embeddings.position_embeddings",
    "cls_token": "embeddings.cls_token",
    "register_tokens": "embeddings.register_tokens",
    "blocks": "encoder.layer",
}


def _side(value: int | Sequence[int], name: str) -> int:
    """A square size as one int (transformers allows ``(h, w)`` pairs)."""
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"config.{name}={value!r}: APT needs square patches and a square pretrained grid")


def apt_kwargs_from_config(config: PretrainedConfig) -> dict:
    """:class:`~apt_dense.APTViT` arguments for a ``Dinov2Config`` / ``Dinov2WithRegistersConfig``.

    ``out_indices`` become block indices (transformers' stage ``k`` is block ``k - 1``).

    Raises:
        TypeError: another config class.
        ValueError: naming the setting APT does not support (the ``stem`` stage, dropout,
            activations other than GELU, non-square patches).
    """
    if not isinstance(config, (Dinov2Config, Dinov2WithRegistersConfig)):
        raise TypeError(f"expected a Dinov2Config or Dinov2WithRegistersConfig, got {type(config).__name__}")
    stages = list(config.out_indices)
    if 0 in stages:
        raise ValueError("out_features includes 'stem' (the patch embeddings): APT backbones return block outputs "
                         "(stage1 and later); drop 'stem'")
    dropout = {"hidden_dropout_prob": config.hidden_dropout_prob,
               "attention_probs_dropout_prob": config.attention_probs_dropout_prob}
    if any(dropout.values()):
        raise ValueError(f"APT blocks have no dropout; set {[k for k, v in dropout.items() if v]} to 0")
    if config.hidden_act != "gelu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: APT's DINOv2 blocks use 'gelu' (the released models')")
    registers = getattr(config, "num_register_tokens", 0) if isinstance(config, Dinov2WithRegistersConfig) else 0
    image_size = _side(config.image_size, "image_size")
    return dict(
        img_size=image_size, patch_size=_side(config.patch_size, "patch_size"), in_chans=config.num_channels,
        embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, drop_path_rate=config.drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps), act_layer=nn.GELU,
        pretrain_img_size=image_size, pretrain_use_cls_token=True, use_cls_token=True,
        num_register_tokens=registers, block_type="dinov2", layerscale_value=config.layerscale_value,
        use_swiglu_ffn=config.use_swiglu_ffn, pos_embed_resize="dinov2_registers" if registers else "dinov2",
        out_indices=[stage - 1 for stage in stages],
    )


class _PatchEmbeddings(AdaptivePatchEmbed):
    """:class:`~apt_dense.AdaptivePatchEmbed` with transformers' name for the host's patch
    projection, ``projection`` (the APT layers keep theirs: ``downsample``, ``detail``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, num_levels: int):
        super().__init__(patch_size, in_chans, embed_dim, num_levels)
        self.projection = self._modules.pop("proj")

    @property
    def proj(self) -> nn.Conv2d:
        return self.projection


class _Embeddings(nn.Module):
    """transformers' ``Dinov2Embeddings`` key layout; the mask token is kept for the keys (APT
    does not mask patches)."""

    def __init__(self, patch_embeddings: _PatchEmbeddings, mask_token: nn.Parameter):
        super().__init__()
        self.patch_embeddings = patch_embeddings
        self.mask_token = mask_token


class _Encoder(nn.Module):
    def __init__(self, layer: nn.ModuleList):
        super().__init__()
        self.layer = layer


class _APTEngine(APTViT):
    """The core APT forward pass over a backbone's parts: after :meth:`attach`, the names in
    :data:`PARTS` resolve in the owning backbone; the engine itself keeps only the planner (no
    state-dict keys)."""

    def attach(self, owner: nn.Module) -> None:
        for name in PARTS:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
            self.__dict__.pop(name, None)
        # A plain reference, not a submodule: the owner registers the engine, not the reverse.
        self.__dict__["_owner"] = owner

    def __getattr__(self, name: str):
        owner = self.__dict__.get("_owner")
        if owner is not None and name in PARTS:
            try:
                return operator.attrgetter(PARTS[name])(owner)
            except AttributeError:
                return None  # register_tokens of a backbone without registers
        return super().__getattr__(name)


class APTDinov2Backbone(nn.Module):
    """A drop-in for transformers' ``Dinov2Backbone`` and ``Dinov2WithRegistersBackbone`` with
    Adaptive Patch Transformers.

    Built from the same config object, with the same state-dict keys (plus the APT layers
    ``embeddings.patch_embeddings.{downsample,detail}``); :meth:`forward` returns the same
    ``BackboneOutput.feature_maps`` for ``out_features``, honouring ``apply_layernorm`` and
    ``reshape_hidden_states``. Sequence outputs (``reshape_hidden_states=False``, as Depth
    Anything and DPT read them) are ``(B, 1 + R + h*w, C)``: the cls token, the ``R`` register
    tokens, then every cell of the ``h x w`` grid (a large patch's token repeated over its cells).

    Differences from the dense backbone: ``hidden_states`` and ``attentions`` are not returned
    (None; the fused attention has no weights to return), ``attention_mask`` and dropout are not
    supported, and the ``stem`` stage cannot be an output.

    Args:
        config: a ``Dinov2Config`` or ``Dinov2WithRegistersConfig`` (kept, not copied).
        thresholds: ``{patch_size: threshold}`` for the coarse sizes (28, 56 for 14 px patches);
            None keeps base patches only.
        adaptive: False runs the dense model (every cell a 14 px token), exactly.
        scorer, scorer_kwargs, input_format, attention_backend: as :class:`~apt_dense.APTViT`.
        pixel_mean, pixel_std: the processor's normalisation on the 0..255 scale (undone for
            scoring); ImageNet's by default, as every DINOv2 / Depth Anything processor uses.

    Attributes:
        apt: the :class:`~apt_dense.APTViT` running the forward pass (``apt.planner``,
            ``apt.compile_blocks()``, ``apt.attention_backends(...)``).
        token_stats: tokens kept by every forward pass since it was reset.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        thresholds: Mapping[int, float] | None = None,
        adaptive: bool = True,
        scorer: str | object = "entropy",
        scorer_kwargs: Mapping[str, object] | None = None,
        pixel_mean: Sequence[float] | None = IMAGENET_PIXEL_MEAN,
        pixel_std: Sequence[float] | None = IMAGENET_PIXEL_STD,
        input_format: str = "RGB",
        attention_backend: str = "auto",
    ):
        super().__init__()
        kwargs = apt_kwargs_from_config(config)
        self.config = config
        self._stages = tuple(config.out_indices)
        engine = _APTEngine(
            **kwargs, adaptive=adaptive, thresholds=thresholds, scorer=scorer, scorer_kwargs=scorer_kwargs,
            pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
            attention_backend=attention_backend,
        )
        patch_embeddings = _PatchEmbeddings(
            kwargs["patch_size"], kwargs["in_chans"], kwargs["embed_dim"], engine.planner.schedule.num_levels
        )
        self.embeddings = _Embeddings(patch_embeddings, nn.Parameter(torch.zeros(1, config.hidden_size)))
        self.embeddings.cls_token = engine.cls_token
        self.embeddings.position_embeddings = engine.pos_embed
        if engine.register_tokens is not None:
            self.embeddings.register_tokens = engine.register_tokens
        self.encoder = _Encoder(engine.blocks)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        engine.attach(self)
        self.apt = engine
        self.token_stats = TokenStats()

    @classmethod
    def from_dense(cls, backbone: nn.Module, **apt_kwargs) -> "APTDinov2Backbone":
        """The APT twin of a ``Dinov2Backbone`` / ``Dinov2WithRegistersBackbone``: its config
        object and weights (copied), device, dtype and train/eval mode; the APT layers new
        (``detail`` zero, so large patches start as their resize-only embedding).

        Raises:
            ValueError: naming the keys, if the dense backbone's weights do not fit (keys or shapes).
        """
        weight = backbone.embeddings.patch_embeddings.projection.weight
        model = cls(backbone.config, **apt_kwargs)
        state = backbone.state_dict()
        own = model.state_dict()
        problems = [f"  {k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                    if k in own and v.shape != own[k].shape]
        problems += [f"  {k}: not in the APT backbone" for k in state if k not in own]
        problems += [f"  {k}: missing from {type(backbone).__name__}" for k in own if k not in state and not is_apt_layer(k)]
        if problems:
            raise ValueError(f"{type(backbone).__name__}'s weights do not fit the APT backbone:\n" + "\n".join(problems))
        model.load_state_dict(state, strict=False)
        return model.to(device=weight.device, dtype=weight.dtype).train(backbone.training)

    # transformers' backbone API (BackboneMixin's, for a config whose outputs do not change).

    @property
    def stage_names(self) -> list[str]:
        return list(self.config.stage_names)

    @property
    def out_features(self) -> list[str]:
        return list(self.config.out_features)

    @property
    def out_indices(self) -> list[int]:
        return list(self.config.out_indices)

    @property
    def num_features(self) -> list[int]:
        return [self.config.hidden_size] * len(self.config.stage_names)

    @property
    def channels(self) -> list[int]:
        return [self.config.hidden_size] * len(self.config.out_features)

    def forward_with_filtered_kwargs(self, *args, **kwargs) -> BackboneOutput | tuple:
        return self(*args, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        """``(B, 3, H, W)`` normalised pixels -> ``BackboneOutput`` with one feature map per
        entry of ``out_features``: ``(B, C, H // 14, W // 14)``, or ``(B, 1 + R + h*w, C)``
        sequences with ``reshape_hidden_states=False``. As in the dense backbone, pixels beyond
        the last whole patch are ignored.

        ``output_hidden_states`` is accepted (Depth Anything and DPT always ask) but per-layer
        hidden states are not computed: ``hidden_states`` is None.
        """
        if kwargs:
            raise TypeError(f"APTDinov2Backbone.forward got unexpected arguments {sorted(kwargs)}")
        if attention_mask is not None:
            raise ValueError("APT backbones attend over every token of an image; attention_mask is not supported")
        if output_attentions or (output_attentions is None and self.config.output_attentions):
            raise ValueError("APT backbones run fused variable-length attention and return no attention weights; "
                             "call without output_attentions")
        if tuple(self.config.out_indices) != self._stages:
            raise RuntimeError(f"config.out_indices changed from {list(self._stages)} to {self.config.out_indices} "
                               "after the APT backbone was built; build it again from the config")
        images = self._whole_patches(pixel_values)
        out = self.apt.forward_features(images)
        self.token_stats.update(out.layout)
        feature_maps = tuple(self._feature_map(f, p) for f, p in zip(out.features, out.prefix_tokens))
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return (feature_maps,)
        return BackboneOutput(feature_maps=feature_maps)

    def _whole_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pixels the dense backbone's strided patch convolution reads, in its weights' dtype."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got "
                             f"{tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)}")
        p = self.apt.patch_size
        h, w = pixel_values.shape[-2] // p * p, pixel_values.shape[-1] // p * p
        if h == 0 or w == 0:
            raise ValueError(f"pixel_values of {tuple(pixel_values.shape[-2:])} px hold no whole {p} px patch; "
                             f"resize images to at least {p}x{p} (the processor gives multiples of {p})")
        weight = self.embeddings.patch_embeddings.projection.weight
        return pixel_values[..., :h, :w].to(weight.dtype)

    def _feature_map(self, dense: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """One block's output as the dense backbone returns it, from the ``(B, C, h, w)`` map and
        the ``(B, P, C)`` prefix tokens."""
        if self.config.reshape_hidden_states:
            if self.config.apply_layernorm:
                dense = self.layernorm(dense.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return dense.contiguous()
        sequence = torch.cat([prefix, dense.flatten(2).transpose(1, 2)], dim=1)
        return self.layernorm(sequence) if self.config.apply_layernorm else sequence

"""Putting APT into transformers models: swap the DINOv2 backbone of a model in hand, or load a local
model folder and swap."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch.nn as nn
from transformers import (
    AutoConfig, DepthAnythingForDepthEstimation, Dinov2Backbone, Dinov2WithRegistersBackbone, DPTForDepthEstimation,
    PretrainedConfig,
)

from ..checkpoints import is_apt_layer, read_checkpoint, unwrap_state_dict
from ..presets import APT_SETTINGS
from .backbone import APTDinov2Backbone

__all__ = ["swap_to_apt", "from_pretrained", "folder_config", "FOLDER_CLASSES"]

logger = logging.getLogger(__name__)

DENSE_BACKBONES = (Dinov2Backbone, Dinov2WithRegistersBackbone)
# The transformers class that loads a folder, by the config's model_type. DINOv2 folders saved as
# Dinov2Model (facebook/dinov2-*) hold the backbone's keys.
FOLDER_CLASSES = {
    "depth_anything": DepthAnythingForDepthEstimation,
    "dpt": DPTForDepthEstimation,
    "dinov2": Dinov2Backbone,
    "dinov2_with_registers": Dinov2WithRegistersBackbone,
}


def swap_to_apt(model: nn.Module, **apt_kwargs) -> nn.Module:
    """Give a transformers model an APT DINOv2 backbone with the same config and weights.

    Args:
        model: a ``DepthAnythingForDepthEstimation``, a ``DPTForDepthEstimation`` (or any model)
            whose ``backbone`` is a ``Dinov2Backbone`` / ``Dinov2WithRegistersBackbone``, built or
            loaded (``from_pretrained(local_folder)``); or such a backbone itself.
        apt_kwargs: :class:`APTDinov2Backbone`'s (``thresholds``, ``adaptive``, ``scorer``,
            ``pixel_mean``/``pixel_std``, ``attention_backend``, ...); ``thresholds`` default to
            the calibrated 14 px setting ``APT_SETTINGS["depth"]`` (None: base patches only).
    Returns:
        ``model`` with ``model.backbone`` replaced (in place), or the APT backbone when ``model``
        is a backbone. With ``adaptive=False`` it computes what the dense model computes.
    Raises:
        TypeError: naming what is supported, for a model without a DINOv2 backbone (e.g. DPT on
            its own ViT, ``Intel/dpt-large``) or one already swapped.
    """
    apt_kwargs.setdefault("thresholds", APT_SETTINGS["depth"])
    if isinstance(model, DENSE_BACKBONES):
        return APTDinov2Backbone.from_dense(model, **apt_kwargs)
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, APTDinov2Backbone):
        raise TypeError(f"{type(model).__name__}'s backbone is already an APTDinov2Backbone; for other thresholds, "
                        "swap the dense model (or load its folder again with from_pretrained)")
    if not isinstance(backbone, DENSE_BACKBONES):
        found = type(backbone).__name__ if backbone is not None else "none"
        raise TypeError(
            f"{type(model).__name__} has no DINOv2 backbone to swap (model.backbone: {found}); APT supports "
            "Dinov2Backbone and Dinov2WithRegistersBackbone, as in Depth Anything (V1/V2) and DPT with a DINOv2 "
            "backbone. DPT on its own ViT (Intel/dpt-large, dpt-hybrid) is not supported"
        )
    model.backbone = APTDinov2Backbone.from_dense(backbone, **apt_kwargs)
    return model


def from_pretrained(folder: str | os.PathLike, *, output_loading_info: bool = False, apt: dict | None = None,
                    **hf_kwargs):
    """Load a local transformers model folder and swap its DINOv2 backbone to APT.

    The folder is read by transformers (``local_files_only``: nothing is downloaded), so its key
    conversions apply. APT layers saved with the model (a fine-tuned APT model) are loaded too;
    a folder without them is a dense model, whose APT layers start new (``detail`` zero).

    Args:
        folder: a folder written by ``save_pretrained`` (config + weights) of a Depth Anything,
            DPT (DINOv2 backbone), DINOv2 or DINOv2-with-registers model.
        output_loading_info: also return ``{"missing_keys", "unexpected_keys"}``: the APT layers
            the folder lacks, and the keys it holds that the model does not use.
        apt: :class:`APTDinov2Backbone`'s arguments (``thresholds``, ``adaptive``, ...), as
            :func:`swap_to_apt` takes them.
        hf_kwargs: passed to transformers' ``from_pretrained`` (``out_indices``, ``dtype``, ...).
    Raises:
        ValueError: naming the keys, when the folder's weights do not fit its config (shape
            mismatches) or lack weights of the model other than the APT layers.
    """
    folder = Path(folder)
    config = folder_config(folder)
    dense_class = FOLDER_CLASSES.get(config.model_type)
    if dense_class is None:
        raise ValueError(f"{folder}: model_type {config.model_type!r} has no DINOv2 backbone APT can swap; "
                         f"supported: {sorted(FOLDER_CLASSES)}")
    # Mismatches come back in the loading info (transformers' own error does not name them).
    model, info = dense_class.from_pretrained(
        folder, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **hf_kwargs
    )
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        raise ValueError(f"{folder}: weights do not fit the model of its config.json (shape mismatch):\n"
                         + "\n".join(f"  {k}: folder {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched))
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(f"{folder}: the weights lack keys of {dense_class.__name__} (they would stay random): {missing}")
    apt_saved = sorted(k for k in info["unexpected_keys"] if is_apt_layer(k))
    unexpected = sorted(k for k in info["unexpected_keys"] if not is_apt_layer(k))
    if unexpected:
        logger.warning("%s: keys not used by %s: %s", folder, dense_class.__name__, unexpected)
    model = swap_to_apt(model, **(apt or {}))
    apt_missing = sorted(k for k in model.state_dict() if is_apt_layer(k) and k not in apt_saved)
    if apt_saved:
        _load_apt_layers(model, folder, apt_saved)
    if apt_missing:
        logger.info("%s: APT layers not in the folder (new, zero-initialised detail): %s", folder, apt_missing)
    if output_loading_info:
        return model, {"missing_keys": apt_missing, "unexpected_keys": unexpected}
    return model


def folder_config(folder: Path) -> PretrainedConfig:
    """The config of a local model folder (``config.json``, read by transformers).

    Raises:
        FileNotFoundError: ``folder`` does not exist or holds no ``config.json``.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder; pass the local folder save_pretrained "
                                "wrote (a checkpoint is downloaded to a local folder first)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json); pass the folder "
                                "save_pretrained wrote, or download a checkpoint to a local folder first")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` folder (sharded or not)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{name}.index.json"
        if index.is_file():
            return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")


def _load_apt_layers(model: nn.Module, folder: Path, keys: list[str]) -> None:
    """Copy the saved APT layers into ``model`` (read as data; shapes checked)."""
    state = {}
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in keys if k in f.keys()})
        else:
            state.update({k: v for k, v in unwrap_state_dict(read_checkpoint(path)).items() if k in keys})
    own = model.state_dict()
    unused = sorted(k for k in state if k not in own)
    if unused:
        logger.warning("%s: saved APT layers unused by a model without coarse patch sizes: %s", folder, unused)
    bad = [f"  {k}: folder {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{folder}: saved APT layers do not fit the model (patch sizes or width differ):\n"
                         + "\n".join(bad))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

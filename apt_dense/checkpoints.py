"""Checkpoint reading and key rules shared by the framework adapters (no framework imports).

Checkpoints are data: :func:`read_checkpoint` unpickles tensors, numpy arrays and plain containers
only, never code. A file that needs other Python objects is refused with a message naming them;
``allow_pickle=True`` (``--unsafe-load`` in the tools) reads a trusted legacy file anyway.
"""
from __future__ import annotations

import codecs
import collections
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = [
    "UnsafeCheckpointError",
    "read_checkpoint",
    "unwrap_state_dict",
    "state_dict_tensors",
    "load_state_dict_checked",
    "is_apt_layer",
    "is_recomputed_buffer",
    "convert_eva02_pretrain",
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint holds pickled Python objects beyond tensors, arrays and containers."""


def _numpy_globals() -> list[tuple[object, str]]:
    """What pickled numpy arrays and scalars reference, under numpy 1.x and 2.x module names."""
    from numpy.core.multiarray import _reconstruct, scalar  # numpy 2 keeps these aliases

    found: list[tuple[object, str]] = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(_reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    found += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    found += [(cls, f"numpy.dtypes.{name}") for name, cls in vars(np.dtypes).items() if isinstance(cls, type)]
    return found


# Legacy (Detectron / detectron2 model zoo) .pkl files: numpy arrays in plain containers.
_PKL_GLOBALS = {name: obj for obj, name in _numpy_globals()}
_PKL_GLOBALS.update({"_codecs.encode": codecs.encode, "collections.OrderedDict": collections.OrderedDict})


# torch's weights-only unpickler and ours name the refused global in one of these forms.
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: (?:GLOBAL )?|unsupported GLOBAL )([\w.]+)")


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        key = f"{module}.{name}"
        if key in _PKL_GLOBALS:
            return _PKL_GLOBALS[key]
        raise UnsafeCheckpointError(f"Unsupported global: {key}")


def _unsafe_message(path: Path, err: Exception) -> str:
    return (
        f"{path} holds pickled Python objects, not only tensors and arrays ({err}). Checkpoints are "
        "read as data by default because unpickling can run code. If you trust this file, load it "
        "with allow_pickle=True (--unsafe-load in the tools), or re-save its state dict with "
        "torch.save({'state_dict': state_dict}, path)."
    )


def read_checkpoint(
    path: str | os.PathLike, *, allow_pickle: bool = False, safe_globals: Iterable[object] = ()
) -> Mapping:
    """Read a checkpoint file as data.

    Args:
        path: a ``torch.save`` file (``.pth``/``.pt``/``.bin``...) or a legacy pickle (``.pkl``,
            detectron2 / Detectron model zoo: numpy arrays in dicts).
        allow_pickle: unpickle arbitrary Python objects (trusted files only).
        safe_globals: extra classes that are plain data (e.g. a framework's log buffers).
    Returns:
        The loaded object (a mapping).
    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs Python objects outside the allowed set.
        ValueError: the file is not a checkpoint (truncated, or not a torch/pickle file).
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a folder; give the checkpoint file in it (.pth, .pt, .pkl)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                data = (pickle.Unpickler(f, encoding="latin1") if allow_pickle else _DataUnpickler(f, encoding="latin1")).load()
        elif allow_pickle:
            data = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([*_numpy_globals(), *safe_globals]):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling arbitrary bytes raises anything (IndexError, KeyError, ...)
        unsafe = _UNSUPPORTED_GLOBAL.search(str(err))
        if unsafe:
            raise UnsafeCheckpointError(_unsafe_message(path, f"it needs {unsafe.group(1)}")) from err
        detail = str(err).split("WeightsUnpickler error:")[-1].strip()
        detail = detail.splitlines()[0][:200] if detail else ""
        raise ValueError(
            f"{path} is not a readable checkpoint: it is truncated, corrupt or not a torch.save/pickle "
            f"file ({type(err).__name__}: {detail}); download or copy it again"
        ) from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict / state dict")
    return data


def unwrap_state_dict(checkpoint: Mapping) -> dict:
    """The state dict inside a checkpoint: under ``state_dict``/``model``/``module`` if present,
    with a DistributedDataParallel ``module.`` prefix removed from every key."""
    state = checkpoint
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)

# patch_embed: the core's and detectron2/mmseg/mmdet names; patch_embeddings: transformers' DINOv2.
_APT_LAYER = re.compile(r"(^|\.)patch_embed(dings)?\.(downsample|detail)\.")
_ROPE_BUFFER = re.compile(r"(^|\.)(rope|rope_win|rope_glb)\.freqs_(cos|sin)$")


def is_apt_layer(key: str) -> bool:
    """The layers APT adds to a host ViT (absent from every host checkpoint)."""
    return bool(_APT_LAYER.search(key))


def is_recomputed_buffer(key: str) -> bool:
    """EVA-02's fixed RoPE tables; APTViT computes RoPE at token centres instead."""
    return bool(_ROPE_BUFFER.search(key))


_PRETRAIN_ONLY = re.compile(r"^(mask_token|lm_head\.|norm\.|fc_norm\.|head\.|cls_token$|rel_pos_bias\.)")


def convert_eva02_pretrain(state: Mapping[str, torch.Tensor], prefix: str = "backbone.net.") -> tuple[dict, list[str]]:
    """EVA-02 pretraining weights (``eva02_*_p14to16.pt``: unprefixed, with ``mask_token``,
    ``lm_head.*`` and pretraining-size RoPE tables) to a detection checkpoint's ``backbone.net.*``.

    Returns:
        ``(state_dict, dropped_keys)``; every input key is either converted or listed as dropped.
    """
    converted, dropped = {}, []
    for key, value in unwrap_state_dict(state).items():
        if _PRETRAIN_ONLY.search(key) or is_recomputed_buffer(key):
            dropped.append(key)
        else:
            converted[prefix + key] = value
    if not any(k.startswith(prefix + "blocks.") for k in converted):
        raise ValueError("no transformer blocks ('blocks.N.*') found: is this an EVA-02 pretraining checkpoint?")
    return converted, dropped


def state_dict_tensors(state: Mapping) -> dict[str, torch.Tensor]:
    """``state`` with every value a tensor: the one place where the numpy arrays and scalars of
    legacy checkpoints (detectron2 / Detectron model zoo ``.pkl`` files) become tensors, for
    every loader of this package.

    Raises:
        TypeError: a key is not a parameter name (str), or a value is neither a tensor nor a
            numeric numpy array; the message names the entry.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"a state dict maps parameter names to tensors, got {type(state).__name__}: pass model.state_dict() "
            "or the state dict inside a checkpoint (apt_dense.checkpoints.unwrap_state_dict finds it)"
        )
    converted = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(
                f"state dict keys must be parameter names (str, e.g. 'blocks.0.attn.qkv.weight'), got "
                f"{key!r} ({type(key).__name__}): pass the model's state dict, not a list or an index"
            )
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.ascontiguousarray(value)
            if array.dtype.kind not in "biufc":
                raise TypeError(f"state dict entry {key!r} is a numpy array of {array.dtype}, not of numbers")
            value = torch.from_numpy(array if array.flags.writeable else array.copy())
        elif not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state dict entry {key!r} is a {type(value).__name__} ({str(value)[:60]!r}), not a tensor or "
                "numpy array: is this a whole checkpoint rather than its state dict? "
                "(apt_dense.checkpoints.unwrap_state_dict finds the state dict inside)"
            )
        converted[key] = value
    return converted


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model``: every shape must match, the rest is reported.

    Values may be numpy arrays (legacy ``.pkl`` files); see :func:`state_dict_tensors`.

    Shape mismatches raise with every offending key (a silently re-initialised layer is worse
    than no model). EVA-02's fixed RoPE tables are dropped (APTViT recomputes RoPE); missing
    APT layers are expected (logged at info); any other missing or unexpected key is logged as
    a warning and returned.

    Returns:
        ``(missing_keys, unexpected_keys)`` other than the APT layers and recomputed buffers.
    """
    state = state_dict_tensors(state)
    dropped = [k for k in state if is_recomputed_buffer(k)]
    state = {k: v for k, v in state.items() if not is_recomputed_buffer(k)}
    own = model.state_dict()
    bad = [
        f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ValueError(
            "checkpoint does not fit the model (shape mismatch); check embed_dim, depth, num_heads, "
            "img_size / window_size (pos_embed, relative positions), head channels and num_classes:\n"
            + "\n".join(bad)
        )
    incompatible = model.load_state_dict(state, strict=False)
    apt_missing = [k for k in incompatible.missing_keys if is_apt_layer(k)]
    missing = [k for k in incompatible.missing_keys if not is_apt_layer(k)]
    if dropped:
        logger.info("Ignored %d RoPE buffers that APTViT recomputes", len(dropped))
    if apt_missing:
        logger.info("APT layers not in the checkpoint (new, trained by APT fine-tuning): %s", apt_missing)
    if missing:
        logger.warning("Missing keys (left at initialisation): %s", missing)
    if incompatible.unexpected_keys:
        logger.warning("Unexpected keys (not loaded): %s", incompatible.unexpected_keys)
    return missing, list(incompatible.unexpected_keys)

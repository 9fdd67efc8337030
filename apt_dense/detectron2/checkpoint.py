"""Checkpoint loading for APT detectors: files read as data, loud on shape mismatches,
explicit about APT layers.

detectron2's ``DetectionCheckpointer`` unpickles whatever a file holds and skips parameters whose
shapes differ with a warning. :class:`APTCheckpointer` reads files through
:func:`apt_dense.checkpoints.read_checkpoint` (tensors, arrays and containers only, unless
``allow_pickle=True``) and raises on shape mismatches. It also names the APT layers (the only keys
a host checkpoint cannot have) and drops EVA-02's RoPE buffers, which APTViT recomputes.
"""
from __future__ import annotations

import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoints import is_apt_layer, is_recomputed_buffer, read_checkpoint, state_dict_tensors

__all__ = ["APTCheckpointer", "load_backbone_checkpoint"]

logger = logging.getLogger(__name__)


class APTCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` for models with an APT backbone (see module docstring).

    Args:
        model, save_dir, checkpointables: as for ``DetectionCheckpointer``.
        allow_pickle: unpickle arbitrary Python objects from checkpoint files (trusted files only;
            ``--unsafe-load`` in the tools). By default a file holding anything but tensors,
            numpy arrays and plain containers is refused with an ``UnsafeCheckpointError``.
    """

    def __init__(self, model, save_dir: str = "", *, allow_pickle: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_pickle = allow_pickle

    def _load_file(self, filename: str):
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # torch files come back through _torch_load
        data = read_checkpoint(filename, allow_pickle=self.allow_pickle)
        # detectron2's handling of model-zoo .pkl files, reading them as data.
        if "model" in data and "__author__" in data:  # detectron2 model zoo
            self.logger.info("Reading a file from '%s'", data["__author__"])
            return dict(data)
        if "blobs" in data:  # Caffe2 / Detectron1 detection models
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f: str):
        return dict(read_checkpoint(f, allow_pickle=self.allow_pickle))

    def _load_model(self, checkpoint):
        state = checkpoint["model"] = state_dict_tensors(checkpoint["model"])
        dropped = [k for k in state if is_recomputed_buffer(k)]
        for k in dropped:
            state.pop(k)
        if dropped:
            logger.info("Ignored %d RoPE buffers that APTViT recomputes (e.g. %s)", len(dropped), dropped[0])
        incompatible = super()._load_model(checkpoint)
        apt_missing = [k for k in incompatible.missing_keys if is_apt_layer(k)]
        if apt_missing:
            logger.info("APT layers not in the checkpoint (new, trained by APT fine-tuning): %s", apt_missing)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not is_apt_layer(k)]
        if incompatible.incorrect_shapes:
            # fvcore skipped these with a warning; a detector with silently re-initialised
            # weights is worse than no detector.
            raise ValueError(
                "checkpoint does not fit the model (shape mismatch); check the config's embed_dim, "
                "depth, num_heads, window_size/img_size (relative-position tables), pretrain_img_size "
                "(pos_embed) and num_classes against the checkpoint's:\n"
                + "\n".join(f"  {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in incompatible.incorrect_shapes)
            )
        return incompatible


def load_backbone_checkpoint(model: torch.nn.Module, path: str, *, allow_pickle: bool = False) -> APTCheckpointer:
    """Load ``path`` into a detectron2 model through :class:`APTCheckpointer`."""
    checkpointer = APTCheckpointer(model, allow_pickle=allow_pickle)
    checkpointer.load(path)
    return checkpointer

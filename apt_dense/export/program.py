"""``torch.export`` of a backbone: what can be exported, the program, and what travels with it.

Both formats start from the same :class:`torch.export.ExportedProgram` of a
:class:`~apt_dense.export.traced.TracedBackbone`: AOTInductor compiles it to a ``.pt2`` package,
the ONNX exporter translates it. Its image size is fixed (the canvas), its batch size and token
counts are not, and the thresholds are an input. :class:`ExportSpec` is the metadata both
formats store beside the graph, so that a runner needs nothing but the file.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..layout import PendingLayout
from ..model import APTViT
from .traced import TracedBackbone

__all__ = ["ExportSpec", "NotExportableError", "check_exportable", "export_program", "SPEC_KEY"]

SPEC_KEY = "apt_dense"  # metadata key in both formats
SPEC_VERSION = 1
_PROGRAM_OUTPUTS = ("tokens_per_image", "input_checks")  # beside the model's own
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NotExportableError(ValueError):
    """The model, or one of its options, has no exported form; the message names the alternative."""


@dataclass(frozen=True)
class ExportSpec:
    """What a runner needs to know about an exported backbone.

    Attributes:
        image_size: ``(H, W)`` of the inputs (fixed per export; letterbox to it).
        in_chans: input channels.
        dtype: input and weight dtype name (``"float32"``).
        patch_size: base patch size; maps have ``ceil(H / p) x ceil(W / p)`` cells.
        outputs: the names of the model's outputs (:meth:`~apt_dense.APTViT.head_outputs`), in
            order; the program also returns ``tokens_per_image`` and ``input_checks``.
        thresholds: ``{patch_size: threshold}`` at export, the runners' default; None when the
            planner cannot merge (the dense model), which has no thresholds input.
        pixel_stats: ``pixel_mean``/``pixel_std`` were given (the scale check undoes them).
        device: the device type the program runs on (``"cpu"`` or ``"cuda"``).
        max_batch: the largest batch the program accepts (None: no bound).
        version: the metadata format.
    """

    image_size: tuple[int, int]
    in_chans: int
    dtype: str
    patch_size: int
    outputs: tuple[str, ...]
    thresholds: dict[int, float] | None
    pixel_stats: bool
    device: str = "cpu"
    max_batch: int | None = None
    version: int = SPEC_VERSION

    @property
    def merges(self) -> bool:
        return self.thresholds is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def input_names(self) -> list[str]:
        return ["images", "thresholds"] if self.merges else ["images"]

    @property
    def output_names(self) -> list[str]:
        return [*self.outputs, "tokens_per_image", "input_checks"]

    def to_json(self) -> str:
        fields = asdict(self)
        if self.thresholds is not None:
            fields["thresholds"] = {str(size): value for size, value in self.thresholds.items()}
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the file") -> "ExportSpec":
        try:
            fields = json.loads(text)
            if fields.get("version") != SPEC_VERSION:
                raise ValueError(f"metadata version {fields.get('version')!r}, this apt_dense reads {SPEC_VERSION}")
            if fields["thresholds"] is not None:
                fields["thresholds"] = {int(size): float(value) for size, value in fields["thresholds"].items()}
            fields["image_size"] = tuple(fields["image_size"])
            fields["outputs"] = tuple(fields["outputs"])
            return cls(**fields)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{source} has no readable apt_dense export metadata ({err}); re-export it with "
                             "apt_dense.export or tools/export.py") from err


def check_exportable(model: APTViT) -> None:
    """Raise :class:`NotExportableError` for what has no exported form, naming the alternative."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise NotExportableError(
            "the model is wrapped by torch.compile; export the module itself (model._orig_mod): the "
            "exported program is compiled by AOTInductor, or run by ONNX Runtime"
        )
    if not isinstance(model, APTViT):
        raise NotExportableError(f"apt_dense.export exports APTViT backbones, got {type(model).__name__}")
    if model._compiled_block is not None:
        raise NotExportableError(
            "the blocks are compiled (model.compile_blocks()); export a model built without compile_blocks(): "
            "AOTInductor compiles the whole exported program itself"
        )
    if model.training:
        raise NotExportableError(
            "the model is in training mode; call model.eval() first. Training-mode features (stochastic "
            "depth, activation checkpointing, the APT layers embedded for every batch) have no exported form: "
            "train in eager mode or with model.compile_blocks()"
        )
    if model.attention_backend in ("flash_attn", "torch_varlen"):
        raise NotExportableError(
            f"attention_backend={model.attention_backend!r} has no exported form (a CUDA varlen kernel that "
            "neither ONNX nor a CPU program has); build the model with attention_backend='auto' or 'sdpa' "
            "(the same weights load), which export as padded, masked sdpa"
        )
    dtype = next(model.parameters()).dtype
    if dtype not in _DTYPES.values():
        raise NotExportableError(f"weights in {dtype}; convert the model to float32 (model.float()) before exporting")


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size must be (height, width) in pixels, positive ints, got {image_size!r}")
    return size


def export_program(
    model: APTViT, image_size: Sequence[int], max_batch: int | None = None
) -> tuple[torch.export.ExportedProgram, ExportSpec]:
    """``torch.export`` one program that serves every batch (1 to ``max_batch`` images of
    ``image_size``), every token count and every threshold setting.

    Args:
        model: an :class:`APTViT` in eval mode (see :func:`check_exportable`); weights and
            buffers are constants of the program.
        image_size: ``(H, W)``; any size, padded and cropped back as by ``forward_features``.
        max_batch: the largest batch the program must accept (None: no bound).
    Returns:
        the program (on the model's device) and its :class:`ExportSpec`.
    """
    check_exportable(model)
    h, w = _check_image_size(image_size)
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 2):
        raise ValueError(f"max_batch must be an int of at least 2 (or None), got {max_batch!r}")
    param = next(model.parameters())
    planner = model.planner
    unit = model.size_divisibility
    grid = (math.ceil(h / unit) * unit // model.patch_size, math.ceil(w / unit) * unit // model.patch_size)
    # Static per-grid constants are cached on first use; fill the cache outside tracing, so that
    # it holds real tensors (the program's constants), never the tracer's fake ones.
    PendingLayout.from_levels(torch.zeros(1, *grid, dtype=torch.int64, device=param.device), planner.window_size)
    # A batch of 2: an example batch of 1 would specialise the batch size to 1.
    example = (torch.zeros(2, planner.in_chans, h, w, dtype=param.dtype, device=param.device),)
    batch = torch.export.Dim("batch", min=1) if max_batch is None else torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = {"images": {0: batch}}
    if planner.merges:
        example += (torch.tensor(planner.schedule.thresholds, dtype=torch.float32, device=param.device),)
        dynamic["thresholds"] = None
    with torch.no_grad():
        program = torch.export.export(TracedBackbone(model), example, dynamic_shapes=dynamic, strict=False)
    spec = ExportSpec(
        image_size=(h, w),
        in_chans=planner.in_chans,
        dtype=next(k for k, v in _DTYPES.items() if v == param.dtype),
        patch_size=model.patch_size,
        outputs=tuple(name for name in program.call_spec.out_spec.context if name not in _PROGRAM_OUTPUTS),
        thresholds=planner.schedule.threshold_map() if planner.merges else None,
        pixel_stats=planner.pixel_mean is not None,
        device=param.device.type,
        max_batch=max_batch,
    )
    return program, spec

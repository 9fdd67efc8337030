"""Runners: images in, the eager model's dense maps and tokens kept out, from an exported file.

:class:`AOTIRunner` loads an AOTInductor ``.pt2`` package (torch, no Python model code);
:class:`ONNXRunner` runs an ``.onnx`` file in ONNX Runtime. Both read the :class:`ExportSpec`
stored in the file, check the images against it, pass the thresholds (the export's own unless
given), and turn the program's input checks into the eager model's error (non-finite pixels)
and warning (input scale, once per runner).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model import APTViT
from ..planner import InputScaleWarning
from ..schedule import PatchSchedule
from ..scoring import intensity_scale_problem
from .program import SPEC_KEY, ExportSpec

__all__ = ["ExportedOutput", "AOTIRunner", "ONNXRunner", "load_runner", "eager_output"]


@dataclass
class ExportedOutput:
    """What a runner returns (the exported counterpart of :class:`~apt_dense.APTOutput`).

    Attributes:
        outputs: the model's outputs by name, in order (:meth:`~apt_dense.APTViT.head_outputs`):
            ``features_{i}``, a ``(B, C, ceil(H/p), ceil(W/p))`` map per ``out_indices`` entry
            of an :class:`~apt_dense.APTViT`; ``image_embeddings`` (and SAM-HQ's
            ``interm_embeddings_{i}``) of SAM's encoder.
        tokens_per_image: ``(B,)`` int64 tokens each image kept.
    """

    outputs: dict[str, torch.Tensor]
    tokens_per_image: torch.Tensor

    @property
    def features(self) -> list[torch.Tensor]:
        """The outputs in order (``forward_features(...).features`` of an ``APTViT``)."""
        return list(self.outputs.values())


class _Runner:
    """Input checks, thresholds and output checks shared by both formats."""

    device = torch.device("cpu")

    def __init__(self, spec: ExportSpec, source: str):
        self.spec = spec
        self.source = source
        self._scale_warned = False

    def __call__(self, images: torch.Tensor | np.ndarray, thresholds: Mapping | None = None) -> ExportedOutput:
        """Run ``(B, C, H, W)`` images, normalised as the exported model expects.

        Args:
            images: a torch tensor or numpy array of the export's image size, channels and
                dtype; any batch size (up to ``spec.max_batch``).
            thresholds: ``{patch_size: threshold}`` for this call (one per coarse patch size of
                the export, e.g. ``{32: 0}`` turns merging off); None: the export's own.
        """
        inputs = [self._images(images)]
        if self.spec.merges:
            inputs.append(self._thresholds(thresholds))
        elif thresholds is not None:
            raise ValueError(f"{self.source} cannot merge patches (a dense export): it takes no thresholds")
        *outputs, tokens, checks = self._run(inputs)
        self._check(checks.tolist())
        return ExportedOutput(dict(zip(self.spec.outputs, outputs)), tokens)

    def _run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The program's outputs in ``spec.output_names`` order."""
        raise NotImplementedError

    def _images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        spec = self.spec
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor or numpy array (B, C, H, W), got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        if b == 0:
            raise ValueError("empty batch: images has batch size 0; pass at least one image")
        if spec.max_batch is not None and b > spec.max_batch:
            raise ValueError(f"{self.source} takes at most {spec.max_batch} images per call, got {b}; split the batch")
        if c != spec.in_chans:
            raise ValueError(f"images have {c} channels but {self.source} takes {spec.in_chans}")
        if (h, w) != spec.image_size:
            eh, ew = spec.image_size
            raise ValueError(
                f"images are {h}x{w} but {self.source} was exported for {eh}x{ew}: letterbox them to "
                f"{eh}x{ew} (apt_dense.sample_images.letterbox pads bottom/right), or export for {h}x{w}"
            )
        if images.dtype != spec.torch_dtype:
            raise TypeError(
                f"images are {images.dtype} but {self.source} takes {spec.torch_dtype}; convert them "
                f"(images.to({spec.torch_dtype}))"
            )
        if images.device != self.device:
            raise ValueError(f"images are on {images.device} but {self.source} runs on {self.device}; move them there")
        return images.contiguous()

    def _thresholds(self, thresholds: Mapping | None) -> torch.Tensor:
        spec = self.spec
        chosen = spec.thresholds if thresholds is None else thresholds
        values = PatchSchedule.create(spec.patch_size, chosen).thresholds
        if len(values) != len(spec.thresholds):
            raise ValueError(
                f"{self.source} plans patch sizes {sorted(spec.thresholds)}: give one threshold for each, "
                f"got {dict(thresholds)!r}"
            )
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _check(self, checks: list[int]) -> None:
        non_finite, *extremes = checks
        if non_finite:
            raise ValueError("images contain NaN or Inf pixels; clean or drop those images before the model")
        if self.spec.merges and not self._scale_warned:
            problem = intensity_scale_problem(extremes, undone=self.spec.pixel_stats)
            if problem is not None:
                self._scale_warned = True
                warnings.warn(f"apt_dense: {problem} (warned once per runner)", InputScaleWarning, stacklevel=3)


class AOTIRunner(_Runner):
    """An AOTInductor package (``.pt2`` from :func:`~apt_dense.export.save_aoti`), loaded once.

    Args:
        path: the package.
        device_index: the CUDA device of a CUDA package (-1: the current one).
    """

    def __init__(self, path: str | Path, device_index: int = -1):
        path = _existing(path)
        self._model = torch._inductor.aoti_load_package(str(path), device_index=device_index)
        metadata = self._model.get_metadata()
        if SPEC_KEY not in metadata:
            raise ValueError(f"{path} is an AOTInductor package without apt_dense metadata; export it with "
                             "apt_dense.export.save_aoti or tools/export.py")
        super().__init__(ExportSpec.from_json(metadata[SPEC_KEY], str(path)), path.name)
        self.device = torch.device(self.spec.device)
        if self.device.type == "cuda" and device_index >= 0:
            self.device = torch.device("cuda", device_index)

    def _run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = self._model(*inputs)
        return [outputs[name] for name in self.spec.output_names]


class ONNXRunner(_Runner):
    """An ONNX file (from :func:`~apt_dense.export.save_onnx`) in an ONNX Runtime CPU session.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        profile_prefix: write an ONNX Runtime profile (JSON) with this file prefix; see
            :meth:`end_profiling`.
    """

    def __init__(self, path: str | Path, threads: int | None = None, profile_prefix: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("ONNX Runtime is missing: pip install 'apt-dense[export]'") from err
        path = _existing(path)
        options = ort.SessionOptions()
        # Errors only: its graph optimiser warns about every CastLike it cannot constant-fold.
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self._session.get_modelmeta().custom_metadata_map
        if SPEC_KEY not in metadata:
            raise ValueError(f"{path} is an ONNX model without apt_dense metadata; export it with "
                             "apt_dense.export.save_onnx or tools/export.py")
        super().__init__(ExportSpec.from_json(metadata[SPEC_KEY], str(path)), path.name)

    def _run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {name: tensor.numpy() for name, tensor in zip(self.spec.input_names, inputs)}
        return [torch.from_numpy(array) for array in self._session.run(self.spec.output_names, feed)]

    def end_profiling(self) -> str:
        """Stop profiling; returns the profile's file name."""
        return self._session.end_profiling()


def eager_output(model: APTViT, images: torch.Tensor, thresholds: Mapping | None = None) -> ExportedOutput:
    """What a runner of ``model``'s export returns for ``images``, computed by the eager model
    (with ``thresholds`` for this call instead of the model's): the reference for checks."""
    planner = model.planner
    schedule = planner.schedule
    if thresholds is not None:
        planner.schedule = PatchSchedule.create(model.patch_size, thresholds)
    try:
        with torch.no_grad():
            out = model.forward_features(images)
        return ExportedOutput(model.head_outputs(out.features), out.tokens_per_image)
    finally:
        planner.schedule = schedule


def load_runner(path: str | Path, **kwargs) -> AOTIRunner | ONNXRunner:
    """The runner for ``path`` by its suffix: ``.pt2`` (AOTInductor) or ``.onnx`` (ONNX Runtime)."""
    suffix = Path(path).suffix
    if suffix == ".pt2":
        return AOTIRunner(path, **kwargs)
    if suffix == ".onnx":
        return ONNXRunner(path, **kwargs)
    raise ValueError(f"{path}: unknown export format {suffix!r}; expected a .pt2 (AOTInductor) or .onnx file")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    return path

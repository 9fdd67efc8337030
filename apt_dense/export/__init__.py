"""Exported APT backbones with dynamic token counts: AOTInductor packages and ONNX models.

One export serves every batch size, every image content (token counts, window lengths) and every
threshold setting, at one image size::

    from apt_dense.export import export_program, save_aoti, save_onnx, load_runner

    program, spec = export_program(model.eval(), image_size=(1024, 1024))
    save_aoti(program, spec, "apt.pt2")          # C++ compiled by AOTInductor (minutes)
    save_onnx(program, spec, "apt.onnx")         # checked with onnx.checker
    out = load_runner("apt.onnx")(images)        # out.features, out.tokens_per_image, as eager
    out = load_runner("apt.pt2")(images, thresholds={32: 0})   # merging off, same file

How the data-dependent sizes enter the graph: :mod:`apt_dense.export.traced`. What cannot be
exported raises :class:`NotExportableError` naming the alternative (:func:`check_exportable`).
"""
from .formats import save_aoti, save_onnx
from .program import ExportSpec, NotExportableError, check_exportable, export_program
from .runners import AOTIRunner, ExportedOutput, ONNXRunner, eager_output, load_runner
from .traced import TracedBackbone

__all__ = [
    "export_program", "check_exportable", "NotExportableError", "ExportSpec", "TracedBackbone",
    "save_aoti", "save_onnx", "AOTIRunner", "ONNXRunner", "ExportedOutput", "load_runner", "eager_output",
]

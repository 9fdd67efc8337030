"""Writing an exported program: an AOTInductor package or an ONNX model, each carrying its
:class:`~apt_dense.export.program.ExportSpec`.

Two translations replace torch's ONNX library's: ONNX has no signed bit shifts (its ``BitShift``
takes unsigned types), and the layout shifts int64 cell coordinates by patch levels, so shifts
become multiplications and divisions by powers of two (equal for the non-negative operands APT
shifts); and a tensor times a symbolic size (the batch size in the embedding's table offsets)
needs a ``mul.Scalar`` that takes a graph value, not only a Python number.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .program import SPEC_KEY, ExportSpec

__all__ = ["save_aoti", "save_onnx"]


def save_aoti(
    program: torch.export.ExportedProgram, spec: ExportSpec, path: str | Path, inductor_configs: dict | None = None
) -> Path:
    """Compile ``program`` with AOTInductor into the package ``path`` (``.pt2``); the spec goes
    into the package's metadata. Compiling C++ takes minutes for a full-size backbone.

    Args:
        inductor_configs: extra AOTInductor options (e.g. ``{"max_autotune": True}``).
    """
    path = _suffixed(path, ".pt2")
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), SPEC_KEY: spec.to_json()}
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return path


def save_onnx(program: torch.export.ExportedProgram, spec: ExportSpec, path: str | Path, check: bool = True) -> Path:
    """Translate ``program`` to the ONNX model ``path`` (``.onnx``) with the spec in its
    metadata; ``check`` runs ``onnx.checker`` (full check) on the file."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's translation library)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'apt-dense[export]'") from err
    if spec.device != "cpu":
        raise ValueError(f"the program runs on {spec.device}; export the model on the CPU for ONNX (model.cpu())")
    path = _suffixed(path, ".onnx")
    # optimize=False: onnxscript's optimizer (0.7) rewrites `x + c` to `x` for any |c| < 1e-8 (its
    # constant patterns match within abs_tol=1e-8), which turns the entropy's log2(p + 1e-10)
    # into log2(p): -inf and NaN scores. ONNX Runtime optimises the graph when it loads it.
    with _shape_env_restored(program), torch.no_grad():
        onnx_program = torch.onnx.export(
            program, (), dynamo=True, input_names=spec.input_names, output_names=spec.output_names,
            custom_translation_table=_onnx_translations(), optimize=False, verbose=False,
        )
    onnx_program.model.metadata_props[SPEC_KEY] = spec.to_json()
    onnx_program.save(str(path))
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return path


@contextlib.contextmanager
def _shape_env_restored(program: torch.export.ExportedProgram):
    """The ONNX exporter (torch 2.14) leaves the unbacked symbols of its own retracing pending in
    the program's shape environment, and a later AOTInductor compile of the same program then
    fails (``PendingUnbackedSymbolNotFound``). Drop what it left."""
    shape_env = next(
        (node.meta["val"].fake_mode.shape_env for node in program.graph.nodes
         if isinstance(node.meta.get("val"), torch._subclasses.FakeTensor)), None,
    )
    pending = getattr(shape_env, "pending_fresh_unbacked_symbols", None)
    before = None if pending is None else len(pending)
    try:
        yield
    finally:
        if before is not None:
            del pending[before:]


def _suffixed(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{path}: the file name must end in {suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _onnx_translations() -> dict:
    """Translations for what torch's ONNX library cannot translate here (built on first use:
    onnxscript is optional)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def power_of_two(exponent, like):
        return op.Pow(op.Constant(value=ir.tensor(2, dtype=like.dtype)), op.Cast(exponent, to=like.dtype))

    def right_shift(self, other):
        return op.Div(self, power_of_two(other, self))

    def left_shift(self, other):
        return op.Mul(self, power_of_two(other, self))

    def scalar_right_shift(self, other):
        return op.Div(op.Constant(value=ir.tensor(self, dtype=other.dtype)), power_of_two(other, other))

    def scalar_left_shift(self, other):
        return op.Mul(op.Constant(value=ir.tensor(self, dtype=other.dtype)), power_of_two(other, other))

    def multiply_scalar(self, other):
        if isinstance(other, (int, float)):
            other = op.Constant(value=ir.tensor(other, dtype=self.dtype))
        return op.Mul(self, op.Cast(other, to=self.dtype))

    aten = torch.ops.aten
    return {
        aten.__rshift__.Tensor: right_shift,
        aten.__lshift__.Tensor: left_shift,
        aten.bitwise_right_shift.Tensor: right_shift,
        aten.bitwise_left_shift.Tensor: left_shift,
        aten.bitwise_right_shift.Scalar_Tensor: scalar_right_shift,
        aten.bitwise_left_shift.Scalar_Tensor: scalar_left_shift,
        aten.mul.Scalar: multiply_scalar,
    }

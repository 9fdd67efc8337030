"""Export (issue 18): one exported program per model serves a stream of real photos with different
token counts, two batch sizes and merging on and off, with the eager model's maps and token counts.

Each family (ViTDet: relative positions, padded windows; EVA-02: RoPE, SwiGLU, two coarse levels)
is exported once per module; the program itself (``ExportedProgram.module()``) and its ONNX model
in ONNX Runtime are checked for both, the AOTInductor package (C++ compiled: minutes on 2 cores)
for EVA-02 by default and for ViTDet in a ``slow`` test.
"""
import numpy as np
import pytest
import torch

from apt_dense import APTViT
from apt_dense.export import (
    AOTIRunner, ExportedOutput, NotExportableError, ONNXRunner, check_exportable, eager_output, export_program,
    save_aoti, save_onnx,
)
from apt_dense.planner import InputScaleWarning
from apt_dense.presets import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import letterbox, normalise
from conftest import require

require("export", "onnx", "onnxruntime", "onnxscript")

SIZE = 256
BATCHES = (2, 3)  # the stream alternates these batch sizes
TOL = dict(atol=1e-4, rtol=1e-4)

FAMILIES = {
    # 16 cells in windows of 6: the grid is padded to 18, as ViTDet pads 64 to 70 with window 14.
    "vitdet": dict(block_type="vitdet", use_rel_pos=True, rel_pos_zero_init=False, window_size=6,
                   window_block_indexes=(0,), thresholds={32: 5.0}),
    "eva02": dict(block_type="eva02", mlp_ratio=8 / 3, window_size=8, window_block_indexes=(0,),
                  thresholds={32: 5.0, 64: 5.5}),
}


def build(family: str, **overrides) -> APTViT:
    args = dict(img_size=SIZE, embed_dim=64, depth=2, num_heads=4, out_indices=(0, 1),
                pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD, **FAMILIES[family])
    args.update(overrides)
    torch.manual_seed(0)
    model = APTViT(**args).eval()
    with torch.no_grad():  # every layer contributes, the zero-initialised APT layers included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def stream(photos):
    """Normalised letterboxed canvases of the photos and of crops of them, in batches of 2 and 3."""
    crops = [p[: p.shape[0] * 3 // 5, : p.shape[1] * 3 // 5] for p in photos]
    raw = torch.stack([letterbox(np.ascontiguousarray(p), SIZE, IMAGENET_PIXEL_MEAN)[0] for p in photos + crops])
    images = normalise(raw, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)
    batches, start, i = [], 0, 0
    while start < len(images):
        size = BATCHES[i % 2]
        batches.append(images[start : start + size])
        start, i = start + size, i + 1
    return batches


def merging_off(model: APTViT) -> dict:
    return {size: 0.0 for size in model.planner.schedule.threshold_map()}


def check_stream(model, run, batches, settings) -> list[list[int]]:
    """``run(images, thresholds)`` against eager on every batch and setting; the tokens kept."""
    kept = []
    for thresholds in settings:
        for images in batches:
            want = eager_output(model, images, thresholds)
            got = run(images, thresholds)
            assert got.tokens_per_image.tolist() == want.tokens_per_image.tolist()
            assert len(got.features) == len(want.features)
            for g, w in zip(got.features, want.features):
                torch.testing.assert_close(g, w, **TOL)
            kept.append(want.tokens_per_image.tolist())
    return kept


def program_runner(program, spec):
    """The exported program run by torch (what both formats are made from), as a runner."""
    module = program.module()

    def run(images, thresholds=None):
        thresholds = spec.thresholds if thresholds is None else thresholds
        args = (images, torch.tensor(list(thresholds.values()), dtype=torch.float32)) if spec.merges else (images,)
        with torch.no_grad():
            outputs = module(*args)
        return ExportedOutput({name: outputs[name] for name in spec.outputs}, outputs["tokens_per_image"])

    return run


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    model = build(request.param)
    program, spec = export_program(model, (SIZE, SIZE))
    return request.param, model, program, spec, tmp_path_factory.mktemp(request.param)


def test_one_program_serves_the_stream(exported, stream):
    family, model, program, spec, _ = exported
    kept = check_stream(model, program_runner(program, spec), stream, [None, merging_off(model)])
    merged = kept[: len(stream)]
    assert len({n for batch in merged for n in batch}) > 3, "the stream should hold many token counts"
    assert min(n for batch in merged for n in batch) < (SIZE // 16) ** 2
    assert all(n == (SIZE // 16) ** 2 for batch in kept[len(stream):] for n in batch)


def test_onnx_model_checks_and_matches_eager(exported, stream):
    import onnx

    family, model, program, spec, folder = exported
    path = save_onnx(program, spec, folder / f"{family}.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    runner = ONNXRunner(path, threads=2)
    assert runner.spec == spec
    check_stream(model, runner, stream, [None, merging_off(model)])


@pytest.mark.parametrize("exported", ["eva02", pytest.param("vitdet", marks=pytest.mark.slow)], indirect=True)
def test_aoti_package_matches_eager(exported, stream):
    family, model, program, spec, folder = exported
    runner = AOTIRunner(save_aoti(program, spec, folder / f"{family}.pt2"))
    check_stream(model, runner, stream, [None, merging_off(model)])


def test_dense_model_exports_through_the_same_path(stream, tmp_path):
    model = build("vitdet", adaptive=False)
    program, spec = export_program(model, (SIZE, SIZE))
    # Nothing is data-dependent: no size is read back inside the graph.
    assert not any(node.target == torch.ops.aten._local_scalar_dense.default for node in program.graph.nodes)
    assert spec.thresholds is None and spec.input_names == ["images"]
    check_stream(model, program_runner(program, spec), stream, [None])
    runner = ONNXRunner(save_onnx(program, spec, tmp_path / "dense.onnx"), threads=2)
    check_stream(model, runner, stream[:2], [None])
    with pytest.raises(ValueError, match="takes no thresholds"):
        runner(stream[0], {32: 2.0})


def test_non_square_images_are_padded_and_cropped_as_eager(photos):
    model = build("eva02", out_indices=(1,))
    size = (200, 136)  # not multiples of the largest patch (64 px): padded, maps cropped back
    program, spec = export_program(model, size)
    raw = torch.stack([letterbox(p, 256, IMAGENET_PIXEL_MEAN)[0][:, :200, :136] for p in photos[:2]])
    images = normalise(raw, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)
    with torch.no_grad():
        want = model.forward_features(images)
    got = program_runner(program, spec)(images)
    assert got.features[0].shape == (2, 64, 13, 9)
    torch.testing.assert_close(got.features[0], want.features[0], **TOL)


def test_prefix_tokens_export(photos):
    """DINOv2's family: cls and register tokens, position embeddings resized to the image's cells
    (14 px patches on a canvas that is not square)."""
    from test_dinov2_core import dinov2

    model = dinov2(img_size=224, pretrain_img_size=112)
    program, spec = export_program(model, (224, 168))
    images = torch.stack([letterbox(p, 224, (0, 0, 0))[0][:, :, :168] for p in photos[:3]])
    kept = check_stream(model, program_runner(program, spec), [images[:2], images], [None, merging_off(model)])
    assert min(kept[1]) < 16 * 12 and kept[-1] == [16 * 12] * 3


@pytest.mark.parametrize("change, message", [
    (lambda m: m.train(), "model.eval()"),
    (lambda m: m.compile_blocks(), "compile_blocks"),
    (lambda m: setattr(m, "attention_backend", "flash_attn"), "attention_backend='auto' or 'sdpa'"),
    (lambda m: setattr(m, "attention_backend", "torch_varlen"), "attention_backend='auto' or 'sdpa'"),
    (lambda m: torch.compile(m), "model._orig_mod"),
])
def test_what_cannot_export_says_what_to_do(change, message):
    model = build("eva02")
    changed = change(model)
    with pytest.raises(NotExportableError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_exportable(changed if isinstance(changed, torch.nn.Module) else model)


def test_runner_checks_inputs(exported, stream):
    family, model, program, spec, folder = exported
    if family != "eva02":
        pytest.skip("one family is enough")
    path = folder / "eva02.onnx"
    runner = ONNXRunner(path if path.exists() else save_onnx(program, spec, path), threads=2)
    images = stream[0]
    with pytest.raises(ValueError, match="letterbox them to 256x256"):
        runner(images[..., :128, :128])
    with pytest.raises(TypeError, match="torch.float32"):
        runner(images.double())
    with pytest.raises(ValueError, match="channels"):
        runner(images[:, :1])
    with pytest.raises(ValueError, match="one threshold for each"):
        runner(images, {32: 2.0})
    with pytest.raises(ValueError, match="NaN or Inf"):
        runner(images.clone().index_fill_(2, torch.tensor([5]), float("nan")))
    out = runner(images.numpy(), {"32": 0, "64": 0})  # numpy in, config-style keys
    assert out.tokens_per_image.tolist() == [(SIZE // 16) ** 2] * len(images)
    with pytest.warns(InputScaleWarning, match="raw 0..255"):
        runner(images * 58.0 + 120.0)  # raw pixels fed to a model that undoes normalisation


def test_sam_hq_image_encoder_exports_with_its_neck(stream, tmp_path):
    """SAM's encoder (an APTViT subclass with a neck) plugs in through ``head_outputs``: the
    exported program returns what its forward returns (SAM-HQ: also the interm embeddings)."""
    require("sam", "segment_anything")
    from apt_dense.sam import APTImageEncoderViTHQ

    torch.manual_seed(0)
    encoder = APTImageEncoderViTHQ(SIZE, 16, 3, 64, 3, 4, 4.0, 32, use_rel_pos=True, rel_pos_zero_init=False,
                                   window_size=8, global_attn_indexes=(1,), thresholds={32: 4.0}).eval()
    program, spec = export_program(encoder, (SIZE, SIZE))
    assert spec.outputs == ("image_embeddings", "interm_embeddings_1")
    runner = ONNXRunner(save_onnx(program, spec, tmp_path / "sam_hq_encoder.onnx"), threads=2)
    for images in stream[:2]:
        with torch.no_grad():
            embeddings, interm = encoder(images)
        out = runner(images)
        assert out.tokens_per_image.tolist() == list(encoder.last_layout.tokens_per_image_host)
        torch.testing.assert_close(out.outputs["image_embeddings"], embeddings, **TOL)
        torch.testing.assert_close(out.outputs["interm_embeddings_1"], interm[0], **TOL)
    assert min(encoder.last_layout.tokens_per_image_host) < (SIZE // 16) ** 2


# --- tools/export.py: output paths checked before the work, no partial file ----------------------


def export_tool():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    return importlib.import_module("export")


@pytest.mark.parametrize("argv, message", [
    (["--output-dir", "{file}"], "--output-dir: {file} is a file, not a folder"),
    (["--exports", "{file}/x", "--benchmark"], "--exports: {file} is a file, not a folder"),
    (["--name", "a/b"], "--name 'a/b': a file name stem without folders"),
])
def test_export_tool_checks_its_outputs_before_exporting(argv, message, tmp_path, capsys):
    tool = export_tool()
    file = tmp_path / "a_file"
    file.write_text("x")
    argv = [a.format(file=file) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args(["--size", "128", "--depth", "1", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert message.format(file=file) in err.strip().splitlines()[-1]


def test_export_tool_full_disk_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno
    import os

    tool = export_tool()

    def half_written(program, spec, path):
        path.write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setitem(tool.FORMATS, "onnx", (".onnx", half_written))
    monkeypatch.setattr(tool, "export_program", lambda *a, **k: (None, None))
    argv = ["--size", "128", "--depth", "1", "--formats", "onnx", "--output-dir", str(tmp_path)]
    assert tool.main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

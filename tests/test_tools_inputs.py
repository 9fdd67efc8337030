"""Bad or unusual tool input: image files, command-line values, Ctrl-C; and the patch-map sheet."""
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apt_dense.benchmarking import build_planner
from apt_dense.presets import IMAGENET_PIXEL_MEAN
from apt_dense.sample_images import iter_image_folder, letterbox, load_image_folder, read_image
from apt_dense.visualize import COARSE_COLORS, FONT_SIZE, LINE_HEIGHT, TILE_GAP, patch_map, patch_map_sheet

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import benchmark  # noqa: E402
import calibrate_thresholds  # noqa: E402
import demo  # noqa: E402
import fidelity_probe  # noqa: E402
import make_tiny_ade20k  # noqa: E402
import make_tiny_coco  # noqa: E402
import visualize_patches  # noqa: E402


def warnings_per_file(caplog) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in caplog.records:
        if record.levelno == logging.WARNING:
            name = record.getMessage().split(":")[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, caplog):
    ramp16 = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp16).save(tmp_path / "gray16.png")  # mode I;16
    unit = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(unit).save(tmp_path / "unit.tif")  # mode F, 0..1
    Image.fromarray(unit * 200).save(tmp_path / "bytes.tif")  # mode F, 0..255
    Image.fromarray(unit * 1000 - 5).save(tmp_path / "depth.tif")  # mode F, neither
    Image.fromarray(np.full((64, 64), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with caplog.at_level(logging.WARNING):
        images = load_image_folder(tmp_path)
    assert sorted(images) == ["bytes.tif", "gray16.png", "unit.tif"]
    expected16 = np.round(ramp16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(images["gray16.png"][..., 0], expected16)
    np.testing.assert_array_equal(images["unit.tif"][..., 1], np.round(unit * 255).astype(np.uint8))
    np.testing.assert_array_equal(images["bytes.tif"][..., 2], np.round(unit * 200).astype(np.uint8))
    assert images["gray16.png"].max() == 255 and images["gray16.png"].min() == 0
    assert warnings_per_file(caplog) == {"gray16.png": 1, "unit.tif": 1, "bytes.tif": 1, "depth.tif": 1, "nan.tif": 1}
    assert "16-bit image scaled" in caplog.text and "0..1 scaled by 255" in caplog.text
    assert "depth.tif: skipped, float pixel values span [-5, 995]" in caplog.text


def test_decompression_bombs_are_skipped_with_one_line(tmp_path, photos, monkeypatch, caplog):
    Image.fromarray(photos[0][:40, :40]).save(tmp_path / "a_ok.png")  # 1600 px
    Image.fromarray(photos[1][:60, :60]).save(tmp_path / "b_warned.png")  # 3600 px: PIL warns, would decode
    Image.fromarray(photos[2][:80, :80]).save(tmp_path / "c_error.png")  # 6400 px: PIL raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own DecompressionBombWarning must not escape
        with caplog.at_level(logging.WARNING):
            images = load_image_folder(tmp_path)
    assert list(images) == ["a_ok.png"]
    assert warnings_per_file(caplog) == {"b_warned.png": 1, "c_error.png": 1}
    assert all("\n" not in r.getMessage() and "MAX_IMAGE_PIXELS" in r.getMessage() for r in caplog.records)


def test_converted_and_skipped_files_warn_once_each(tmp_path, photos, caplog):
    Image.fromarray(photos[0][..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([photos[1], np.full(photos[1].shape[:2], 9, np.uint8)])).save(tmp_path / "rgba.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        names = [name for name, _ in iter_image_folder(tmp_path)]
    assert names == ["gray.png", "rgba.png"]
    assert warnings_per_file(caplog) == {"broken.jpg": 1, "gray.png": 1, "rgba.png": 1}
    assert read_image(tmp_path / "broken.jpg") is None


def test_letterbox_takes_read_only_arrays_without_torch_warnings(tmp_path, photos):
    Image.fromarray(photos[0]).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as image:
        pixels = np.asarray(image)  # read-only, as PIL hands it out
    assert not pixels.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        canvas, _ = letterbox(pixels, 256, IMAGENET_PIXEL_MEAN)
    assert canvas.shape == (3, 256, 256)
    with pytest.raises(ValueError, match="convert grayscale or RGBA"):
        letterbox(pixels[..., 0], 256)


def argument_error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: must be a positive integer, got 0"),
    (["--batch", "-1"], "--batch: must be a positive integer, got -1"),
    (["--size", "0"], "--size: must be a positive integer"),
    (["--size", "100"], "size 100 px is not a multiple of the largest patch (32 px)"),
    (["--size", "1000", "--setting", "detection"], "use 896 or 1024"),
    (["--images", "0"], "--images: 0 is not a folder"),
    (["--limit", "0"], "--limit: must be a positive integer"),
    (["--warmup", "-1"], "--warmup: must be 0 or a positive integer"),
    (["--scales", "1", "-0.5"], "--scales: must be a number >= 0"),
    (["--thresholds", "{not json"], "is not JSON"),
    (["--thresholds", '{"32": "high"}'], "is not a patch size in px with a numeric threshold"),
    (["--thresholds", '{"32": 2}', "--thresholds", '{"48": 2}'], "configuration {48: 2.0}: thresholds must give"),
    (["--host", "vitdet_b", "--size", "1024", "--setting", "detection"], "window_size 14 cells"),
    (["--attention-backend", "fast"], "invalid choice: 'fast'"),
    (["--framework", "mmdet"], "--framework chooses the detector for --level full with a detection host"),
    (["--framework", "mmdet", "--level", "full"], "drop it or add --level full"),
    (["--host", "vitdet_b", "--framework", "mmseg"], "invalid choice: 'mmseg'"),
])
def test_benchmark_argument_errors_are_one_line(argv, message, capsys):
    assert message in argument_error(benchmark.parse_args, argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--device", "meta"], "--device: 'meta': the tools run and measure on cpu or cuda only"),
    (["--device", "mps"], "--device: 'mps': the tools run and measure on cpu or cuda only"),
    (["--device", "gpu"], "'gpu' is not a device; use cpu, cuda or cuda:N"),
    (["--attention-backend", "flash_attn", "--device", "cpu"], "--attention-backend flash_attn on cpu in fp32"),
    (["--attention-backend", "torch_varlen", "--device", "cpu", "--dtype", "bf16"], "usable here: ['sdpa']"),
    (["--window", "3"], "--window 3: eva02_b_seg has no windowed blocks (global attention only)"),
    (["--host", "eva02_b_det", "--depth", "1", "--size", "1024", "--setting", "detection", "--window", "8"], None),
    (["--host", "vitdet_b", "--window", "3", "--thresholds", '{"32": 2}'], "window_size 3 cells (48 px) is not a multiple"),
    (["--host", "dinov2_b", "--level", "full"], "--level full has models for"),
    (["--host", "sam_vit_b", "--size", "512"], "--size 512: SAM's image encoder takes 1024 px canvases"),
    (["--host", "sam_vit_b", "--window", "7"], "--window: sam_vit_b's windows are the host model's own"),
    (["--host", "sam_vit_b", "--thresholds", '{"32": 2, "64": 2}'], "window_size 14 cells (224 px) is not a multiple"),
    (["--host", "sam_vit_b", "--level", "full", "--batch", "2"], "one image per SamPredictor.set_image"),
    (["--host", "depth_anything_v2_b", "--batch", "2"], "takes images at their own sizes"),
    (["--host", "depth_anything_v2_b", "--depth", "2"], "use --depth 4 or more"),
    (["--compile-backend", "eager"], "--compile-backend eager chooses torch.compile's backend: add --compile"),
    (["--compile", "--compile-backend", "nonsense"], "--compile-backend nonsense: not a torch.compile backend here"),
])
def test_benchmark_device_backend_and_window_errors(argv, message, capsys):
    if message is None:  # a windowed host keeps its window in its first block
        assert benchmark.parse_args(argv).window == 8
        return
    assert message in argument_error(benchmark.parse_args, argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_benchmark_and_demo_refuse_cuda_without_a_gpu(capsys):
    for tool in (benchmark, demo):
        assert "cuda, but this torch sees no CUDA device; use cpu" in argument_error(tool.parse_args, ["--device", "cuda"], capsys)


def test_benchmark_checks_every_configuration_before_measuring(tmp_path, monkeypatch, capsys):
    def no_timing(*args, **kwargs):
        raise AssertionError("measured before checking every configuration")

    monkeypatch.setattr(benchmark, "times_side_by_side", no_timing)
    argv = ["--size", "256", "--depth", "1", "--thresholds", '{"32": 2}', "--thresholds", '{"32": 1, "64": 1, "96": 1}',
            "--output-dir", str(tmp_path)]
    assert "configuration" in argument_error(benchmark.main, argv, capsys)
    assert not list(tmp_path.iterdir())


def test_benchmark_help_says_where_results_go(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--help"])
    assert "OUTPUT_DIR/TAG.json, .md and .png" in capsys.readouterr().out


@pytest.mark.parametrize("tool, argv, message", [
    (demo, ["--size", "1000"], "size 1000 px is not a multiple of the largest patch (128 px)"),
    (demo, ["--budget", "-1"], "--budget: must be a number >= 0"),
    (visualize_patches, ["--tile", "0"], "--tile: must be an integer from 1 to 2048 (px), got 0"),
    (visualize_patches, ["--thresholds", '{"64": 1}'], "one value for each patch size"),
    (calibrate_thresholds, ["--target", "0.01"], "--target 0.01 is below what patch sizes"),
    (calibrate_thresholds, ["--curve", "--limit", "0"], "--limit: must be a positive integer"),
    (calibrate_thresholds, ["--target", "0.6", "--output", "x.png", "--curve", "x.png"],
     "--output: x.png suffix '.png' is not supported; end it in one of .json"),
    (demo, ["--depth", "99"], "--depth 99: eva02_b_det has 12 blocks, and --depth runs the first of them: give 1 to 12"),
    (benchmark, ["--host", "sam_vit_h", "--depth", "33"], "--depth 33: sam_vit_h has 32 blocks"),
    (fidelity_probe, ["--depth", "13"], "--depth 13: eva02_b_det has 12 blocks"),
])
def test_tool_argument_errors_are_one_line(tool, argv, message, capsys):
    assert message in argument_error(tool.parse_args, argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--size", "0"], "--size: must be a positive integer, got 0"),
    (["--size", "100"], "size 100 px is not a multiple of the largest patch (128 px)"),
    (["--size", "1000"], "use 896 or 1024"),
    (["--thresholds", "{bad"], "is not JSON"),
    (["--thresholds", '{"48": 2}'], "got sizes (48,)"),
    (["--thresholds", '{"32": "x"}'], "is not a patch size in px with a numeric threshold"),
    (["--host", "vitdet_b", "--size", "1024"], "window_size 14 cells"),
    (["--limit", "0"], "--limit: must be a positive integer, got 0"),
    (["--depth", "0"], "--depth: must be a positive integer, got 0"),
    (["--images", "/nonexistent"], "--images: /nonexistent is not a folder"),
    (["--checkpoint", "/nonexistent.pth"], "--checkpoint: /nonexistent.pth does not exist"),
    (["--host", "resnet50"], "invalid choice: 'resnet50'"),
])
def test_fidelity_probe_argument_errors(argv, message, capsys):
    assert message in argument_error(fidelity_probe.parse_args, argv, capsys)


@pytest.mark.parametrize("tool", [make_tiny_ade20k, make_tiny_coco])
@pytest.mark.parametrize("size", ["0", "-5", "600", "1000", "2.5"])
def test_make_tiny_sizes_are_checked(tool, size, tmp_path, capsys):
    line = argument_error(tool.main, [str(tmp_path / "data"), "--size", size], capsys)
    assert "--size" in line and ("from 32 to 300 (px, crops of the sample photos)" in line or "not an integer" in line)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("tool, option", [(make_tiny_ade20k, "--train"), (make_tiny_ade20k, "--val"),
                                          (make_tiny_coco, "--images")])
@pytest.mark.parametrize("count", ["0", "-1", "100000"])
def test_make_tiny_counts_are_checked(tool, option, count, tmp_path, capsys):
    line = argument_error(tool.main, [str(tmp_path), option, count], capsys)
    assert f"{option}: must be an integer from 1 to 10000" in line


@pytest.mark.parametrize("argv, message", [
    (["--base", '{"32": -1}', "--target", "0.6"], "--base: the threshold -1 for 32 px is negative"),
    (["--base", '{"32": 0}', "--target", "0.6"], "--base: every threshold is 0, which merges nothing at any scale"),
    (["--base", '{"32": 0, "64": 0}', "--curve"], "every threshold is 0"),
])
def test_calibrate_base_thresholds_must_be_scalable(argv, message, capsys):
    assert message in argument_error(calibrate_thresholds.parse_args, argv, capsys)


def test_calibrate_target_one_keeps_every_token(tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert calibrate_thresholds.main(["--size", "128", "--target", "1.0", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scale"] == 0 and result["kept"] == 1.0  # not the 76.6% of a tiny positive scale
    assert "(merging off)" in capsys.readouterr().out


def test_calibrate_unreachable_target_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(calibrate_thresholds, "kept_fraction", lambda scores, thresholds, patch_size: 0.9)
    out = tmp_path / "cal.json"
    assert calibrate_thresholds.main(["--size", "128", "--target", "0.5", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no scale reaches the target 50.0%" in err and "still keep 90.0%" in err
    assert not out.exists()


def test_visualize_bounds_the_sheet(capsys):
    assert "--tile: must be an integer from 1 to 2048 (px), got 100000" in argument_error(
        visualize_patches.parse_args, ["--tile", "100000"], capsys)
    # Five sample photos at 2048 px fit; a huge folder at that width would not.
    assert visualize_patches.parse_args(["--tile", "2048"]).count == 5


def test_visualize_refuses_a_sheet_too_large(tmp_path, photos, capsys):
    for i in range(40):
        Image.fromarray(photos[0][:32, :32]).save(tmp_path / f"{i:02d}.png")
    line = argument_error(visualize_patches.parse_args, ["--images", str(tmp_path), "--tile", "2048"], capsys)
    assert "40 maps of 2048 px make a sheet over 134 megapixels; use --limit 32 or a smaller --tile" in line


@pytest.mark.parametrize("tool", [visualize_patches, calibrate_thresholds, benchmark, fidelity_probe])
def test_empty_and_unlistable_folders_are_usage_errors(tool, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("no images here")
    extra = ["--target", "0.8"] if tool is calibrate_thresholds else []
    assert f"--images: {tmp_path} holds no image files (.jpg" in argument_error(
        tool.parse_args, ["--images", str(tmp_path), *extra], capsys)

    def unlistable(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", unlistable)
    assert f"--images: cannot list {tmp_path} (Permission denied); check its permissions" in argument_error(
        tool.parse_args, ["--images", str(tmp_path), *extra], capsys)


@pytest.mark.parametrize("tool, argv", [
    (visualize_patches, ["--size", "128"]),
    (calibrate_thresholds, ["--size", "128", "--target", "0.8"]),
    (fidelity_probe, ["--size", "128", "--depth", "1"]),
])
def test_folder_of_unreadable_images_is_one_line(tool, argv, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    assert tool.main(argv + ["--images", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"error: no readable images" in err and "Traceback" not in err


def test_fidelity_probe_depth_and_limit_are_what_they_say(tmp_path, capsys):
    out = tmp_path / "fid.json"
    assert fidelity_probe.main(["--size", "128", "--depth", "1", "--limit", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 1 and len(result["cosine"]) == 1
    assert "probed 1/1 images" in capsys.readouterr().out


def test_broken_and_looping_links_are_skipped_with_a_warning(tmp_path, photos, caplog):
    Image.fromarray(photos[0][:64, :64]).save(tmp_path / "a.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "folder.png").symlink_to(tmp_path)
    with caplog.at_level(logging.WARNING):
        names = [name for name, _ in iter_image_folder(tmp_path)]
    assert names == ["a.png"]
    assert warnings_per_file(caplog) == {"dangling.png": 1, "folder.png": 1, "loop.jpg": 1}
    assert f"dangling.png: skipped, a broken symbolic link (its target {tmp_path / 'gone.png'} does not exist)" in caplog.text
    assert "loop.jpg: skipped, a symbolic link loop" in caplog.text
    assert "folder.png: skipped, a symbolic link to" in caplog.text and "which is not a file" in caplog.text


def test_folder_without_readable_images_is_an_error_before_measuring(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit, match="no readable images"):
        benchmark.main(["--images", str(tmp_path), "--size", "256", "--depth", "1", "--output-dir", str(tmp_path)])


def small_maps(photos, size=256, tile=160):
    planner = build_planner({32: 2.0, 64: 2.0, 128: 0.3}, img_size=size)
    raw = torch.stack([letterbox(p, size, IMAGENET_PIXEL_MEAN)[0] for p in photos[:3]])
    layout = planner(raw)
    return raw, layout, [patch_map(raw[i], layout, i, planner.schedule.patch_sizes, f"photo {i}", tile) for i in range(3)]


def test_patch_map_colours_coarse_patches_and_keeps_the_photo(photos):
    raw, layout, maps = small_maps(photos)
    picture = np.asarray(maps[1].picture).astype(int)
    assert picture.shape == (160, 160, 3)
    assert maps[1].counts == dict(zip((16, 32, 64, 128), np.bincount(
        layout.token_level[layout.token_image == 1].numpy(), minlength=4).tolist()))
    assert maps[1].tokens == layout.tokens_per_image_host[1] and maps[1].dense_tokens == 256
    # Coffee is 600x400: the canvas's bottom rows are padding, merged into coarse patches, drawn
    # in a shade of their size's colour.
    level = int(layout.cell_level[1, 15, 4])
    chroma = picture[150, 40] - picture[150, 40].min()
    similarity = [chroma @ (c - np.min(c)) / np.linalg.norm(c - np.min(c)) for c in np.array(COARSE_COLORS[:3])]
    assert level > 0 and int(np.argmax(similarity)) == level - 1 and chroma.max() > 60
    # Base patches show the photo itself (resized), without grid lines.
    fine = layout.cell_level[1].repeat_interleave(10, 0).repeat_interleave(10, 1).numpy() == 0
    pixels = raw[1].permute(1, 2, 0).round().byte().numpy()
    photo = np.asarray(Image.fromarray(pixels).resize((160, 160), Image.LANCZOS)).astype(int)
    assert fine.mean() > 0.5 and (np.abs(picture - photo)[fine] <= 1).all()


def test_patch_map_sheet_size_and_legend(photos):
    _, _, maps = small_maps(photos)
    sheet = patch_map_sheet(maps, columns=3)
    cell_h = 2 * LINE_HEIGHT + 2 + 160 + TILE_GAP
    legend_top = TILE_GAP + cell_h
    assert sheet.size == (TILE_GAP + 3 * (160 + TILE_GAP), legend_top + 2 * LINE_HEIGHT + TILE_GAP)  # legend wraps once
    legend = np.asarray(sheet)[legend_top:]
    found = {tuple(px) for px in np.unique(legend.reshape(-1, 3), axis=0).tolist()}
    assert set(COARSE_COLORS[:3]) <= found and COARSE_COLORS[3] not in found
    # Every map is pasted whole below its caption.
    for i, m in enumerate(maps):
        x, y = TILE_GAP + i * (160 + TILE_GAP), TILE_GAP + 2 * LINE_HEIGHT + 2
        np.testing.assert_array_equal(np.asarray(sheet)[y : y + 160, x : x + 160], np.asarray(m.picture))
    titled = patch_map_sheet(maps, columns=1, title="a long title " * 6, notes=["a note"])
    assert titled.size[0] == TILE_GAP + 160 + TILE_GAP and titled.size[1] > 3 * cell_h + 3 * LINE_HEIGHT
    assert FONT_SIZE < LINE_HEIGHT
    with pytest.raises(ValueError, match="same size"):
        raw, layout, _ = small_maps(photos)
        patch_map_sheet([maps[0], patch_map(raw[0], layout, 0, (16, 32, 64, 128), size=100)], columns=2)


def without_detectron2(tool: str, *argv: str) -> subprocess.CompletedProcess:
    """``python tools/TOOL ARGV`` in a process where ``import detectron2`` fails."""
    script = ("import runpy, sys; sys.modules['detectron2'] = None; "
              f"sys.argv = {[tool, *argv]!r}; runpy.run_path({str(TOOLS / tool)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two fresh processes
@pytest.mark.parametrize("tool, argv", [
    ("train_net.py", ["--config-file", "projects/apt_tiny_e2e.py"]),
    ("eval_coco.py", ["--config-file", "projects/apt_tiny_e2e.py", "--images", "projects", "--annotations", "setup.py"]),
])
def test_detectron2_tools_help_without_detectron2_and_say_how_to_install_it(tool, argv):
    help_run = without_detectron2(tool, "--help")
    assert help_run.returncode == 0 and "--config-file" in help_run.stdout and "detectron2" in help_run.stdout
    run = without_detectron2(tool, *[str(ROOT / a) if a.startswith(("projects", "setup")) else a for a in argv])
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and "needs detectron2, which is not on PyPI" in run.stderr
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in run.stderr

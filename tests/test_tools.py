"""The command-line tools: argument handling and outputs on tiny models (no timing assertions)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apt_dense.visualize import COARSE_COLORS, LINE_HEIGHT, TILE_GAP

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import benchmark  # noqa: E402
import calibrate_thresholds  # noqa: E402
import demo  # noqa: E402
import fidelity_probe  # noqa: E402
import visualize_patches  # noqa: E402


@pytest.fixture
def messy_folder(tmp_path, photos):
    """Two RGB photos, a grayscale one, an RGBA one, an unreadable file and a non-image."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(photos[0]).save(folder / "a.jpg")
    Image.fromarray(photos[1]).save(folder / "b.png")
    Image.fromarray(photos[2][..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([photos[3], np.full(photos[3].shape[:2], 255, np.uint8)])).save(folder / "rgba.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    return folder


def interrupted_on_third(monkeypatch, tool) -> None:
    """Ctrl-C while ``tool`` reads the third image."""
    real, calls = tool.host_image, []

    def host_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tool, "host_image", host_image)


def legend_colors(png: Path, rows: int) -> set[tuple[int, int, int]]:
    """The coarse patch colours drawn as swatches in the bottom ``rows`` of a sheet."""
    bottom = np.asarray(Image.open(png).convert("RGB"))[-rows:].reshape(-1, 3)
    present = {tuple(int(v) for v in px) for px in np.unique(bottom, axis=0)}
    return present & set(COARSE_COLORS)


def sheet_width(columns: int, tile: int = 320) -> int:
    return TILE_GAP + columns * (tile + TILE_GAP)


@pytest.mark.slow
def test_demo_writes_patch_map_first_and_times_every_photo(tmp_path, capsys):
    out = tmp_path / "map.png"
    assert demo.main(["--size", "256", "--depth", "2", "--budget", "0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    # The table and the picture come before any model is built or timed.
    assert printed.index("patch map written") < printed.index("building both models")
    assert "on all 5 photos" in printed and "speedup" in printed
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        assert printed.count(name) == 2  # token table and timing table
    width, height = Image.open(out).size
    assert width == sheet_width(3) and height > 2 * 320
    # Legend (up to two rows) at the bottom: a swatch for 32, 64 and 128 px patches.
    assert legend_colors(out, 2 * LINE_HEIGHT + TILE_GAP) == set(COARSE_COLORS[:3])


@pytest.mark.slow
def test_demo_budget_times_fewer_photos_and_says_so(tmp_path, capsys):
    args = ["--size", "256", "--depth", "1", "--budget", "0.001", "--output", str(tmp_path / "map.png")]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "timed 1 of 5 photos to stay within" in printed and "--budget 0 times all 5" in printed
    assert "on this photo:" in printed


def test_demo_timing_order_keeps_prefixes_representative():
    kept = [0.92, 0.69, 0.69, 0.68, 0.88]
    order = demo.timing_order(kept)
    assert sorted(order) == list(range(5))
    mean = sum(kept) / 5
    assert order[0] == min(range(5), key=lambda i: abs(kept[i] - mean))
    # Two photos timed keep about the mean, unlike the first two in file order.
    assert abs(sum(kept[i] for i in order[:2]) / 2 - mean) < 0.5 * abs(sum(kept[:2]) / 2 - mean)


def test_demo_rejects_unknown_host():
    with pytest.raises(SystemExit):
        demo.parse_args(["--host", "resnet50"])


@pytest.mark.slow
def test_benchmark_sweep_writes_json_table_and_plot(tmp_path):
    args = ["--host", "eva02_b_seg", "--size", "256", "--depth", "2", "--repeats", "1", "--warmup", "0",
            "--scales", "0", "1", "--output-dir", str(tmp_path), "--tag", "run"]
    assert benchmark.main(args) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["environment"]["torch"] and len(record["rows"]) == 2
    off, on = record["rows"]
    assert off["kept_mean"] == 1.0 and off["ideal_speedup"] == pytest.approx(1.0)
    assert on["kept_mean"] < 1.0 and on["ideal_speedup"] > 1.0
    for row in record["rows"]:
        assert row["speedup"] > 0 and 0 <= row["layout_fraction"] and row["attention"] == {"global": "sdpa"}
    assert "| thresholds |" in (tmp_path / "run.md").read_text()
    assert Image.open(tmp_path / "run.png").size == (720, 528)  # 6 x 4.4 in at 120 dpi


@pytest.mark.slow
def test_benchmark_explicit_thresholds_windows_and_folder(tmp_path, messy_folder, caplog):
    args = ["--host", "vitdet_b", "--size", "256", "--window", "6", "--depth", "2", "--repeats", "1", "--warmup", "0",
            "--thresholds", '{"32": 4.0}', "--images", str(messy_folder), "--batch", "2", "--output-dir", str(tmp_path),
            "--tag", "win"]
    assert benchmark.main(args) == 0
    assert "broken.jpg" in caplog.text and "gray.png" in caplog.text and "rgba.png" in caplog.text
    rows = json.loads((tmp_path / "win.json").read_text())["rows"]
    assert rows[0]["thresholds"] == {"32": 4.0} and rows[0]["window"] == 6


@pytest.mark.slow
def test_benchmark_full_level_with_upernet(tmp_path):
    pytest.importorskip("mmseg", reason="--level full needs mmsegmentation")
    args = ["--host", "eva02_b_seg", "--size", "128", "--depth", "2", "--repeats", "1", "--warmup", "0", "--scales", "1",
            "--level", "full", "--output-dir", str(tmp_path), "--tag", "full"]
    assert benchmark.main(args) == 0
    row = json.loads((tmp_path / "full.json").read_text())["rows"][0]
    assert 1.0 <= row["ideal_speedup"]


def test_benchmark_argument_errors():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--thresholds", "{not json"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--dtype", "int8"])
    assert benchmark.configurations(benchmark.parse_args(["--scales", "0", "2"])) == [{32: 0.0}, {32: 11.5}]


def test_visualize_folder_with_bad_files(tmp_path, messy_folder, capsys, caplog):
    out = tmp_path / "grid.png"
    assert visualize_patches.main(["--images", str(messy_folder), "--size", "256", "--output", str(out)]) == 0
    assert "broken.jpg: skipped" in caplog.text
    rows = (tmp_path / "grid.csv").read_text().splitlines()
    assert rows[0] == "image,tokens,dense_tokens,kept_fraction" and len(rows) == 5
    width, height = Image.open(out).size
    assert width == sheet_width(4) and height > 320 + 2 * LINE_HEIGHT
    assert legend_colors(out, 2 * LINE_HEIGHT + TILE_GAP) == set(COARSE_COLORS[:3])
    assert "mean kept" in capsys.readouterr().out


def test_visualize_ctrl_c_writes_the_images_done(tmp_path, monkeypatch, capsys):
    interrupted_on_third(monkeypatch, visualize_patches)
    out = tmp_path / "grid.png"
    assert visualize_patches.main(["--size", "256", "--output", str(out)]) == 130
    assert len((tmp_path / "grid.csv").read_text().splitlines()) == 1 + 2
    assert Image.open(out).size[0] == sheet_width(2)


def test_calibrate_hits_target_and_plots_curve(tmp_path, capsys):
    out, png = tmp_path / "cal.json", tmp_path / "curve.png"
    assert calibrate_thresholds.main(["--size", "256", "--setting", "segmentation", "--target", "0.7", "--curve",
                                      str(png), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert abs(result["kept"] - 0.7) < 0.05 and set(result["thresholds"]) == {"32"}
    kept = [point["kept"] for point in result["curve"]]
    assert kept[0] == 1.0 and all(a >= b for a, b in zip(kept, kept[1:]))  # more merging as thresholds grow
    scales = [point["scale"] for point in result["curve"]]
    assert 1.0 in scales and result["scale"] in scales and max(scales) >= 1.25 * result["scale"]
    for number in [result["scale"], *result["thresholds"].values()] + [
            v for point in result["curve"] for v in (point["scale"], point["kept"], *point["thresholds"].values())]:
        assert number == round(number, 4)  # no 0.22499999999999998
    printed = capsys.readouterr().out
    assert "99999" not in printed and "00000" not in printed
    assert "<- base: the paper's segmentation setting" in printed and "<- chosen" in printed
    assert Image.open(png).size == (768, 624)  # 6.4 x 5.2 in at 120 dpi


def test_calibrate_curve_reaches_a_far_target():
    scales = calibrate_thresholds.curve_scales(9.37)
    assert scales[0] == 0 and 1.0 in scales and 9.37 in scales and scales[-1] >= 1.25 * 9.37
    assert len(scales) <= 19 and all(s == round(s, 4) for s in scales)


@pytest.mark.parametrize("argv", [[], ["--target", "1.5"], ["--target", "0"]])
def test_calibrate_argument_errors(argv):
    with pytest.raises(SystemExit):
        calibrate_thresholds.parse_args(argv)


def test_calibrate_ctrl_c_while_scoring_calibrates_on_the_images_scored(tmp_path, monkeypatch, capsys):
    interrupted_on_third(monkeypatch, calibrate_thresholds)
    out = tmp_path / "cal.json"
    assert calibrate_thresholds.main(["--size", "256", "--target", "0.8", "--output", str(out)]) == 130
    result = json.loads(out.read_text())
    assert result["images"] == 2 and "while scoring" in result["interrupted"] and "thresholds" in result
    assert "going on with the 2 images scored so far" in capsys.readouterr().out


def test_calibrate_ctrl_c_while_calibrating_keeps_the_curve_so_far(tmp_path, monkeypatch):
    real_kept, calls = calibrate_thresholds.kept_fraction, []

    def interrupted_on_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_kept(*args)

    monkeypatch.setattr(calibrate_thresholds, "kept_fraction", interrupted_on_fifth)
    out, png = tmp_path / "cal.json", tmp_path / "curve.png"
    assert calibrate_thresholds.main(["--size", "256", "--curve", str(png), "--output", str(out)]) == 130
    result = json.loads(out.read_text())
    assert len(result["curve"]) == 4 and "while calibrating" in result["interrupted"]
    assert png.exists()


def test_fidelity_probe_per_layer(tmp_path):
    out = tmp_path / "fid.json"
    assert fidelity_probe.main(["--size", "256", "--depth", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["cosine"]) == 2 and all(0 < c <= 1.0001 for c in result["cosine"])
    assert fidelity_probe.main(["--size", "256", "--depth", "2", "--thresholds", '{"32": 0}', "--output", str(out)]) == 0
    assert json.loads(out.read_text())["cosine"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_benchmark_default_tags_keep_runs_apart():
    def tag(argv):
        return benchmark.default_tag(benchmark.parse_args(argv + ["--device", "cpu"]), torch.device("cpu"))

    assert tag([]) == "eva02_b_seg-512-backbone-cpu-fp32"
    assert tag(["--compile", "--stream", "--batch", "2"]) == "eva02_b_seg-512-backbone-cpu-fp32-compiled-stream"
    assert tag(["--host", "vitdet_b", "--size", "1024", "--thresholds", '{"32": 2}', "--level", "full"]) == (
        "vitdet_b-1024-full-detectron2-cpu-fp32")
    assert tag(["--host", "vitdet_b", "--size", "1024", "--thresholds", '{"32": 2}', "--level", "full",
                "--framework", "mmdet"]) == "vitdet_b-1024-full-mmdet-cpu-fp32"
    assert tag(["--level", "full"]) == "eva02_b_seg-512-full-cpu-fp32"


# --- SAM and DINOv2 / Depth Anything hosts -----------------------------------------------------------

def test_visualize_sam_host_letterboxes_as_sam_predictor(tmp_path):
    """SAM's canvas and setting: the astronaut (square, no padding) keeps 93.7% at {32: 2}."""
    pytest.importorskip("segment_anything")
    out = tmp_path / "sam.png"
    assert visualize_patches.main(["--host", "sam_vit_b", "--limit", "1", "--output", str(out)]) == 0
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[1] == "astronaut,3838,4096,0.937"


def test_visualize_and_calibrate_depth_host_count_the_dense_tokens_of_each_image(tmp_path, capsys):
    """Depth Anything's processor: coffee (400x600) becomes 350x518, 25x37 = 925 dense tokens."""
    pytest.importorskip("transformers")
    out = tmp_path / "da.png"
    assert visualize_patches.main(["--host", "depth_anything_v2_b", "--limit", "2", "--output", str(out)]) == 0
    rows = [r.split(",") for r in out.with_suffix(".csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["astronaut", "coffee"] and [r[2] for r in rows] == ["1369", "925"]
    assert Image.open(out).size[0] == sheet_width(2)
    capsys.readouterr()
    assert calibrate_thresholds.main(["--host", "depth_anything_v2_b", "--limit", "2", "--curve", str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out
    mean = (int(rows[0][1]) / 1369 + int(rows[1][1]) / 925) / 2
    assert f"{mean:.1%}  {{28: 5.43, 56: 5.67}}  <- base: the depth setting" in printed


def test_calibrate_sam_setting_is_not_called_the_papers(tmp_path, capsys):
    pytest.importorskip("segment_anything")
    out = tmp_path / "sam.json"
    assert calibrate_thresholds.main(["--host", "sam_vit_b", "--limit", "2", "--curve", str(tmp_path / "c.png"),
                                      "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "base: the SAM setting, calibrated" in printed and "paper" not in printed
    result = json.loads(out.read_text())
    assert result["host"] == "sam_vit_b" and result["size"] == 1024 and result["base"] == {"32": 2.0}
    at_base = next(point for point in result["curve"] if point["scale"] == 1.0)
    assert at_base["kept"] == pytest.approx((3838 + 3118) / 2 / 4096, abs=1e-4)  # astronaut, coffee


@pytest.mark.parametrize("tool", [visualize_patches, calibrate_thresholds, demo])
def test_tools_say_when_segment_anything_is_missing(tool, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apt_dense.sam", None)  # import apt_dense.sam raises ImportError
    argv = ["--host", "sam_vit_b"] + (["--curve"] if tool is calibrate_thresholds else [])
    with pytest.raises(SystemExit):
        tool.parse_args(argv)
    assert "--host sam_vit_b needs segment-anything: pip install 'apt-dense[sam]'" in capsys.readouterr().err


def test_backbone_flops_count_sam_and_dinov2_mlps_as_the_core_blocks():
    """SAM's lin1/lin2 and transformers-shaped DINOv2 blocks count as the core's fc1/fc2 blocks."""
    pytest.importorskip("segment_anything")
    pytest.importorskip("transformers")
    from apt_dense.benchmarking import (
        apt_layout, backbone_builder, backbone_flops, dense_layout, model_builder, same_weights_pair,
    )

    for host, size in (("sam_vit_b", 1024), ("dinov2_s", 518)):
        apt, dense = same_weights_pair(backbone_builder(host, {28: 5.43, 56: 5.67} if "dinov2" in host else {32: 2.0},
                                                        depth=4))
        core = model_builder(host, None, depth=4)(False)
        x = torch.randn(1, 3, size, size)
        engine = getattr(apt, "apt", apt)
        for layout in (dense_layout(apt, x), apt_layout(apt, x)):
            assert backbone_flops(engine, layout) == backbone_flops(core, layout) > 0


@pytest.mark.slow
def test_benchmark_sam_encoder_and_predictor_against_segment_anything(tmp_path):
    pytest.importorskip("segment_anything")
    common = ["--host", "sam_vit_b", "--depth", "1", "--limit", "1", "--scales", "0", "1", "--repeats", "1",
              "--warmup", "0", "--no-memory", "--output-dir", str(tmp_path)]
    assert benchmark.main(common + ["--tag", "enc"]) == 0
    off, on = json.loads((tmp_path / "enc.json").read_text())["rows"]
    assert off["kept_mean"] == 1.0 and off["ideal_speedup"] == pytest.approx(1.0)
    assert on["kept_mean"] == pytest.approx(3838 / 4096) and on["ideal_speedup"] > 1.0 and on["window"] == 14
    assert "the dense side segment-anything's own" in (tmp_path / "enc.md").read_text()
    assert benchmark.main(common + ["--level", "full", "--tag", "full"]) == 0
    full = json.loads((tmp_path / "full.json").read_text())["rows"][1]
    # The prompt encoder, mask decoder and neck dilute the encoder's saving.
    assert 1.0 < full["ideal_speedup"] < on["ideal_speedup"]


@pytest.mark.slow
def test_benchmark_depth_anything_whole_model_against_transformers(tmp_path):
    pytest.importorskip("transformers")
    argv = ["--host", "depth_anything_v2_s", "--level", "full", "--depth", "4", "--limit", "2", "--scales", "0", "1",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--output-dir", str(tmp_path), "--tag", "da"]
    assert benchmark.main(argv) == 0
    record = json.loads((tmp_path / "da.json").read_text())
    off, on = record["rows"]
    # Merging off: base patches only, no padding to the largest patch (350x518 stays 25x37 cells).
    assert off["kept_mean"] == 1.0 and off["ideal_speedup"] == pytest.approx(1.0)
    assert on["kept_mean"] < 1.0 and on["ideal_speedup"] > 1.0 and on["batches"] == 2
    assert record["environment"]["threads"] == 1 and len(record["environment"]["load_before"]) == 3
    assert on["peak_mib_apt"] > 0 and on["train_peak_mib_dense"] > 0


@pytest.mark.slow
def test_demo_sam_host(tmp_path, capsys):
    pytest.importorskip("segment_anything")
    assert demo.main(["--host", "sam_vit_b", "--depth", "1", "--budget", "1", "--output", str(tmp_path / "d.png")]) == 0
    printed = capsys.readouterr().out
    assert "sam_vit_b (1 blocks (reduced by --depth), dim 768, window 14 cells) at 1024x1024" in printed
    assert "the SAM setting" in printed and "astronaut" in printed and "speedup" in printed

"""The command-line tools: argument handling and outputs on tiny models (no timing assertions)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.slow
def test_demo_writes_patch_map(tmp_path, capsys):
    out = tmp_path / "map.png"
    assert demo.main(["--size", "256", "--depth", "2", "--repeats", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "astronaut" in printed and "speedup" in printed
    assert Image.open(out).size[0] == 5 * 320


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
    assert (tmp_path / "run.png").stat().st_size > 0


@pytest.mark.slow
def test_benchmark_explicit_thresholds_windows_and_folder(tmp_path, messy_folder):
    args = ["--host", "vitdet_b", "--size", "256", "--window", "6", "--depth", "2", "--repeats", "1", "--warmup", "0",
            "--thresholds", '{"32": 4.0}', "--images", str(messy_folder), "--batch", "2", "--output-dir", str(tmp_path),
            "--tag", "win"]
    with pytest.warns(UserWarning) as caught:
        assert benchmark.main(args) == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.jpg" in messages and "gray.png" in messages and "rgba.png" in messages
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


def test_visualize_folder_with_bad_files(tmp_path, messy_folder, capsys):
    out = tmp_path / "grid.png"
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert visualize_patches.main(["--images", str(messy_folder), "--size", "256", "--output", str(out)]) == 0
    rows = (tmp_path / "grid.csv").read_text().splitlines()
    assert rows[0] == "image,tokens,dense_tokens,kept_fraction" and len(rows) == 5
    assert Image.open(out).size == (4 * 320, 320 + 18)
    assert "mean kept" in capsys.readouterr().out


def test_visualize_rejects_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no readable images"):
        visualize_patches.main(["--images", str(tmp_path)])


def test_calibrate_hits_target_and_reports_curve(tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert calibrate_thresholds.main(["--size", "256", "--setting", "segmentation", "--target", "0.7", "--curve",
                                      "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert abs(result["kept"] - 0.7) < 0.05 and set(result["thresholds"]) == {"32"}
    kept = [point["kept"] for point in result["curve"]]
    assert kept[0] == 1.0 and all(a >= b for a, b in zip(kept, kept[1:]))  # more merging as thresholds grow


@pytest.mark.parametrize("argv", [[], ["--target", "1.5"], ["--target", "0"]])
def test_calibrate_argument_errors(argv):
    with pytest.raises(SystemExit):
        calibrate_thresholds.parse_args(argv)


def test_fidelity_probe_per_layer(tmp_path):
    out = tmp_path / "fid.json"
    assert fidelity_probe.main(["--size", "256", "--depth", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["cosine"]) == 2 and all(0 < c <= 1.0001 for c in result["cosine"])
    assert fidelity_probe.main(["--size", "256", "--depth", "2", "--thresholds", '{"32": 0}', "--output", str(out)]) == 0
    assert json.loads(out.read_text())["cosine"] == pytest.approx([1.0, 1.0], abs=1e-5)

"""The demo and benchmark tools run end to end on tiny settings."""
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import benchmark  # noqa: E402
import demo  # noqa: E402


@pytest.mark.slow
def test_demo_writes_patch_map(tmp_path, capsys):
    out = tmp_path / "map.png"
    assert demo.main(["--size", "256", "--depth", "2", "--repeats", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "astronaut" in printed and "speedup" in printed
    from PIL import Image

    assert Image.open(out).size[0] == 5 * 320


@pytest.mark.slow
@pytest.mark.parametrize("host, setting", [("eva02_b_seg", "segmentation"), ("vitdet_b", "detection")])
def test_benchmark_records_results(tmp_path, capsys, host, setting):
    results = tmp_path / "r.jsonl"
    args = ["--host", host, "--size", "256", "--setting", setting, "--depth", "2", "--batch", "2",
            "--repeats", "1", "--results", str(results)]
    if host == "vitdet_b":
        args += ["--window", "6"]  # 16-cell grid padded to 18: padded windows; 6 cells fits 32 px patches
        args[args.index("detection")] = "segmentation"
    assert benchmark.main(args) == 0
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["host"] == host and 0 < record["kept_mean"] <= 1
    assert record["speedup"] > 0 and record["ideal_speedup"] >= 1
    assert "| " + host in capsys.readouterr().out


def test_demo_rejects_unknown_host():
    with pytest.raises(SystemExit):
        demo.parse_args(["--host", "resnet50"])

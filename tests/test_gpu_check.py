"""tools/gpu_check.sh --dry-run: every step of the first GPU session wired on the CPU (pytest
collects the CUDA tests, each benchmark row runs once at depth 1 on one photo, the compiled rows
with dynamo's eager backend), so that the command is known to work before a GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("seg512", "det1024", "det1536")


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_result(tmp_path):
    output = tmp_path / "gc"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--output", str(output),
                           "--budget", "1500"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    summary = (output / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    assert "(dry run: wiring only, nothing timed)" in summary
    assert "FAILED" not in summary and "SKIPPED" not in summary
    for step in ("install", "cuda-tests"):
        assert f"- {step}: ok" in summary
    for row in ROWS:
        for name in (f"bench-{row}", f"bench-{row}-compiled"):
            assert f"- {name}: ok" in summary
            result = json.loads((output / "raw" / f"{name}.json").read_text())
            # Merging off and the paper's thresholds, each with its speed and both sides' memory.
            assert len(result["rows"]) == 2, name
            assert all(r["speedup"] > 0 and r["peak_mib_dense"] and r["peak_mib_apt"] for r in result["rows"]), name
            assert result["args"]["compile"] == name.endswith("compiled")
            assert f"### {name}\n" in summary
    with tarfile.open(output / "gpu_check.tar.gz") as tar:
        members = set(tar.getnames())
    assert "summary.md" in members
    assert {f"raw/bench-{row}.json" for row in ROWS} <= members
    assert {f"raw/bench-{row}-compiled.json" for row in ROWS} <= members

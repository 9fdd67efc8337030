"""The OpenMMLab tools run as a user runs them (one process, or two with gloo through
``torch.distributed.run``) and their checkpoints read back, for the mmseg and mmdet workflow tests.
Import it after ``require_openmmlab``."""
import subprocess
import sys
from pathlib import Path

from apt_dense.checkpoints import read_checkpoint
from apt_dense.openmmlab.runner import MMENGINE_CHECKPOINT_GLOBALS

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], distributed: bool = False, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``python TOOL ARGS`` from the repository root; ``distributed``: 2 processes with ``--launcher pytorch``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if distributed else [sys.executable]
    extra = ["--launcher", "pytorch"] if distributed else []
    result = subprocess.run(launcher + args + extra, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def weights(path) -> dict:
    """The state dict of a checkpoint, read as data (weights only) as APTRunner reads it."""
    return read_checkpoint(path, safe_globals=MMENGINE_CHECKPOINT_GLOBALS)["state_dict"]

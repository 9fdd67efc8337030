"""mmsegmentation workflows judged by their outcome: the weights a run uses, the iteration and
learning rate it continues at, the metrics it reports, single- and multi-process (gloo on CPU).

Every run goes through the tools a user runs (``tools/train_seg.py``, ``tools/test_seg.py``,
``python -m torch.distributed.run ... --launcher pytorch``) on a tiny UperNet and a generated
ADE20K-format folder.
"""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_openmmlab

require_openmmlab("mmcv._ext", "mmcv.ops", "mmseg")

from mmengine.config import Config  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

from apt_dense.checkpoints import is_apt_layer  # noqa: E402
from openmmlab_tool_runs import ROOT, run, weights  # noqa: E402

register_all_modules()
TINY = ROOT / "configs" / "apt_upernet_tiny_e2e.py"
TRAIN, TEST = str(ROOT / "tools" / "train_seg.py"), str(ROOT / "tools" / "test_seg.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_ade20k import make_tiny_ade20k

    return str(make_tiny_ade20k(tmp_path_factory.mktemp("ade"), train=8, val=4, size=160))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A synthetic EVA-02 UperNet checkpoint (mmseg 0.x layout: ``state_dict``, RoPE buffers, no
    APT layers) whose every weight differs from what ``init_weights`` would draw."""
    cfg = Config.fromfile(str(TINY))
    torch.manual_seed(123)
    model = MODELS.build(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items() if not is_apt_layer(k)}
    state["backbone.rope.freqs_cos"] = torch.zeros(64, 32)
    path = tmp_path_factory.mktemp("ckpt") / "eva02_upernet_tiny.pth"
    torch.save({"meta": {"mmseg_version": "0.29.1"}, "state_dict": state}, path)
    return path


def running_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def assert_loaded(result_path, pretrained_path, *, allow_changed=()):
    """Every tensor of the pretrained checkpoint equals the run's (RoPE tables are recomputed)."""
    ours, theirs = weights(result_path), weights(pretrained_path)
    compared = 0
    for key, value in theirs.items():
        if "rope" in key or running_stat(key) or any(p in key for p in allow_changed):
            continue
        assert torch.equal(ours[key], value), key
        compared += 1
    assert compared > 100


def train_args(work, data_root, *options):
    return [TRAIN, str(TINY), "--work-dir", str(work), "--data-root", data_root, "--cfg-options", *options]


@pytest.mark.parametrize("distributed", [False, True], ids=["1-process", "2-process-gloo"])
def test_load_from_is_what_training_uses(tmp_path, data_root, pretrained, distributed):
    """After loading and 2 iterations at lr 0 every weight still equals the checkpoint's: nothing
    re-initialises the heads after loading, and DDP loads into the wrapped model."""
    work = tmp_path / "work"
    run(train_args(work, data_root, f"load_from={pretrained}", "optim_wrapper.optimizer.lr=0.0",
                   "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2"), distributed)
    assert_loaded(work / "iter_2.pth", pretrained)


def test_apt_only_finetune_under_ddp_changes_only_the_apt_layers(tmp_path, data_root, pretrained):
    work = tmp_path / "work"
    run(train_args(work, data_root, f"load_from={pretrained}", "optim_wrapper.paramwise_cfg.apt_layers_only=True",
                   "optim_wrapper.optimizer.lr=0.01", "train_cfg.max_iters=3", "default_hooks.checkpoint.interval=3"),
        distributed=True)
    after = weights(work / "iter_3.pth")
    theirs = weights(pretrained)
    for key, value in theirs.items():
        if "rope" not in key and not key.endswith("num_batches_tracked"):
            assert torch.equal(after[key], value), f"{key} changed although only the APT layers train"
    assert not torch.equal(after["backbone.patch_embed.detail.weight"], torch.zeros_like(after["backbone.patch_embed.detail.weight"]))


def metrics_of(stdout: str) -> dict:
    line = [ln for ln in stdout.splitlines() if ln.startswith("aAcc:")][-1]
    return {k: float(v) for k, v in re.findall(r"(\w+): ([-\d.na]+)", line)}


def test_two_process_test_reports_the_same_metrics(tmp_path, data_root, pretrained):
    single = metrics_of(run([TEST, str(TINY), str(pretrained), "--work-dir", str(tmp_path / "t1"), "--data-root", data_root]).stdout)
    double = metrics_of(run([TEST, str(TINY), str(pretrained), "--work-dir", str(tmp_path / "t2"), "--data-root", data_root],
                            distributed=True).stdout)
    assert set(single) >= {"aAcc", "mIoU", "mAcc", "apt_kept_fraction"}
    assert single == double
    assert 0.0 < single["apt_kept_fraction"] <= 1.0


def lrs(work: Path) -> dict[int, float]:
    """``{iteration: lr}`` from every run's ``vis_data/scalars.json`` in ``work``."""
    found = {}
    for scalars in sorted(work.glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            record = json.loads(line)
            if "lr" in record and "iter" in record:
                found.setdefault(record["iter"], []).append(record["lr"])
    return found


@pytest.mark.parametrize("how, moved", [("--resume", True), ("resume=True", False)], ids=["moved-dir", "in-place"])
def test_resume_continues_at_the_next_iteration_with_the_same_lr(tmp_path, data_root, pretrained, how, moved):
    """Stopped after 5 of 8 iterations and resumed in its work dir (moved to another path first in
    one case: mmengine's ``last_checkpoint`` names the old absolute path): iterations 6..8 run
    once each with the uninterrupted run's learning rates. A plain run there is refused and
    leaves the checkpoints as they were."""
    common = [f"load_from={pretrained}", "default_hooks.logger.interval=1", "default_hooks.checkpoint.interval=5"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(train_args(straight, data_root, *common, "train_cfg.max_iters=8"))
    first = tmp_path / "first" if moved else stopped
    run(train_args(first, data_root, *common, "train_cfg.max_iters=5"))
    if moved:
        shutil.move(first, stopped)
        assert str(first) in (stopped / "last_checkpoint").read_text()  # the marker still names the old path
    saved = (stopped / "iter_5.pth").read_bytes()

    again = run(train_args(stopped, data_root, *common, "train_cfg.max_iters=8"), expect_ok=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: work dir {stopped} holds checkpoints of an earlier run (latest: {stopped / 'iter_5.pth'}); "
        "continue it with --resume (or resume=True), or start a new run with another --work-dir")
    assert not (stopped / "iter_8.pth").exists() and (stopped / "iter_5.pth").read_bytes() == saved

    args = train_args(stopped, data_root, *common, "train_cfg.max_iters=8")
    args = args + ["--resume"] if how == "--resume" else args + ["resume=True"]
    log = run(args)
    assert "holds no checkpoint" not in log.stdout + log.stderr
    expected, resumed = lrs(straight), lrs(stopped)
    assert sorted(expected) == list(range(1, 9))
    assert {i: len(v) for i, v in resumed.items()} == {i: 1 for i in range(1, 9)}  # 6..8 only after resuming
    for i in range(1, 9):
        assert resumed[i][0] == pytest.approx(expected[i][0], rel=1e-12), i
    assert (stopped / "iter_8.pth").exists()
    assert (stopped / "last_checkpoint").read_text().strip() == str(stopped / "iter_8.pth")


def test_empty_val_split_is_named_before_training(tmp_path, data_root):
    root = tmp_path / "ade"
    shutil.copytree(data_root, root)
    for split in ("images", "annotations"):
        shutil.rmtree(root / split / "validation")
        (root / split / "validation").mkdir()
    work = tmp_path / "work"
    result = run(train_args(work, str(root), "train_cfg.max_iters=2"), expect_ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: the val split is empty: ADE20KDataset at {root}") and "holds no samples" in line
    assert "validation" in line and not list(work.glob("iter_*.pth"))


def test_corrupt_label_names_its_file(tmp_path, data_root):
    root = tmp_path / "ade"
    shutil.copytree(data_root, root)
    labels = sorted((root / "annotations" / "training").glob("*.png"))
    for label in labels:
        label.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run(train_args(tmp_path / "work", str(root), "train_cfg.max_iters=2"), expect_ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: cannot load the sample" in result.stderr
    assert any(str(label) in result.stderr for label in labels), result.stderr[-2000:]

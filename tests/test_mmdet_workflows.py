"""MMDetection workflows judged by their outcome: the weights a run uses, the COCO metrics it
reports, single- and multi-process (gloo on CPU).

Every run goes through the tools a user runs (``tools/train_det.py``, ``tools/test_det.py``,
``python -m torch.distributed.run ... --launcher pytorch``) on the tiny Mask R-CNN and a generated
COCO-format folder.
"""
import json
import re
import shutil
import sys

import pytest
import torch
from conftest import require_openmmlab

require_openmmlab("mmcv._ext", "mmcv.ops", "mmdet")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from apt_dense.checkpoints import is_apt_layer  # noqa: E402
from openmmlab_tool_runs import ROOT, run, weights  # noqa: E402

register_all_modules(init_default_scope=False)

TINY = ROOT / "configs" / "mmdet" / "apt_vitdet_mask-rcnn_tiny_e2e.py"
TRAIN, TEST = str(ROOT / "tools" / "train_det.py"), str(ROOT / "tools" / "test_det.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def mmdet_scope():
    """Build in mmdet's registry scope; the mmseg tests of the same session use mmseg's."""
    with DefaultScope.overwrite_default_scope("mmdet"):
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_coco import make_tiny_coco

    root = tmp_path_factory.mktemp("coco")
    make_tiny_coco(root, num_images=8, size=256, seed=0)
    return str(root)


def perturbed_state(seed: int) -> dict:
    """The tiny detector's weights, each moved away from what initialisation would draw."""
    torch.manual_seed(seed)
    model = MODELS.build(Config.fromfile(str(TINY)).model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.clone() for k, v in model.state_dict().items() if not is_apt_layer(k)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A synthetic mmdet ViTDet detector checkpoint (mmengine layout, mmdet key names, no APT layers)."""
    path = tmp_path_factory.mktemp("ckpt") / "vitdet_mask_rcnn_tiny.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": perturbed_state(123)}, path)
    return path


def assert_equal_weights(result: dict, expected: dict, *, prefix: str = "") -> None:
    compared = 0
    for key, value in expected.items():
        assert torch.equal(result[prefix + key], value), prefix + key
        compared += 1
    assert compared > 50


def train_args(work, data_root, *options):
    return [TRAIN, str(TINY), "--work-dir", str(work), "--data-root", data_root, "--cfg-options", *options]


def metrics_of(stdout: str) -> dict:
    line = [ln for ln in stdout.splitlines() if ln.startswith("coco/bbox_mAP:")][-1]
    return {k: float(v) for k, v in re.findall(r"([\w/]+): ([-\d.na]+)", line)}


def test_train_and_test_tiny_coco(tmp_path, data_root):
    work = tmp_path / "work"
    run(train_args(work, data_root, "train_cfg.max_iters=4", "train_cfg.val_interval=4",
                   "default_hooks.checkpoint.interval=4"))
    log = next(work.glob("*/*.log")).read_text()
    assert "APT val: mean fraction of tokens kept" in log and "coco/bbox_mAP" in log and "coco/segm_mAP" in log
    assert "train/apt_kept_fraction" not in log and "apt_kept_fraction" in log
    test = run([TEST, str(TINY), str(work / "iter_4.pth"), "--work-dir", str(tmp_path / "test"), "--data-root", data_root])
    metrics = metrics_of(test.stdout)
    assert {"coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50", "apt_kept_fraction"} <= set(metrics)
    assert 0.0 < metrics["apt_kept_fraction"] < 1.0  # the flat letterbox bands merge


@pytest.mark.parametrize("distributed", [False, True], ids=["1-process", "2-process-gloo"])
def test_load_from_is_what_training_uses(tmp_path, data_root, pretrained, distributed):
    """After loading and 2 iterations at lr 0 every weight still equals the checkpoint's: nothing
    re-initialises the heads after loading, and DDP loads into the wrapped model."""
    work = tmp_path / "work"
    run(train_args(work, data_root, f"load_from={pretrained}", "optim_wrapper.optimizer.lr=0.0",
                   "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2"), distributed)
    assert_equal_weights(weights(work / "iter_2.pth"), weights(pretrained))


def test_backbone_init_cfg_loads_before_training(tmp_path, data_root):
    """The backbone's init_cfg (MAE-style ``{'model': ...}`` weights, unprefixed) is what training
    starts from."""
    backbone = {k[len("backbone."):]: v for k, v in perturbed_state(7).items() if k.startswith("backbone.")}
    mae = tmp_path / "mae_tiny.pth"
    torch.save({"model": backbone}, mae)
    config = tmp_path / "tiny_from_mae.py"
    config.write_text(f"_base_ = [{str(TINY)!r}]\n"
                      f"model = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained', checkpoint={str(mae)!r})))\n")
    work = tmp_path / "work"
    args = train_args(work, data_root, "optim_wrapper.optimizer.lr=0.0", "train_cfg.max_iters=2",
                      "default_hooks.checkpoint.interval=2")
    args[1] = str(config)
    run(args)
    assert_equal_weights(weights(work / "iter_2.pth"), backbone, prefix="backbone.")


def test_apt_only_finetune_under_ddp_changes_only_the_apt_layers(tmp_path, data_root, pretrained):
    work = tmp_path / "work"
    run(train_args(work, data_root, f"load_from={pretrained}", "optim_wrapper.paramwise_cfg.apt_layers_only=True",
                   "optim_wrapper.optimizer.lr=0.01", "train_cfg.max_iters=3", "default_hooks.checkpoint.interval=3"),
        distributed=True)
    after = weights(work / "iter_3.pth")
    assert_equal_weights(after, weights(pretrained))
    detail = after["backbone.patch_embed.detail.weight"]
    assert not torch.equal(detail, torch.zeros_like(detail))


def test_two_process_test_reports_the_same_metrics(tmp_path, data_root, pretrained):
    single = metrics_of(run([TEST, str(TINY), str(pretrained), "--work-dir", str(tmp_path / "t1"), "--data-root", data_root]).stdout)
    double = metrics_of(run([TEST, str(TINY), str(pretrained), "--work-dir", str(tmp_path / "t2"), "--data-root", data_root],
                            distributed=True).stdout)
    assert {"coco/bbox_mAP", "coco/segm_mAP", "apt_kept_fraction"} <= set(single)
    assert single == double


def test_training_set_without_annotations_is_named_before_training(tmp_path, data_root):
    root = tmp_path / "coco"
    shutil.copytree(data_root, root)
    instances = json.loads((root / "instances.json").read_text())
    (root / "instances.json").write_text(json.dumps(dict(instances, annotations=[])))
    result = run(train_args(tmp_path / "work", str(root), "train_cfg.max_iters=2"), expect_ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: the train split is empty: CocoDataset at {root}") and "ann_file instances.json" in line
    assert "images without annotations are left out (filter_cfg.filter_empty_gt)" in line

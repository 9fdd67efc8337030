"""APTRunner's pieces that need mmengine alone (fast): the work dir's own latest checkpoint,
data errors that name their files, and the project's training checkpoints read by the tools.
End-to-end runs through the tools are in test_mmseg_workflows.py / test_mmdet_workflows.py."""
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_openmmlab

require_openmmlab("mmengine")

from mmengine.logging import MessageHub  # noqa: E402

from apt_dense.openmmlab.runner import (  # noqa: E402
    SampleLoadError, _describe_dataset, _NamedSampleErrors, latest_checkpoint,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fidelity_probe  # noqa: E402


def test_latest_checkpoint_is_the_work_dirs_own(tmp_path):
    old, work = tmp_path / "old", tmp_path / "work"
    work.mkdir()
    assert latest_checkpoint(str(work)) is None and latest_checkpoint(str(tmp_path / "missing")) is None
    for n in (5, 9, 10):
        (work / f"iter_{n}.pth").write_bytes(b"x")
    # No marker: the highest iteration, by number (10 after 9).
    assert latest_checkpoint(str(work)) == str(work / "iter_10.pth")
    # A marker written before the work dir moved names the old path: the file of that name here.
    (work / "last_checkpoint").write_text(str(old / "iter_9.pth"))
    assert latest_checkpoint(str(work)) == str(work / "iter_9.pth")
    # Copied rather than moved: still this dir's file, not the original's.
    old.mkdir()
    (old / "iter_9.pth").write_bytes(b"x")
    assert latest_checkpoint(str(work)) == str(work / "iter_9.pth")
    # CheckpointHook(out_dir=...) keeps checkpoints elsewhere: the marker's path.
    (old / "iter_12.pth").write_bytes(b"x")
    (work / "last_checkpoint").write_text(str(old / "iter_12.pth"))
    assert latest_checkpoint(str(work)) == str(old / "iter_12.pth")


class _Compose:
    transforms = ["LoadImageFromFile", "LoadAnnotations"]

    def __call__(self, results):
        raise OSError("cannot identify image file")


def test_sample_errors_name_the_files_and_the_wrapper_pickles():
    pipeline = _NamedSampleErrors(_Compose())
    with pytest.raises(SampleLoadError, match="cannot load the sample a.jpg with a.png: OSError: cannot identify"):
        pipeline({"img_path": "a.jpg", "seg_map_path": "a.png"})
    with pytest.raises(OSError):  # nothing to name: the original error
        pipeline({})
    clone = pickle.loads(pickle.dumps(pipeline))  # dataloader workers receive the dataset pickled
    assert clone.transforms == _Compose.transforms


def test_empty_dataset_description_names_its_folders():
    text = _describe_dataset(dict(type="CocoDataset", data_root="/data/coco", ann_file="instances.json",
                                  data_prefix=dict(img="images/"), filter_cfg=dict(filter_empty_gt=True)))
    assert text == ("CocoDataset at /data/coco (data_prefix {'img': 'images/'}, ann_file instances.json); "
                    "images without annotations are left out (filter_cfg.filter_empty_gt)")


def test_fidelity_probe_reads_the_projects_training_checkpoints(tmp_path, monkeypatch, capsys):
    """A checkpoint the OpenMMLab tools wrote (weights under ``backbone.``, mmengine's log buffers
    in ``message_hub``) is read as data, as the runner reads it."""
    apt, _ = fidelity_probe.build_model_pair("eva02_b_det", {32: 2.0}, img_size=128, depth=1)
    hub = MessageHub.get_instance("apt_probe_test")
    hub.update_scalar("train/loss", 1.5)
    path = tmp_path / "iter_2.pth"
    torch.save({"meta": {"iter": 2}, "state_dict": {f"backbone.{k}": v for k, v in apt.state_dict().items()},
                "message_hub": hub.state_dict()}, path)
    argv = ["--size", "128", "--depth", "1", "--limit", "1", "--thresholds", '{"32": 2}', "--checkpoint", str(path)]
    assert fidelity_probe.main(argv) == 0
    assert "random weights" not in capsys.readouterr().out
    # Without mmengine the tool still runs; such a file is then refused as unsafe, with the fix.
    monkeypatch.setitem(sys.modules, "apt_dense.openmmlab.runner", None)
    assert fidelity_probe.checkpoint_globals() == ()
    assert fidelity_probe.main(argv) == 1
    assert "--unsafe-load" in capsys.readouterr().err
    assert os.path.exists(path)

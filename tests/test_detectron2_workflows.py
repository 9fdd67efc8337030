"""detectron2 workflows judged by their outcome: weights, iteration, learning rate, metrics.

tools/train_net.py runs the tiny APT Mask R-CNN (projects/apt_tiny_e2e.py) on generated COCO data
on the CPU, in one process or in two (``--num-gpus 2`` starts gloo workers when there is no CUDA).
Skipped as a whole when detectron2 (not on PyPI) is not installed.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require

require("detectron2", "detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from apt_dense.checkpoints import UnsafeCheckpointError, is_apt_layer  # noqa: E402
from apt_dense.detectron2 import APTCheckpointer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
CONFIG = ROOT / "projects" / "apt_tiny_e2e.py"


def tiny_model():
    torch.manual_seed(0)
    return instantiate(LazyConfig.load(str(CONFIG)).model).eval()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Four training and two validation images (the second with a flat band, so the two
    validation images keep different fractions of tokens)."""
    sys.path.insert(0, str(TOOLS))
    from make_tiny_coco import make_tiny_coco

    root = tmp_path_factory.mktemp("coco")
    train_json, train_images = make_tiny_coco(root / "train", 4, 256, seed=0)
    val_json, val_images = make_tiny_coco(root / "val", 2, 256, seed=1)
    return dict(train=(train_json, train_images), val=(val_json, val_images))


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A full detector checkpoint (APT layers included) whose weights differ from any fresh
    initialisation, so that "equal to the checkpoint" can only come from loading it."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, value in model.state_dict().items():
        if value.is_floating_point() and name in dict(model.named_parameters()):
            value = value + 0.01 * torch.randn(value.shape, generator=generator)
        state[name] = value
    path = tmp_path_factory.mktemp("init") / "init.pth"
    torch.save({"model": state}, path)
    return path, state


def train_net(coco, output_dir, *opts, num_gpus=1, resume=False, refused=None):
    """Run tools/train_net.py on the tiny config; return the metrics.json records, or, when
    ``refused`` is a message, check that the run stops at once with it."""
    cmd = [sys.executable, str(TOOLS / "train_net.py"), "--config-file", str(CONFIG),
           "--num-gpus", str(num_gpus), "--dist-url", "auto",
           "--coco-dataset", "apt_tiny_train", *map(str, coco["train"]),
           "--coco-dataset", "apt_tiny_val", *map(str, coco["val"])]
    cmd += ["--resume"] if resume else []
    cmd += [f"train.output_dir={output_dir}", "train.log_period=1", *opts]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // num_gpus)))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if refused is not None:
        assert run.returncode == 2 and refused in run.stderr.splitlines()[-1] and "Traceback" not in run.stderr, run.stderr
        return []
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads(line) for line in (Path(output_dir) / "metrics.json").read_text().splitlines()]


def saved(path):
    """A checkpoint that train_net.py wrote, read as data (weights only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def test_init_checkpoint_loads_every_key(init_checkpoint):
    path, state = init_checkpoint
    model = tiny_model()
    APTCheckpointer(model).resume_or_load(str(path), resume=False)
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.slow
def test_training_at_lr_zero_keeps_the_checkpoint_weights(coco, init_checkpoint, tmp_path):
    path, state = init_checkpoint
    train_net(coco, tmp_path, f"train.init_checkpoint={path}", "train.max_iter=2", "optimizer.lr=0.0")
    final = saved(tmp_path / "model_final.pth")
    assert final["iteration"] == 1
    for key, value in state.items():
        assert torch.equal(final["model"][key], value), key


def assert_only_apt_layers_trained(final_state, init_state):
    apt_keys = [k for k in init_state if is_apt_layer(k)]
    assert len(apt_keys) == 4, apt_keys
    for key, value in init_state.items():
        if key in apt_keys:
            assert not torch.equal(final_state[key], value), f"APT layer {key} did not train"
        else:
            assert torch.equal(final_state[key], value), f"frozen {key} changed"


@pytest.mark.slow
def test_apt_layers_only_trains_nothing_else(coco, init_checkpoint, tmp_path):
    path, state = init_checkpoint
    train_net(coco, tmp_path, f"train.init_checkpoint={path}", "train.max_iter=2", "train.apt_layers_only=True")
    assert_only_apt_layers_trained(saved(tmp_path / "model_final.pth")["model"], state)


def predictions_by_image(path):
    by_image = {}
    for p in sorted(json.loads(Path(path).read_text()), key=lambda p: (p["image_id"], -p["score"])):
        by_image.setdefault(p["image_id"], []).append(p)
    return by_image


@pytest.mark.slow
def test_two_cpu_processes_load_freeze_and_evaluate_like_one(coco, init_checkpoint, tmp_path):
    """``--num-gpus 2`` without CUDA: two gloo processes, DistributedDataParallel on CPU modules.
    Loading and the APT-only freeze hold under DDP, and the evaluation gathered over both ranks
    (predictions, AP, mean tokens kept) equals a one-process evaluation of the saved model."""
    path, state = init_checkpoint
    out = tmp_path / "ddp"
    records = train_net(coco, out, f"train.init_checkpoint={path}", "train.max_iter=2", "train.apt_layers_only=True",
                        f"dataloader.evaluator.output_dir={out / 'inference'}", num_gpus=2)
    assert (out / "log.txt.rank1").is_file()  # a second rank ran
    assert_only_apt_layers_trained(saved(out / "model_final.pth")["model"], state)

    sys.path.insert(0, str(TOOLS))
    import eval_coco

    val_json, val_images = coco["val"]
    single = eval_coco.main(["--config-file", str(CONFIG), "--checkpoint", str(out / "model_final.pth"),
                             "--images", str(val_images), "--annotations", str(val_json),
                             "--output-dir", str(tmp_path / "single")])
    distributed = records[-1]
    assert distributed["apt/images"] == single["apt"]["images"] == 2
    assert distributed["apt/kept_fraction"] == pytest.approx(single["apt"]["kept_fraction"], rel=1e-6)
    for task in ("bbox", "segm"):
        assert distributed[f"{task}/AP"] == pytest.approx(single[task]["AP"], abs=1e-3)
    ours = predictions_by_image(out / "inference" / "coco_instances_results.json")
    theirs = predictions_by_image(tmp_path / "single" / "coco_instances_results.json")
    assert sorted(ours) == sorted(theirs) == [1, 2]
    for image_id, predictions in theirs.items():
        assert len(ours[image_id]) == len(predictions) > 0
        top = slice(0, 10)  # near-tied low scores may swap places
        np.testing.assert_allclose([p["score"] for p in ours[image_id][top]], [p["score"] for p in predictions[top]], atol=1e-4)
        np.testing.assert_allclose([p["bbox"] for p in ours[image_id][top]], [p["bbox"] for p in predictions[top]], atol=1e-2)


@pytest.mark.slow
def test_resume_continues_at_the_next_iteration_with_the_same_lr(coco, init_checkpoint, tmp_path):
    """Stopped after 5 of 10 iterations, the output dir moved, and resumed there: iterations 5..9
    run once each with the learning rates of an uninterrupted run, and the optimizer state is the
    one saved. A plain run in that dir is refused and leaves its checkpoints as they were. The warmup
    spans 7 of 10 iterations and the steps come at 8 and 9, so every resumed lr is distinct."""
    path, _ = init_checkpoint
    schedule = [f"train.init_checkpoint={path}", "lr_multiplier.warmup_length=0.7",
                "lr_multiplier.scheduler.milestones=[24,27]", "lr_multiplier.scheduler.num_updates=30"]

    def lrs(records):
        return [(r["iteration"], r["lr"]) for r in records if "lr" in r]

    reference = lrs(train_net(coco, tmp_path / "reference", *schedule, "train.max_iter=10"))
    train_net(coco, tmp_path / "first", *schedule, "train.max_iter=5")
    # The work dir moves before it is resumed; a plain run there would overwrite its checkpoints.
    shutil.move(tmp_path / "first", tmp_path / "resumed")
    stopped = (tmp_path / "resumed" / "model_final.pth").read_bytes()
    train_net(coco, tmp_path / "resumed", *schedule, "train.max_iter=10",
              refused=f"train.output_dir {tmp_path / 'resumed'} holds checkpoints of an earlier run")
    assert (tmp_path / "resumed" / "model_final.pth").read_bytes() == stopped
    assert saved(tmp_path / "resumed" / "model_final.pth")["iteration"] == 4
    resumed = lrs(train_net(coco, tmp_path / "resumed", *schedule, "train.max_iter=10", resume=True))
    assert [i for i, _ in reference] == list(range(10))
    assert [i for i, _ in resumed] == list(range(10))  # 0..4, then 5..9 after the resume
    assert len({lr for _, lr in reference[5:]}) == 5
    assert [lr for _, lr in resumed[5:]] == pytest.approx([lr for _, lr in reference[5:]], rel=1e-9)

    final, uninterrupted = saved(tmp_path / "resumed" / "model_final.pth"), saved(tmp_path / "reference" / "model_final.pth")
    assert final["iteration"] == uninterrupted["iteration"] == 9
    steps = [int(s["step"]) for s in final["trainer"]["optimizer"]["state"].values()]
    assert steps and set(steps) == {int(s["step"]) for s in uninterrupted["trainer"]["optimizer"]["state"].values()} == {10}


def test_checkpointer_reads_files_as_data(tmp_path):
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": state, "args": Path("trusted")}, unsafe)
    with pytest.raises(UnsafeCheckpointError, match=r"pathlib.*allow_pickle=True"):
        APTCheckpointer(model).load(str(unsafe))
    APTCheckpointer(model, allow_pickle=True).load(str(unsafe))

    torch.save({"model": state}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth is not a readable checkpoint"):
        APTCheckpointer(model).load(str(truncated))


def test_model_zoo_pkl_is_read_as_data_with_matching_heuristics(tmp_path):
    """A detectron2 model-zoo .pkl (numpy arrays, keys without the detector's prefix, as
    converted MAE / ViTDet weights are) loads by suffix matching; one with other Python
    objects is refused unless allow_pickle."""
    source = tiny_model()
    net = {k[len("backbone.net."):]: v.numpy().copy() for k, v in source.state_dict().items() if k.startswith("backbone.net.")}
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": net, "__author__": "test", "matching_heuristics": True}))
    torch.manual_seed(1)
    model = instantiate(LazyConfig.load(str(CONFIG)).model)
    APTCheckpointer(model).load(str(path))
    for key, value in net.items():
        assert np.array_equal(model.state_dict()["backbone.net." + key].numpy(), value), key

    path.write_bytes(pickle.dumps({"model": net, "__author__": "test", "created": Path("x")}))
    with pytest.raises(UnsafeCheckpointError, match="pathlib"):
        APTCheckpointer(model).load(str(path))
    assert "created" in APTCheckpointer(model, allow_pickle=True).load(str(path))


def test_convert_checkpoint_rejects_broken_files_in_one_line(tmp_path, capsys):
    sys.path.insert(0, str(TOOLS))
    import convert_checkpoint

    good = tmp_path / "good.pt"
    torch.save({"module": {f"blocks.0.w{i}": torch.randn(64, 64) for i in range(4)}}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "short.pt").write_bytes(data[:200])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"module": {"blocks.0.w": torch.zeros(1)}, "args": Path("x")}, tmp_path / "pickled.pt")
    target = tmp_path / "out.pth"
    for name in ["truncated.pt", "short.pt", "random.pt", "pickled.pt", "missing.pt"]:
        assert convert_checkpoint.main([str(tmp_path / name), str(target)]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith(f"convert_checkpoint: cannot convert {tmp_path / name}") and err.count("\n") == 1, err
    assert not target.exists()
    assert convert_checkpoint.main(["--unsafe-load", str(tmp_path / "pickled.pt"), str(target)]) == 0
    assert list(torch.load(target)["model"]) == ["backbone.net.blocks.0.w"]

    run = subprocess.run([sys.executable, str(TOOLS / "convert_checkpoint.py"), str(tmp_path / "random.pt"), str(target)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr

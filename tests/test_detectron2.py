"""detectron2 plugin. Skipped as a whole when detectron2 (not on PyPI) is not installed."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require

require("detectron2", "detectron2")

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling import ViT  # noqa: E402

from apt_dense.detectron2 import (  # noqa: E402
    APTCheckpointer,
    APTViT,
    add_apt_vit_config,
    convert_eva02_pretrain,
    get_apt_vit_lr_decay_rate,
    swap_to_apt,
)
from apt_dense.detectron2.engine import freeze_all_but_apt_layers  # noqa: E402
from apt_dense.detectron2.swap import HOST_VIT_TARGETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = ROOT / "projects"
TINY = dict(embed_dim=64, depth=2, num_heads=2, window_block_indexes=[0], drop_path_rate=0.0)


def shrink(cfg, image_size=256, window=8, **extra):
    net = cfg.model.backbone.net
    net.update(TINY, img_size=image_size, window_size=window, **extra)
    cfg.model.backbone.square_pad = image_size
    return cfg


def tiny_detector(config="apt_mask_rcnn_vitdet_b.py", **extra):
    cfg = shrink(LazyConfig.load(str(PROJECTS / config)), **extra)
    cfg.model.roi_heads.num_classes = 3
    torch.manual_seed(0)
    return cfg, instantiate(cfg.model).eval()


def test_output_shapes_and_strides_through_simple_feature_pyramid():
    cfg, model = tiny_detector("apt_vitdet_b.py", thresholds={32: 3.0, 64: 3.0, 128: 0.3})
    backbone = model.backbone
    assert isinstance(backbone.net, APTViT)
    assert backbone.net.output_shape()["last_feat"].stride == 16
    x = torch.randn(2, 3, 256, 256)
    x[0, :, 128:] = 0.0  # normalised zero padding: merges
    features = backbone(x)
    for name, stride in zip(["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64]):
        assert backbone.output_shape()[name].stride == stride
        assert features[name].shape == (2, 256, 256 // stride, 256 // stride)
    assert backbone.net.token_stats.tokens < 2 * 16 * 16


def test_backbone_pads_to_the_largest_patch_and_crops_back():
    net = APTViT(img_size=256, window_size=8, window_block_indexes=[0], thresholds={32: 3.0, 64: 3.0, 128: 0.3},
                 embed_dim=32, depth=2, num_heads=2).eval()
    out = net(torch.randn(1, 3, 144, 208))["last_feat"]
    assert out.shape == (1, 32, 9, 13)
    assert net.size_divisibility == 128


def test_yacs_registry_builder():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    add_apt_vit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_apt_vit_fpn_backbone"
    c = cfg.MODEL.APT_VIT
    c.IMG_SIZE, c.EMBED_DIM, c.DEPTH, c.NUM_HEADS, c.WINDOW_SIZE, c.WINDOW_BLOCK_INDEXES = 256, 32, 2, 2, 8, [0]
    c.SQUARE_PAD = 256
    backbone = build_backbone(cfg)
    assert backbone.net.planner.input_format == "BGR" and backbone.net.planner.schedule.threshold_map() == {32: 5.5}
    assert set(backbone(torch.randn(1, 3, 256, 256))) == {"p2", "p3", "p4", "p5", "p6"}


def test_command_line_threshold_override_replaces_the_configs():
    # LazyConfig's key=value override adds the key "32" beside the config's 32: the later one wins
    cfg = shrink(LazyConfig.load(str(PROJECTS / "apt_vitdet_b.py")))
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.net.thresholds.32=1.5"])
    assert set(cfg.model.backbone.net.thresholds) == {32, 64, 128, "32"}
    net = instantiate(cfg.model.backbone).net
    assert net.planner.schedule.threshold_map() == {32: 1.5, 64: 2.0, 128: 0.3}


def test_window_arguments_keep_detectron2s_meaning():
    # detectron2's ViT attends within windows only in listed blocks: a window size alone is global
    args = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, thresholds={32: 3.0})
    assert APTViT(window_size=14, window_block_indexes=[], **args).window_size == 0
    assert APTViT(window_size=0, window_block_indexes=[0], **args).attention_backends("cpu", torch.float32) == {"global": "sdpa"}
    assert APTViT(window_size=2, window_block_indexes=[0], **args).window_size == 2


@pytest.mark.parametrize("config", ["apt_mask_rcnn_vitdet_b.py", "apt_vitdet_b.py", "apt_vitdet_l.py",
                                    "apt_vitdet_l_finetune.py", "apt_tiny_e2e.py"])
def test_project_configs_build_and_reload(config, tmp_path):
    cfg = LazyConfig.load(str(PROJECTS / config))
    assert cfg.model.backbone.net._target_ is APTViT
    assert cfg.model.backbone.square_pad % max(cfg.model.backbone.net.thresholds) == 0
    shrink(cfg, image_size=cfg.model.backbone.square_pad, window=cfg.model.backbone.net.window_size)
    LazyConfig.save(cfg, str(tmp_path / "saved.yaml"))
    reloaded = LazyConfig.load(str(tmp_path / "saved.yaml"))
    assert reloaded.model.backbone.net._target_ == "apt_dense.detectron2.APTViT"
    assert isinstance(instantiate(reloaded.model.backbone).net, APTViT)


def test_eva02_configs_follow_the_paper():
    b = LazyConfig.load(str(PROJECTS / "apt_vitdet_b.py"))
    large = LazyConfig.load(str(PROJECTS / "apt_vitdet_l.py"))
    fine = LazyConfig.load(str(PROJECTS / "apt_vitdet_l_finetune.py"))
    assert dict(large.model.backbone.net.thresholds) == {32: 2.0, 64: 2.0, 128: 0.3}
    assert (b.model.backbone.net.img_size, b.model.backbone.net.window_size, b.model.backbone.net.rope) == (1536, 32, True)
    assert [i for i in range(24) if i not in large.model.backbone.net.window_block_indexes] == list(range(2, 24, 3))
    assert fine.train.apt_layers_only and fine.train.max_iter == large.train.max_iter // 20
    assert fine.optimizer.lr == pytest.approx(large.optimizer.lr / 10)


def test_swap_on_detectron2_vitdet_configs():
    cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py")
    assert cfg.model.backbone.net._target_ is ViT
    swap_to_apt(cfg)
    net = cfg.model.backbone.net
    assert net._target_ is APTViT
    assert dict(net.thresholds) == {32: 2.0}  # window 14 cells only fits 32 px patches
    assert list(net.pixel_mean) == list(cfg.model.pixel_mean) and net.input_format == "RGB"
    with pytest.raises(ValueError, match="already APTViT"):
        swap_to_apt(cfg)
    vitdet_project = Path(sys.modules["detectron2"].__file__).parents[1] / "projects/ViTDet/configs/COCO"
    for path in sorted(vitdet_project.glob("*vitdet_[bl]_100ep.py")):
        project_cfg = swap_to_apt(LazyConfig.load(str(path)))
        assert project_cfg.model.backbone.net._target_ is APTViT, path


@pytest.mark.parametrize("config, found", [
    ("common/models/mask_rcnn_fpn.py", "its model.backbone is detectron2.modeling.backbone.fpn.FPN, which has no ViT 'net'"),
    ("common/models/mask_rcnn_c4.py", "its model.backbone is detectron2.modeling.backbone.resnet.ResNet, which has no ViT 'net'"),
    ("common/train.py", "it has no model.backbone"),
])
def test_swap_rejects_configs_without_a_vit(config, found):
    with pytest.raises(ValueError, match=re.escape(f"model.backbone.net is detectron2's ViT ({HOST_VIT_TARGETS[0]}), but {found}")):
        swap_to_apt(model_zoo.get_config(config))


def test_adaptive_off_detector_equals_detectron2_vitdet():
    """Same weights, same images: boxes, scores, classes and masks of detectron2's own ViTDet."""
    ref_cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py")
    ref_cfg.model.backbone.net.update(TINY, img_size=256, window_size=6, rel_pos_zero_init=False)
    ref_cfg.model.backbone.square_pad = 256
    ref_cfg.model.roi_heads.num_classes = 3
    torch.manual_seed(0)
    reference = instantiate(ref_cfg.model).eval()
    cfg, apt = tiny_detector(window=6, adaptive=False, rel_pos_zero_init=False)
    missing, unexpected = apt.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all("patch_embed.downsample" in k or "patch_embed.detail" in k for k in missing)
    inputs = [{"image": torch.randint(0, 255, (3, 200, 256)).float(), "height": 200, "width": 256} for _ in range(2)]
    with torch.no_grad():
        ours, theirs = apt(inputs), reference(inputs)
    for a, b in zip(ours, theirs):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3


def _eva_detection_state(model):
    """A synthetic EVA-02 detection checkpoint: the model's tensors under EVA's key names,
    plus EVA's RoPE buffers."""
    state = {k: v.clone() for k, v in model.state_dict().items() if "patch_embed.downsample" not in k and "patch_embed.detail" not in k}
    head_dim = 64 // 2
    state["backbone.net.rope_win.freqs_cos"] = torch.zeros(64, head_dim)
    state["backbone.net.rope_glb.freqs_sin"] = torch.zeros(256, head_dim)
    state["backbone.net.blocks.0.attn.rope.freqs_cos"] = torch.zeros(64, head_dim)
    return state


def test_checkpoint_loading_reports_apt_layers_and_fails_on_shapes(tmp_path, caplog):
    _, model = tiny_detector("apt_vitdet_b.py")
    state = _eva_detection_state(model)
    assert "backbone.net.blocks.0.attn.q_bias" in state and "backbone.net.blocks.1.mlp.ffn_ln.weight" in state
    path = tmp_path / "eva02_det.pth"
    torch.save({"model": state}, path)
    _, fresh = tiny_detector("apt_vitdet_b.py")
    with caplog.at_level("INFO"):
        APTCheckpointer(fresh).load(str(path))
    assert "APT layers not in the checkpoint" in caplog.text and "RoPE buffers" in caplog.text
    for key, value in state.items():
        if "rope" not in key:
            assert torch.equal(fresh.state_dict()[key], value), key
    state["backbone.net.blocks.0.attn.q_proj.weight"] = torch.zeros(32, 64)
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*blocks\.0\.attn\.q_proj\.weight"):
        APTCheckpointer(fresh).load(str(path))


def test_vitdet_checkpoint_from_detectron2_vit_loads(tmp_path):
    ref_cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py")
    ref_cfg.model.backbone.net.update(TINY, img_size=256, window_size=8)
    ref_cfg.model.backbone.square_pad = 256
    ref_cfg.model.roi_heads.num_classes = 3
    path = tmp_path / "vitdet.pth"
    torch.save({"model": instantiate(ref_cfg.model).state_dict()}, path)
    _, model = tiny_detector()
    incompatible = APTCheckpointer(model)._load_model({"model": torch.load(path)["model"]})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys


def test_eva02_pretrain_conversion(tmp_path):
    _, model = tiny_detector("apt_vitdet_b.py")
    net_state = {k[len("backbone.net."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.net.")}
    pretrain = {k: v for k, v in net_state.items() if "patch_embed.downsample" not in k and "patch_embed.detail" not in k}
    pretrain.update({"mask_token": torch.zeros(1, 1, 64), "lm_head.weight": torch.zeros(10, 64), "lm_head.bias": torch.zeros(10),
                     "norm.weight": torch.ones(64), "norm.bias": torch.zeros(64), "cls_token": torch.zeros(1, 1, 64),
                     "rope.freqs_cos": torch.zeros(256, 32), "rope.freqs_sin": torch.zeros(256, 32)})
    converted, dropped = convert_eva02_pretrain({"module": pretrain})
    assert sorted(dropped) == sorted(["mask_token", "lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias", "cls_token",
                                      "rope.freqs_cos", "rope.freqs_sin"])
    assert all(k.startswith("backbone.net.") for k in converted)
    src = tmp_path / "pt.pt"
    torch.save({"module": pretrain}, src)
    out = tmp_path / "det.pth"
    subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), str(src), str(out)], check=True)
    _, fresh = tiny_detector("apt_vitdet_b.py")
    incompatible = APTCheckpointer(fresh)._load_model({"model": torch.load(out)["model"]})
    assert not incompatible.unexpected_keys
    assert all(not k.startswith("backbone.net.") for k in incompatible.missing_keys)  # only heads/neck missing
    with pytest.raises(ValueError, match="no transformer blocks"):
        convert_eva02_pretrain({"lm_head.weight": torch.zeros(1)})


def test_lr_decay_and_apt_only_finetune():
    rate, layers = 0.5, 2
    assert get_apt_vit_lr_decay_rate("backbone.net.patch_embed.detail.weight", rate, layers) == 1.0
    assert get_apt_vit_lr_decay_rate("backbone.net.patch_embed.downsample.bias", rate, layers) == 1.0
    assert get_apt_vit_lr_decay_rate("backbone.net.patch_embed.proj.weight", rate, layers) == rate**3
    assert get_apt_vit_lr_decay_rate("backbone.net.blocks.1.attn.qkv.weight", rate, layers) == rate
    assert get_apt_vit_lr_decay_rate("roi_heads.box_head.fc1.weight", rate, layers) == 1.0
    _, model = tiny_detector()
    trainable = freeze_all_but_apt_layers(model)
    assert trainable == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all("patch_embed.downsample" in n or "patch_embed.detail" in n for n in trainable) and len(trainable) == 4


@pytest.mark.slow
def test_train_and_evaluate_tiny_coco(tmp_path):
    """tools/train_net.py trains the tiny config for 30 iterations on CPU and evaluates with
    COCOEvaluator; tools/eval_coco.py evaluates the checkpoint."""
    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_coco import make_tiny_coco

    train_json, train_images = make_tiny_coco(tmp_path / "train", 8, 256, seed=0)
    val_json, val_images = make_tiny_coco(tmp_path / "val", 4, 256, seed=1)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools/train_net.py"), "--config-file", str(PROJECTS / "apt_tiny_e2e.py"),
         "--coco-dataset", "apt_tiny_train", str(train_json), str(train_images),
         "--coco-dataset", "apt_tiny_val", str(val_json), str(val_images), f"train.output_dir={out}"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log and "copypaste: Task: apt" in log
    assert "apt_train/kept_fraction" in (out / "metrics.json").read_text()
    evaluation = subprocess.run(
        [sys.executable, str(ROOT / "tools/eval_coco.py"), "--config-file", str(PROJECTS / "apt_tiny_e2e.py"),
         "--checkpoint", str(out / "model_final.pth"), "--images", str(val_images), "--annotations", str(val_json),
         "--output-dir", str(tmp_path / "eval")],
        capture_output=True, text=True, timeout=300,
    )
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    assert "bbox: AP" in evaluation.stdout and "mean tokens kept:" in evaluation.stdout


def test_train_net_apt_flag_swaps_a_vitdet_config():
    sys.path.insert(0, str(ROOT / "tools"))
    import train_net

    config = Path(model_zoo.get_config_file("common/models/mask_rcnn_vitdet.py"))
    args = train_net.argument_parser().parse_args(["--config-file", str(config), "--apt", "model.backbone.net.depth=2"])
    cfg = LazyConfig.load(args.config_file)
    swap_to_apt(cfg)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    assert cfg.model.backbone.net._target_ is APTViT and cfg.model.backbone.net.depth == 2


@pytest.mark.slow
def test_benchmark_full_level_with_a_detector(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import benchmark

    args = ["--host", "eva02_b_det", "--setting", "detection", "--size", "128", "--window", "8", "--depth", "1",
            "--limit", "1", "--repeats", "1", "--warmup", "0", "--scales", "1", "--level", "full",
            "--output-dir", str(tmp_path), "--tag", "det"]
    assert benchmark.main(args) == 0
    row = __import__("json").loads((tmp_path / "det.json").read_text())["rows"][0]
    assert row["ideal_speedup"] >= 1.0 and row["speedup"] > 0


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_detector_blocks_compile_once_for_a_stream():
    """``model.backbone.net.compile_blocks()`` inside a Cascade Mask R-CNN: batches with different
    token counts reuse the first batch's graphs, and the pyramid equals the eager one."""
    from torch._dynamo.testing import CompileCounterWithBackend

    _, model = tiny_detector("apt_vitdet_b.py", image_size=128, thresholds={32: 5.5, 64: 5.5, 128: 0.3})
    stream = []
    for seed in range(3):
        images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed)) * 255
        images[0, :, : 32 * (seed + 1)] = 30.0  # a different flat area per batch: new token counts
        stream.append([{"image": image, "height": 128, "width": 128} for image in images])
    pyramid = lambda inputs: model.backbone(model.preprocess_image(inputs).tensor)  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        eager = [pyramid(inputs) for inputs in stream]
        model.backbone.net.compile_blocks(backend=counter)
        model(stream[0])
        frames = counter.frame_count
        detections = [model(inputs) for inputs in stream[1:]]
        compiled = [pyramid(inputs) for inputs in stream]
    assert frames > 0 and counter.frame_count == frames, "recompiled for a batch with another token count"
    assert all("instances" in result for results in detections for result in results)
    for levels, reference in zip(compiled, eager):
        for name in reference:
            torch.testing.assert_close(levels[name], reference[name], atol=1e-4, rtol=1e-4)

"""mmsegmentation plugin. Skipped as a whole without mmsegmentation 1.x and mmcv's compiled ops."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import require_openmmlab

require_openmmlab("mmcv._ext", "mmcv.ops", "mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

from apt_dense.mmseg import APTViTSegBackbone, convert_eva02_seg_checkpoint, load_apt_checkpoint  # noqa: E402
from dense_reference import dense_forward  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
register_all_modules()
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_CONFIGS = ["apt_upernet_eva02_b_512_ade20k.py", "dense_upernet_eva02_b_512_ade20k.py", "apt_upernet_eva02_l_512_ade20k.py",
               "apt_upernet_eva02_l_640_ade20k.py", "apt_upernet_eva02_l_512_ade20k_finetune.py", "apt_upernet_tiny_e2e.py"]
TINY_BACKBONE = dict(embed_dim=64, depth=4, num_heads=2, out_indices=[0, 1, 2, 3], fpn_norm_cfg=dict(type="BN"), drop_path_rate=0.0)


def tiny_model(config="apt_upernet_eva02_b_512_ade20k.py", **backbone):
    cfg = Config.fromfile(str(CONFIGS / config))
    cfg.model.backbone.update(TINY_BACKBONE, **backbone)
    bn = dict(type="BN", requires_grad=True)
    cfg.model.decode_head.update(in_channels=[64] * 4, channels=32, norm_cfg=bn)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16, norm_cfg=bn)
    torch.manual_seed(0)
    return cfg, MODELS.build(cfg.model).eval()


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_configs_build_from_the_registry(config):
    cfg, model = tiny_model(config)
    assert isinstance(model.backbone, APTViTSegBackbone)
    assert cfg.model.backbone.thresholds == ({32: 5.0} if "tiny" in config else {32: 5.75})
    assert model.backbone.planner.merges == ("dense" not in config)
    assert cfg.model.test_cfg.mode == "slide"
    assert list(cfg.model.backbone.pixel_mean) == list(cfg.model.data_preprocessor.mean)


def test_paper_settings_in_configs():
    large = Config.fromfile(str(CONFIGS / "apt_upernet_eva02_l_640_ade20k.py"))
    assert large.model.backbone.out_indices == [7, 11, 15, 23] and large.model.backbone.img_size == 640
    assert large.model.test_cfg.stride == (426, 426) and large.model.decode_head.channels == 1536
    base = Config.fromfile(str(CONFIGS / "apt_upernet_eva02_b_512_ade20k.py"))
    assert base.model.test_cfg.stride == (341, 341) and base.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.85


def test_output_shapes_and_strides_for_uperhead():
    _, model = tiny_model()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        features = model.backbone(x)
        logits = model.decode_head(features)
    assert [f.shape[-2:] for f in features] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert logits.shape == (2, 150, 32, 24)


def test_smaller_than_crop_and_non_square_inputs_through_slide_inference():
    _, model = tiny_model()
    from mmseg.structures import SegDataSample

    for h, w in [(100, 72), (600, 200)]:
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        with torch.no_grad():
            out = model.predict(torch.randn(1, 3, h, w), [sample])
        assert out[0].pred_sem_seg.data.shape == (1, h, w)


def test_adaptive_off_equals_dense_eva02_segmentation_backbone():
    _, model = tiny_model(adaptive=False, img_size=128)
    backbone = model.backbone
    with torch.no_grad():
        backbone.cls_token.normal_()
        for name, p in backbone.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    state = {k: v for k, v in backbone.state_dict().items()}
    x = torch.randn(2, 3, 128, 96)
    ref_cfg = dict(block_type="eva02", num_heads=2, depth=4, patch_size=16, window_size=0, window_block_indexes=(),
                   img_size=128, eps=1e-6, has_cls=True, out_indices=(0, 1, 2, 3))
    with torch.no_grad():
        ours = backbone(x)
        blocks = dense_forward(state, ref_cfg, x)
        ref = [op(f) for op, f in zip((backbone.fpn1, backbone.fpn2, backbone.fpn3, backbone.fpn4), blocks)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def eva02_checkpoint(model):
    """A synthetic mmseg 0.x EVA-02 UperNet checkpoint: real key names plus EVA2's RoPE buffers."""
    state = {k: v.clone() for k, v in model.state_dict().items() if "patch_embed.downsample" not in k and "patch_embed.detail" not in k}
    state["backbone.rope.freqs_cos"] = torch.zeros(64, 32)
    state["backbone.rope.freqs_sin"] = torch.zeros(64, 32)
    state["backbone.blocks.0.attn.rope.freqs_cos"] = torch.zeros(64, 32)
    return {"meta": {"mmseg_version": "0.29.1"}, "state_dict": state}


def test_checkpoint_loading_with_eva02_key_names(tmp_path, caplog):
    _, source = tiny_model()
    checkpoint = eva02_checkpoint(source)
    for key in ("backbone.cls_token", "backbone.pos_embed", "backbone.fpn1.1.running_mean", "backbone.fpn2.0.weight",
                "backbone.blocks.3.attn.q_bias", "decode_head.conv_seg.weight", "auxiliary_head.conv_seg.weight"):
        assert key in checkpoint["state_dict"], key
    path = tmp_path / "eva02_upernet.pth"
    torch.save(checkpoint, path)
    _, model = tiny_model()
    with caplog.at_level("INFO"):
        missing, unexpected = load_apt_checkpoint(model, str(path))
    assert missing == [] and unexpected == []
    assert "APT layers not in the checkpoint" in caplog.text
    for key, value in checkpoint["state_dict"].items():
        if "rope" not in key:
            assert torch.equal(model.state_dict()[key], value), key
    converted, dropped = convert_eva02_seg_checkpoint(checkpoint)
    assert sorted(dropped) == sorted(k for k in checkpoint["state_dict"] if "rope" in k)
    checkpoint["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(19, 32, 1, 1)
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*decode_head\.conv_seg\.weight"):
        load_apt_checkpoint(model, checkpoint)
    with pytest.raises(ValueError, match="EVA-02 segmentation checkpoint"):
        convert_eva02_seg_checkpoint({"state_dict": {"decode_head.x": torch.zeros(1)}})


def test_layer_decay_optimizer_groups():
    cfg, model = tiny_model()
    cfg.optim_wrapper.paramwise_cfg.num_layers = 4
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr, rate = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    by_name = {name: group for group in wrapper.optimizer.param_groups for name in group["param_names"]}
    assert by_name["backbone.blocks.3.attn.q_proj.weight"]["lr"] == pytest.approx(lr * rate)
    assert by_name["backbone.blocks.0.mlp.w1.weight"]["lr"] == pytest.approx(lr * rate**4)
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(lr * rate**5)
    assert by_name["backbone.cls_token"]["lr"] == pytest.approx(lr * rate**5)
    for name in ("backbone.patch_embed.detail.weight", "backbone.patch_embed.downsample.weight",
                 "backbone.fpn1.0.weight", "decode_head.conv_seg.weight"):
        assert by_name[name]["lr"] == pytest.approx(lr), name
    assert by_name["backbone.blocks.3.attn.q_bias"]["weight_decay"] == 0.0
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.3.attn.q_proj.weight"]["weight_decay"] == 0.05
    assert len(by_name) == sum(1 for p in model.parameters() if p.requires_grad)


def test_apt_only_finetune_config_freezes_everything_else():
    cfg, model = tiny_model("apt_upernet_eva02_l_512_ade20k_finetune.py")
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    names = sorted(n for g in wrapper.optimizer.param_groups for n in g["param_names"])
    assert names and all("patch_embed.downsample" in n or "patch_embed.detail" in n for n in names)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == names


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_values=0.1), "init_values"),
        (dict(use_rel_pos_bias=True), "use_rel_pos_bias"),
        (dict(out_indices=[1, 2, 3]), "four block indices"),
        (dict(patch_size=14), "patch_size 16"),
        (dict(thresholds={32: float("nan")}), "finite"),
        (dict(window_size=8, window_block_indexes=[0]), "global attention in every block"),
        (dict(window_size=4), "global attention in every block; drop window_size"),  # ran without windows
        (dict(out_indices="0, 1, 2, 3"), r"out_indices must be a list .* write out_indices=\[0, 1, 2, 3\]"),
        (dict(embed_dim=64.0), r"embed_dim must be an integer, got 64.0 \(float\); write embed_dim=64"),
    ],
)
def test_bad_backbone_configs(kwargs, match):
    args = dict(TINY_BACKBONE, img_size=128)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        APTViTSegBackbone(**args)


def test_cfg_options_threshold_override_replaces_the_configs():
    # --cfg-options model.backbone.thresholds.32=4.0 merges the key "32" beside the config's 32
    cfg = Config.fromfile(str(CONFIGS / "apt_upernet_eva02_b_512_ade20k.py"))
    cfg.merge_from_dict({"model.backbone.thresholds.32": 4.0})
    assert set(cfg.model.backbone.thresholds) == {32, "32"}
    cfg.model.backbone.update(TINY_BACKBONE)
    backbone = MODELS.build(cfg.model.backbone)
    assert backbone.planner.schedule.threshold_map() == {32: 4.0}


def test_mmengine_training_checkpoint_loads(tmp_path):
    # what APTRunner saves: the model's state dict with the message hub's log buffers beside it
    from mmengine.logging import MessageHub

    _, source = tiny_model()
    hub = MessageHub.get_instance("apt_seg_checkpoint_test")
    hub.update_scalar("train/loss", 1.5)
    path = tmp_path / "iter_20.pth"
    torch.save({"meta": {"iter": 20}, "state_dict": source.state_dict(), "message_hub": hub.state_dict()}, path)
    _, model = tiny_model()
    assert load_apt_checkpoint(model, path) == ([], [])


@pytest.mark.slow
def test_train_and_test_tiny_ade20k(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_ade20k import make_tiny_ade20k

    root = make_tiny_ade20k(tmp_path / "ade", train=8, val=4, size=160)
    work = tmp_path / "work"
    train = subprocess.run([sys.executable, str(ROOT / "tools/train_seg.py"), str(CONFIGS / "apt_upernet_tiny_e2e.py"),
                            "--work-dir", str(work), "--data-root", str(root)], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    log = next(work.glob("*/*.log")).read_text()
    assert "APT val: mean fraction of tokens kept" in log and "mIoU" in log and "train/apt_kept_fraction" not in log
    assert "apt_kept_fraction" in log
    test = subprocess.run([sys.executable, str(ROOT / "tools/test_seg.py"), str(CONFIGS / "apt_upernet_tiny_e2e.py"),
                           str(work / "iter_20.pth"), "--work-dir", str(tmp_path / "test"), "--data-root", str(root)],
                          capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert "mIoU" in test.stdout and "aAcc" in test.stdout and "apt_kept_fraction" in test.stdout

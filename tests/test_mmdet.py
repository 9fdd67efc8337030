"""MMDetection 3.x plugin. Skipped as a whole without mmdet and mmcv's compiled ops."""
import json
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_openmmlab

require_openmmlab("mmcv._ext", "mmcv.ops", "mmdet")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmdet.registry import DATASETS, MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from apt_dense.checkpoints import (  # noqa: E402
    UnsafeCheckpointError, is_apt_layer, load_state_dict_checked, read_checkpoint, unwrap_state_dict,
)
from apt_dense.mmdet import APTSimpleFPN, APTViTDetBackbone, load_pretrained_backbone  # noqa: E402
from dense_reference import dense_forward  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
register_all_modules(init_default_scope=False)
ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "configs" / "mmdet"
VITDET = "apt_vitdet_mask-rcnn_vit-b_1024_coco.py"
EVA02 = "apt_eva02_cascade-mask-rcnn_vit-l_1536_coco.py"
ALL_CONFIGS = [VITDET, "dense_vitdet_mask-rcnn_vit-b_1024_coco.py", EVA02,
               "apt_eva02_cascade-mask-rcnn_vit-l_1536_coco_finetune.py", "apt_vitdet_mask-rcnn_tiny_e2e.py"]
PIXEL_MEAN, PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
C = 32  # neck / head channels of the tiny models


@pytest.fixture(scope="module", autouse=True)
def mmdet_scope():
    """Build in mmdet's registry scope; the mmseg tests of the same session use mmseg's."""
    with DefaultScope.overwrite_default_scope("mmdet"):
        yield


def tiny_cfg(config=VITDET, **backbone):
    """A config with every width shrunk (64-dim, 4-block ViT; 32-channel neck and heads), no pretrained file."""
    cfg = Config.fromfile(str(CONFIGS / config))
    cfg.model.backbone.update(dict(embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.0, window_block_indexes=[0, 1, 3],
                                   use_act_checkpoint=False, init_cfg=None), **backbone)
    cfg.model.neck.update(backbone_channel=64, in_channels=[16, 32, 64, 64], out_channels=C)
    cfg.model.rpn_head.update(in_channels=C, feat_channels=C)
    roi = cfg.model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = C
    for head in roi.bbox_head if isinstance(roi.bbox_head, list) else [roi.bbox_head]:
        head.update(in_channels=C, conv_out_channels=C, fc_out_channels=64, num_classes=2)
    roi.mask_head.update(in_channels=C, conv_out_channels=C, num_classes=2)
    cfg.optim_wrapper.paramwise_cfg.num_layers = 4
    cfg.optim_wrapper.type = "OptimWrapper"  # AmpOptimWrapper needs CUDA
    return cfg


def build(cfg):
    torch.manual_seed(0)
    return MODELS.build(cfg.model).eval()


def perturb(module, scale=0.1, seed=1):
    """Non-trivial norms, biases and relative positions (initialisation leaves them 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif p.ndim == 1:
                p.copy_(1 + torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_configs_build_from_the_registry(config):
    cfg = tiny_cfg(config)
    model = build(cfg)
    assert isinstance(model.backbone, APTViTDetBackbone) and isinstance(model.neck, APTSimpleFPN)
    assert cfg.runner_type == "APTRunner" and cfg.custom_imports.imports == ["apt_dense.mmdet"]
    assert [h.type for h in cfg.custom_hooks] == ["APTTokenStatsHook"]
    assert cfg.optim_wrapper.constructor == "APTLayerDecayOptimizerConstructor"
    assert cfg.val_evaluator.type == "CocoMetric" and list(cfg.val_evaluator.metric) == ["bbox", "segm"]
    assert list(cfg.model.backbone.pixel_mean) == list(cfg.model.data_preprocessor.mean) == PIXEL_MEAN
    assert list(cfg.model.backbone.pixel_std) == list(cfg.model.data_preprocessor.std) == PIXEL_STD
    assert model.backbone.planner.merges == ("dense" not in config)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        outs = model.neck(model.backbone(x))
    assert [o.shape[-1] for o in outs] == [64, 32, 16, 8, 4]
    assert model.backbone.token_stats.images == 1


def test_paper_settings_in_configs():
    vitdet = Config.fromfile(str(CONFIGS / VITDET))
    b = vitdet.model.backbone
    assert (b.img_size, b.window_size, b.use_rel_pos, b.thresholds) == (1024, 14, True, {32: 2.0})
    assert b.window_block_indexes == [0, 1, 3, 4, 6, 7, 9, 10] and b.init_cfg.checkpoint == "mae_pretrain_vit_base.pth"
    assert vitdet.model.roi_head.bbox_head.type == "Shared4Conv1FCBBoxHead" and vitdet.model.rpn_head.num_convs == 2
    eva = Config.fromfile(str(CONFIGS / EVA02))
    b = eva.model.backbone
    assert (b.block_type, b.img_size, b.embed_dim, b.depth, b.window_size) == ("eva02", 1536, 1024, 24, 32)
    assert b.thresholds == {32: 2.0, 64: 2.0, 128: 0.3} and b.norm_cfg.eps == 1e-6
    assert [i for i in range(24) if i not in b.window_block_indexes] == list(range(2, 24, 3))
    assert eva.model.type == "CascadeRCNN" and len(eva.model.roi_head.bbox_head) == 3
    assert all(h.reg_class_agnostic and h.norm_cfg.type == "APTLN2d" for h in eva.model.roi_head.bbox_head)
    assert eva.optim_wrapper.paramwise_cfg == dict(num_layers=24, layer_decay_rate=0.8)
    finetune = Config.fromfile(str(CONFIGS / "apt_eva02_cascade-mask-rcnn_vit-l_1536_coco_finetune.py"))
    assert finetune.optim_wrapper.paramwise_cfg.apt_layers_only
    assert finetune.optim_wrapper.optimizer.lr == pytest.approx(eva.optim_wrapper.optimizer.lr / 10)
    assert finetune.train_cfg.max_iters == eva.train_cfg.max_iters // 20
    assert finetune.model.backbone.init_cfg is None
    dense = Config.fromfile(str(CONFIGS / "dense_vitdet_mask-rcnn_vit-b_1024_coco.py"))
    assert dense.model.backbone.adaptive is False and dense.find_unused_parameters
    tiny = Config.fromfile(str(CONFIGS / "apt_vitdet_mask-rcnn_tiny_e2e.py"))
    assert tiny.optim_wrapper.type == "OptimWrapper" and tiny.env_cfg.dist_cfg.backend == "gloo"
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in MODELS.build(tiny.model).modules())


def test_norm_eps_follow_mmdet_vitdet():
    """mmcv's build_norm_layer gives LN / LN2d eps 1e-5 unless the config sets it (mmdet's ViTDet);
    EVA-02 sets 1e-6."""
    model = build(tiny_cfg())
    assert model.backbone.blocks[0].norm1.eps == 1e-5 and model.neck.fpn1[1].eps == 1e-5
    assert model.neck.lateral_convs[0].norm_name == "norm_layer"
    assert model.roi_head.bbox_head.shared_convs[0].norm.eps == 1e-5
    eva = build(tiny_cfg(EVA02, window_size=8))
    assert eva.backbone.blocks[0].norm1.eps == 1e-6 and eva.backbone.blocks[0].mlp.ffn_ln.eps == 1e-6


def vitdet_b_keys() -> dict:
    """Backbone and neck keys and shapes of mmdet's ViTDet-B Mask R-CNN (projects/ViTDet, as built by
    mmdet), plus the APT layers."""
    keys = {"pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
            "patch_embed.downsample.weight": (768, 768, 2, 2), "patch_embed.downsample.bias": (768,),
            "patch_embed.detail.weight": (768, 768), "patch_embed.detail.bias": (768,)}
    for i in range(12):
        rel = (27, 64) if i in (0, 1, 3, 4, 6, 7, 9, 10) else (127, 64)
        keys.update({f"blocks.{i}.{k}": s for k, s in {
            "norm1.weight": (768,), "norm1.bias": (768,), "attn.rel_pos_h": rel, "attn.rel_pos_w": rel,
            "attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,), "attn.proj.weight": (768, 768),
            "attn.proj.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,), "mlp.fc1.weight": (3072, 768),
            "mlp.fc1.bias": (3072,), "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,)}.items()})
    keys = {f"backbone.{k}": s for k, s in keys.items()}
    keys.update({"neck.fpn1.0.weight": (768, 384, 2, 2), "neck.fpn1.0.bias": (384,), "neck.fpn1.1.weight": (384,),
                 "neck.fpn1.1.bias": (384,), "neck.fpn1.3.weight": (384, 192, 2, 2), "neck.fpn1.3.bias": (192,),
                 "neck.fpn2.0.weight": (768, 384, 2, 2), "neck.fpn2.0.bias": (384,)})
    for i, ch in enumerate([192, 384, 768, 768]):
        for conv, shape in (("lateral_convs", (256, ch, 1, 1)), ("fpn_convs", (256, 256, 3, 3))):
            keys.update({f"neck.{conv}.{i}.conv.weight": shape, f"neck.{conv}.{i}.norm_layer.weight": (256,),
                         f"neck.{conv}.{i}.norm_layer.bias": (256,)})
    return keys


def test_backbone_and_neck_keys_are_mmdet_vitdet_keys():
    cfg = Config.fromfile(str(CONFIGS / VITDET))
    backbone = MODELS.build(dict(cfg.model.backbone, init_cfg=None))
    neck = MODELS.build(cfg.model.neck)
    ours = {f"backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    ours.update({f"neck.{k}": tuple(v.shape) for k, v in neck.state_dict().items()})
    assert ours == vitdet_b_keys()


def dense_check(block_type, eps, window_size, thresholds, x):
    cfg = tiny_cfg(VITDET if block_type == "vitdet" else EVA02, adaptive=False, img_size=128, window_size=window_size,
                   thresholds=thresholds)
    model = build(cfg)
    perturb(model.backbone)
    perturb(model.neck)
    state = model.backbone.state_dict()
    ref_cfg = dict(block_type=block_type, num_heads=2, depth=4, patch_size=16, window_size=window_size,
                   window_block_indexes=(0, 1, 3), img_size=128, eps=eps, has_cls=True, out_indices=(3,))
    with torch.no_grad():
        ours = model.neck(model.backbone(x))
        ref = model.neck(dense_forward(state, ref_cfg, x)[0].contiguous())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_type, eps, window_size, thresholds", [
    ("vitdet", 1e-5, 4, {32: 2.0}),  # 10x14 grid: windows zero-padded; rel pos interpolated for global blocks
    ("eva02", 1e-6, 8, {32: 2.0, 64: 2.0, 128: 0.3}),
])
def test_adaptive_off_backbone_and_neck_equal_the_dense_reference(block_type, eps, window_size, thresholds):
    x = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(3))
    dense_check(block_type, eps, window_size, thresholds, x)


def test_adaptive_patching_merges_flat_regions_and_counts_tokens():
    model = build(tiny_cfg(EVA02, window_size=8))
    x = torch.randn(2, 3, 256, 256) * 50
    x[0, :, 128:] = 0.0  # flat (normalised padding): merges into large patches
    with torch.no_grad():
        y = model.backbone(x)
    assert y.shape == (2, 64, 16, 16) and y.is_contiguous()
    stats = model.backbone.token_stats
    assert stats.images == 2 and stats.cells == 2 * 256 and stats.tokens < stats.cells


def mmdet_detector_checkpoint(model) -> dict:
    """A synthetic mmdet ViTDet detector checkpoint: the real key names, no APT layers."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not is_apt_layer(k)}
    for key in ("backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.attn.rel_pos_h", "backbone.pos_embed",
                "backbone.patch_embed.proj.weight", "neck.fpn1.1.weight", "neck.lateral_convs.0.conv.weight",
                "neck.lateral_convs.0.norm_layer.weight", "neck.fpn_convs.3.norm_layer.bias",
                "rpn_head.rpn_conv.1.conv.weight", "roi_head.bbox_head.shared_convs.0.norm_layer.weight",
                "roi_head.mask_head.convs.3.norm_layer.weight", "roi_head.mask_head.conv_logits.weight"):
        assert key in state, key
    return {"meta": {"mmdet_version": "3.3.0"}, "state_dict": state}


def test_mmdet_vitdet_detector_checkpoint_loads(tmp_path):
    source = build(tiny_cfg())
    perturb(source)
    path = tmp_path / "vitdet_mask_rcnn.pth"
    torch.save(mmdet_detector_checkpoint(source), path)
    model = build(tiny_cfg())
    missing, unexpected = load_state_dict_checked(model, unwrap_state_dict(read_checkpoint(path)))
    assert missing == [] and unexpected == []  # every key is a model key; only the APT layers are new
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value) or is_apt_layer(key), key


def eva02_detectron2_checkpoint(backbone) -> dict:
    """A synthetic EVA-02 detection checkpoint (detectron2 layout, ``backbone.net.*``) with RoPE tables,
    the simple feature pyramid and heads."""
    state = {f"backbone.net.{k}": v.clone() for k, v in backbone.state_dict().items() if not is_apt_layer(k)}
    for key in ("backbone.net.blocks.0.attn.q_proj.weight", "backbone.net.blocks.0.attn.q_bias",
                "backbone.net.blocks.0.attn.v_bias", "backbone.net.blocks.0.mlp.ffn_ln.weight",
                "backbone.net.blocks.0.mlp.w3.weight"):
        assert key in state, key
    state["backbone.net.rope_win.freqs_cos"] = torch.zeros(64, 32)
    state["backbone.net.blocks.0.attn.rope.freqs_sin"] = torch.zeros(64, 32)
    state["backbone.simfp_2.0.weight"] = torch.zeros(64, 32, 2, 2)
    state["roi_heads.box_predictors.0.cls_score.weight"] = torch.zeros(3, 64)
    return {"model": state, "iteration": 60000}


def eva02_pretraining_checkpoint(backbone) -> dict:
    """EVA-02 MIM weights: unprefixed, with the pretraining-only keys and RoPE tables."""
    state = {k: v.clone() for k, v in backbone.state_dict().items() if not is_apt_layer(k)}
    state.update({"cls_token": torch.zeros(1, 1, 64), "mask_token": torch.zeros(1, 1, 64), "norm.weight": torch.ones(64),
                  "lm_head.weight": torch.zeros(8, 64), "rope.freqs_cos": torch.zeros(64, 32)})
    return {"module": state}


@pytest.mark.parametrize("make", [eva02_detectron2_checkpoint, eva02_pretraining_checkpoint])
def test_eva02_weights_load_through_init_cfg(tmp_path, make):
    source = build(tiny_cfg(EVA02, window_size=8)).backbone
    perturb(source)
    path = tmp_path / "eva02.pth"
    torch.save(make(source), path)
    cfg = tiny_cfg(EVA02, window_size=8, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    model = build(cfg)
    model.init_weights()  # the detector's init_weights reaches the backbone's
    for key, value in source.state_dict().items():
        if not is_apt_layer(key):
            assert torch.equal(model.backbone.state_dict()[key], value), key


def test_mae_weights_report_the_missing_relative_positions(tmp_path):
    source = build(tiny_cfg()).backbone
    state = {k: v for k, v in source.state_dict().items() if "rel_pos" not in k and not is_apt_layer(k)}
    state.update({"cls_token": torch.zeros(1, 1, 64), "norm.weight": torch.ones(64), "norm.bias": torch.zeros(64)})
    torch.save({"model": state}, tmp_path / "mae.pth")
    backbone = build(tiny_cfg()).backbone
    missing, unexpected = load_pretrained_backbone(backbone, tmp_path / "mae.pth")
    assert sorted(missing) == sorted(k for k in backbone.state_dict() if "rel_pos" in k) and unexpected == []


def test_backbone_checkpoints_fail_loudly(tmp_path):
    backbone = build(tiny_cfg()).backbone
    state = {k: v for k, v in backbone.state_dict().items() if not is_apt_layer(k)}
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*blocks\.1\.attn\.qkv\.weight"):
        load_pretrained_backbone(backbone, {"state_dict": dict(state, **{"blocks.1.attn.qkv.weight": torch.zeros(3, 3)})})
    with pytest.raises(ValueError, match="no ViT blocks"):
        load_pretrained_backbone(backbone, {"state_dict": {"decode_head.conv_seg.weight": torch.zeros(1)}})
    torch.save({"model": state, "args": Path("x")}, tmp_path / "pickled.pth")  # a Python object: not data
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        load_pretrained_backbone(backbone, tmp_path / "pickled.pth")
    cfg = tiny_cfg(init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "pickled.pth"), allow_pickle=True))
    build(cfg).backbone.init_weights()  # a trusted legacy file


def test_detectron2_pkl_of_numpy_arrays_loads_through_init_cfg(tmp_path):
    # detectron2's model zoo .pkl: numpy arrays under backbone.net.*, read as data, loaded as tensors
    source = build(tiny_cfg()).backbone
    perturb(source)
    state = {f"backbone.net.{k}": v.numpy() for k, v in source.state_dict().items() if not is_apt_layer(k)}
    state["backbone.simfp_2.0.weight"] = np.zeros((64, 32, 2, 2), np.float32)
    path = tmp_path / "model_final.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    model = build(tiny_cfg(init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value) or is_apt_layer(key), key


def test_mmengine_training_checkpoint_loads_through_init_cfg(tmp_path):
    # what APTRunner saves: the detector's state dict with the message hub's log buffers beside it
    from mmengine.logging import MessageHub

    source = build(tiny_cfg())
    perturb(source)
    hub = MessageHub.get_instance("apt_init_cfg_test")
    hub.update_scalar("train/loss", 1.5)
    path = tmp_path / "iter_20.pth"
    torch.save({"meta": {"iter": 20}, "state_dict": source.state_dict(), "message_hub": hub.state_dict()}, path)
    model = build(tiny_cfg(init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    model.init_weights()
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_cfg_options_threshold_override_replaces_the_configs():
    # --cfg-options model.backbone.thresholds.32=1.5 merges the key "32" beside the config's 32
    cfg = tiny_cfg(EVA02, window_size=8)
    cfg.merge_from_dict({"model.backbone.thresholds.32": 1.5})
    assert set(cfg.model.backbone.thresholds) == {32, 64, 128, "32"}
    assert build(cfg).backbone.planner.schedule.threshold_map() == {32: 1.5, 64: 2.0, 128: 0.3}


TINY_BACKBONE = dict(img_size=128, embed_dim=64, depth=4, num_heads=2, window_size=4, window_block_indexes=[0, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm_cfg=dict(type="BN")), "not a LayerNorm"),
        (dict(init_cfg=dict(type="Kaiming")), r"init_cfg must be dict\(type='Pretrained'"),
        (dict(init_cfg=dict(type="Pretrained", checkpoint="x.pth", prefix="backbone.")), "unsupported: \\['prefix'\\]"),
        (dict(out_indices=[1, 3]), "do not set out_indices"),
        (dict(thresholds={32: 2.0, 64: 2.0}, window_size=14), "not a multiple of the largest patch"),
        (dict(block_type="eva02", use_rel_pos=True), "EVA-02 blocks use RoPE"),
        (dict(block_type="eva02", act_cfg=dict(type="ReLU")), "SwiGLU"),
        (dict(thresholds={32: float("nan")}), "finite"),
        (dict(window_block_indexes=[0, 7]), "out of range"),
        (dict(depth="4"), r"depth must be an integer, got '4' \(str\); write depth=4"),
        (dict(drop_path_rate=1.5), "drop_path_rate must be at least 0 and below 1"),
    ],
)
def test_bad_backbone_configs(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MODELS.build(dict(TINY_BACKBONE, type="APTViT", **kwargs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=[192, 384, 768, 768]), r"do not fit backbone_channel 64.*in_channels=\[16, 32, 64, 64\]"),
        (dict(norm_cfg=None), "needs norm_cfg"),
        (dict(num_outs=3), "at least 4"),
    ],
)
def test_bad_neck_configs(kwargs, match):
    neck = dict(type="APTSimpleFPN", backbone_channel=64, in_channels=[16, 32, 64, 64], out_channels=C, num_outs=5,
                norm_cfg=dict(type="APTLN2d"))
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(neck, **kwargs))


def groups_by_name(cfg, model):
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    return {name: group for group in wrapper.optimizer.param_groups for name in group["param_names"]}


@pytest.mark.parametrize("config, weight", [(VITDET, "attn.qkv.weight"), (EVA02, "attn.q_proj.weight")])
def test_layer_decay_groups_for_mmdet_names(config, weight):
    cfg = tiny_cfg(config, window_size=8)
    model = build(cfg)
    by_name = groups_by_name(cfg, model)
    lr, rate = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    assert by_name[f"backbone.blocks.3.{weight}"]["lr"] == pytest.approx(lr * rate)
    assert by_name[f"backbone.blocks.0.{weight}"]["lr"] == pytest.approx(lr * rate**4)
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(lr * rate**5)
    assert by_name["backbone.pos_embed"]["lr"] == pytest.approx(lr * rate**5)
    head = "roi_head.bbox_head" if config == VITDET else "roi_head.bbox_head.0"  # cascade: one per stage
    for name in ("backbone.patch_embed.detail.weight", "backbone.patch_embed.downsample.weight",
                 "neck.lateral_convs.0.conv.weight", "rpn_head.rpn_cls.weight", f"{head}.fc_cls.weight"):
        assert by_name[name]["lr"] == pytest.approx(lr), name
    wd = cfg.optim_wrapper.optimizer.weight_decay
    assert by_name[f"backbone.blocks.3.{weight}"]["weight_decay"] == wd
    for name in ("backbone.pos_embed", "backbone.blocks.3.norm1.weight", "neck.lateral_convs.0.norm_layer.weight",
                 f"{head}.fc_cls.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert len(by_name) == sum(1 for p in model.parameters() if p.requires_grad)


def test_apt_only_finetune_config_freezes_everything_else():
    cfg = tiny_cfg("apt_eva02_cascade-mask-rcnn_vit-l_1536_coco_finetune.py", window_size=8)
    model = build(cfg)
    names = sorted(groups_by_name(cfg, model))
    assert names == ["backbone.patch_embed.detail.bias", "backbone.patch_embed.detail.weight",
                     "backbone.patch_embed.downsample.bias", "backbone.patch_embed.downsample.weight"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == names


def test_apt_only_finetune_needs_apt_layers():
    cfg = tiny_cfg(thresholds=None)
    cfg.optim_wrapper.paramwise_cfg.apt_layers_only = True
    with pytest.raises(ValueError, match="no APT layers"):
        build_optim_wrapper(build(cfg), cfg.optim_wrapper)


def test_tiny_coco_folder_is_an_mmdet_coco_dataset(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_coco import make_tiny_coco

    make_tiny_coco(tmp_path, num_images=3, size=160)
    cfg = Config.fromfile(str(CONFIGS / "apt_vitdet_mask-rcnn_tiny_e2e.py"))
    cfg.train_dataloader.dataset.data_root = str(tmp_path)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(dataset) == 3 and dataset.metainfo["classes"] == ("square", "disc")
    sample = dataset[0]
    assert tuple(sample["inputs"].shape) == (3, 128, 128)
    assert len(sample["data_samples"].gt_instances) > 0 and sample["data_samples"].gt_instances.masks is not None


def wide_coco(root):
    """A COCO folder holding a 900x300 photo and a square one, one box each (the tiny config's classes)."""
    from PIL import Image
    from skimage import data

    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, (w, h) in enumerate([(900, 300), (256, 256)], start=1):
        Image.fromarray(data.astronaut()).resize((w, h)).save(root / "images" / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", width=w, height=h))
        x, y, side = w // 4, h // 4, min(w, h) // 3
        annotations.append(dict(id=i, image_id=i, category_id=1, bbox=[x, y, side, side], area=side * side, iscrowd=0,
                                segmentation=[[x, y, x + side, y, x + side, y + side, x, y + side]]))
    categories = [dict(id=1, name="square"), dict(id=2, name="disc")]
    (root / "instances.json").write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return root


def test_letterbox_test_pipeline_clips_boxes_to_the_image(tmp_path):
    # the canvas is padded, but img_shape stays the image's: the heads clip boxes to the image
    cfg = Config.fromfile(str(CONFIGS / "apt_vitdet_mask-rcnn_tiny_e2e.py"))
    cfg.test_dataloader.dataset.data_root = str(wide_coco(tmp_path))
    sample = DATASETS.build(cfg.test_dataloader.dataset)[0]
    assert tuple(sample["inputs"].shape) == (3, 128, 128)
    meta = sample["data_samples"].metainfo
    assert meta["ori_shape"] == (300, 900) and meta["img_shape"] == (43, 128)


@pytest.mark.slow
def test_test_det_on_a_wide_image(tmp_path):
    """tools/test_det.py on a 900x300 image: detections in the canvas's padding used to be
    rescaled beyond the image, and mmdet's CPU mask pasting failed on them."""
    from openmmlab_tool_runs import run

    config = CONFIGS / "apt_vitdet_mask-rcnn_tiny_e2e.py"
    torch.manual_seed(0)
    detector = MODELS.build(Config.fromfile(str(config)).model)
    with torch.no_grad():
        for p in detector.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a random detector: boxes anywhere on the canvas
    torch.save({"meta": {}, "state_dict": detector.state_dict()}, tmp_path / "detector.pth")
    root = wide_coco(tmp_path / "coco")
    result = run([str(ROOT / "tools" / "test_det.py"), str(config), str(tmp_path / "detector.pth"),
                  "--work-dir", str(tmp_path / "work"), "--data-root", str(root)])
    assert "coco/segm_mAP:" in result.stdout


def test_mmdet_vit_defaults_and_the_mmseg_plugin_side_by_side():
    """``window_size=0`` makes every block global whatever ``window_block_indexes`` says (mmdet's
    ViT defaults); the mmseg plugin's ``APTViT`` lives in mmseg's registry, not mmdet's."""
    backbone = MODELS.build(dict(type="APTViT", img_size=128, embed_dim=64, depth=2, num_heads=2))
    assert backbone.window_size == 0 and not any(block.use_window for block in backbone.blocks)
    pytest.importorskip("mmseg")
    import apt_dense.mmseg  # noqa: F401
    from mmseg.registry import MODELS as SEG_MODELS

    assert MODELS.get("APTViT") is APTViTDetBackbone and SEG_MODELS.get("APTViT") is apt_dense.mmseg.APTViTSegBackbone


@pytest.mark.slow
@pytest.mark.parametrize("host", ["vitdet_b", "eva02_b_det"])  # Mask R-CNN, Cascade Mask R-CNN
def test_benchmark_full_level_with_mmdet_detectors(tmp_path, host):
    sys.path.insert(0, str(ROOT / "tools"))
    import benchmark

    args = ["--host", host, "--size", "128", "--window", "8", "--depth", "1", "--limit", "1", "--repeats", "1",
            "--warmup", "0", "--thresholds", '{"32": 5, "64": 5}', "--level", "full", "--framework", "mmdet",
            "--output-dir", str(tmp_path)]
    assert benchmark.main(args) == 0
    record = __import__("json").loads((tmp_path / f"{host}-128-full-mmdet-cpu-fp32.json").read_text())
    row = record["rows"][0]
    assert row["kept_mean"] < 1.0 and row["ideal_speedup"] > 1.0 and row["speedup"] > 0
    assert row["depth"] == 1 and row["window"] == 8

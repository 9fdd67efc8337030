"""Segment Anything with APT: the encoder against segment-anything's own, SamPredictor and the mask
generator unchanged on the swapped model, SAM-HQ, checkpoints, bad input and the quality tool.

Most tests use a real but small ``Sam`` built from segment-anything's own classes (a 256 px
canvas: 16 x 16 cells, padded to 2 x 2 windows of 14; a 32-channel decoder); the ones marked
``canvas_1024`` use SAM's own builder at the real 1024 canvas with a narrow encoder.
"""
import copy
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import require

require("sam", "segment_anything", "segment_anything_hq")

import segment_anything.modeling as sam_modeling  # noqa: E402
import segment_anything_hq  # noqa: E402
import segment_anything_hq.modeling as hq_modeling  # noqa: E402
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry  # noqa: E402
from segment_anything.build_sam import _build_sam  # noqa: E402
from segment_anything_hq.build_sam import _build_sam as _build_sam_hq  # noqa: E402

from apt_dense import APTViT  # noqa: E402
from apt_dense.presets import APT_SETTINGS, HOSTS, SAM_ENCODERS, host_kwargs  # noqa: E402
from apt_dense.sam import (  # noqa: E402
    APTImageEncoderViT,
    APTImageEncoderViTHQ,
    build_apt_sam,
    build_apt_sam_hq_vit_b,
    build_apt_sam_vit_b,
    build_apt_sam_vit_h,
    build_dense_sam,
    build_sam_pair,
    check_image,
    sam_input,
    swap_image_encoder,
)
from apt_dense.sam.build import encoder_config  # noqa: E402
from apt_dense.sam.quality import compare_image, iou_matrix, mask_iou, match_masks  # noqa: E402

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import sam_quality  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """SAM zero-initialises its position grid and relative-position tables: make them non-zero
    (in a ``Sam`` or an image encoder)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def tiny_sam(hq: bool = False, depth: int = 3, global_blocks=(1,), embed_dim: int = 32, seed: int = 0):
    """A real ``Sam`` (segment-anything's or sam-hq's classes) on a 256 px canvas."""
    torch.manual_seed(seed)
    pkg = hq_modeling if hq else sam_modeling
    encoder = pkg.ImageEncoderViT(
        img_size=256, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=2,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=14,
        global_attn_indexes=tuple(global_blocks), out_chans=32,
    )
    decoder = dict(num_multimask_outputs=3, transformer=pkg.TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64,
                   num_heads=2), transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=32)
    mask_decoder = pkg.MaskDecoderHQ(**decoder, vit_dim=embed_dim) if hq else pkg.MaskDecoder(**decoder)
    prompt = pkg.PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=4)
    return randomise(pkg.Sam(encoder, prompt, mask_decoder), seed).eval()


def pair(dense, **apt_kwargs):
    return swap_image_encoder(copy.deepcopy(dense), **apt_kwargs)


@pytest.fixture(scope="module")
def chelsea(photos):
    return photos[2]  # 300 x 451


@pytest.fixture(scope="module")
def tiny():
    dense = tiny_sam()
    return dense, pair(dense, adaptive=False)


@pytest.fixture(scope="module")
def canvas_1024():
    """SAM's own builder at 1024 with a narrow encoder (2 blocks: window, global)."""
    torch.manual_seed(0)
    dense = randomise(_build_sam(32, 2, 2, [1]))
    return dense, pair(dense, adaptive=False), pair(dense)


# --- the encoder -------------------------------------------------------------------------------

def test_keys_and_constructor_are_image_encoder_vits():
    kwargs = dict(img_size=256, embed_dim=32, depth=3, num_heads=2, use_rel_pos=True, window_size=14,
                  global_attn_indexes=(1,), out_chans=32)
    host = sam_modeling.ImageEncoderViT(**kwargs)
    apt = APTImageEncoderViT(**kwargs, thresholds={32: 2.0})
    host_shapes = {k: v.shape for k, v in host.state_dict().items()}
    apt_shapes = {k: v.shape for k, v in apt.state_dict().items()}
    extra = sorted(set(apt_shapes) - set(host_shapes))
    assert extra == ["patch_embed.detail.bias", "patch_embed.detail.weight",
                     "patch_embed.downsample.bias", "patch_embed.downsample.weight"]
    assert {k: apt_shapes[k] for k in host_shapes} == host_shapes
    assert apt.pos_embed.shape == (1, 16, 16, 32) and apt.img_size == 256
    # The same positional order as ImageEncoderViT.
    assert APTImageEncoderViT(256, 16, 3, 32, 2, 2, 4.0, 32).neck[0].out_channels == 32


def test_a_window_size_without_window_blocks_means_global_attention_as_in_sam(chelsea):
    """ImageEncoderViT reads window_size=14 with every block global as global attention; so does
    the APT encoder, and then any patch size tiles (no windows)."""
    kwargs = dict(img_size=256, embed_dim=32, depth=2, num_heads=2, use_rel_pos=True, window_size=14,
                  global_attn_indexes=(0, 1), out_chans=32)
    torch.manual_seed(0)
    host = randomise(sam_modeling.ImageEncoderViT(**kwargs)).eval()
    apt = APTImageEncoderViT(**kwargs, thresholds={32: 2.0, 64: 2.0}, adaptive=False).eval()
    apt.load_state_dict(host.state_dict(), strict=False)
    x = sam_input(chelsea, 256)[0]
    with torch.no_grad():
        torch.testing.assert_close(apt(x), host(x), **TOL)


@pytest.mark.parametrize("batch", [1, 2])
def test_encoder_equals_segment_anythings_merging_off(tiny, photos, batch):
    dense, apt = tiny
    x = torch.cat([sam_input(p, 256)[0] for p in photos[:batch]])
    with torch.no_grad():
        expected, got = dense.image_encoder(x), apt.image_encoder(x)
    assert got.shape == expected.shape == (batch, 32, 16, 16)
    torch.testing.assert_close(got, expected, **TOL)
    assert apt.image_encoder.last_layout.tokens_per_image_host == (256,) * batch


@pytest.mark.slow
def test_encoder_equals_segment_anythings_vit_b_shape_at_1024(chelsea):
    """ViT-B's width and heads at the real canvas (64 cells padded to 5 x 5 windows), 2 blocks."""
    torch.manual_seed(0)
    dense = randomise(_build_sam(768, 2, 12, [1]))
    apt = pair(dense, adaptive=False)
    x = sam_input(chelsea)[0]
    with torch.no_grad():
        torch.testing.assert_close(apt.image_encoder(x), dense.image_encoder(x), **TOL)


def test_sam_input_is_what_set_image_feeds_the_encoder(canvas_1024, chelsea):
    _, apt, _ = canvas_1024
    seen = []
    handle = apt.image_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        SamPredictor(apt).set_image(chelsea)
    finally:
        handle.remove()
    x, size = sam_input(chelsea)
    assert size == (681, 1024)
    torch.testing.assert_close(seen[0], x, rtol=0, atol=0)


# --- SamPredictor and the mask generator, unchanged ---------------------------------------------

def predict_all(sam, image, predictor_cls=SamPredictor, **kwargs):
    predictor = predictor_cls(sam)
    predictor.set_image(image)
    h, w = image.shape[:2]
    points = np.array([[w * 0.3, h * 0.4], [w * 0.7, h * 0.6]])
    return [
        predictor.predict(points[:1], np.array([1]), multimask_output=True, **kwargs),
        predictor.predict(points, np.array([1, 0]), box=np.array([10, 10, w - 20, h - 30]), multimask_output=False,
                          **kwargs),
    ]


def assert_same_predictions(expected, got):
    for (masks_e, iou_e, logits_e), (masks_g, iou_g, logits_g) in zip(expected, got):
        assert masks_g.dtype == bool and masks_g.shape == masks_e.shape
        torch.testing.assert_close(torch.from_numpy(logits_g), torch.from_numpy(logits_e), **TOL)
        torch.testing.assert_close(torch.from_numpy(iou_g), torch.from_numpy(iou_e), **TOL)
        # Masks are logits > 0 upsampled: identical unless a logit sits within float noise of 0.
        assert (masks_g != masks_e).mean() < 1e-4


def test_predictor_identical_merging_off(tiny, chelsea):
    dense, apt = tiny
    assert_same_predictions(predict_all(dense, chelsea), predict_all(apt, chelsea))


def test_predictor_identical_merging_off_at_1024(canvas_1024, chelsea):
    dense, apt, _ = canvas_1024
    assert_same_predictions(predict_all(dense, chelsea), predict_all(apt, chelsea))


def generate(sam, image, generator_cls=SamAutomaticMaskGenerator):
    # Random weights: no quality filters and no NMS, or nothing survives (random masks are big
    # blobs; those of the 4 inner crops touch their crop's edges and are dropped by SAM).
    generator = generator_cls(sam, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              crop_n_layers=1, box_nms_thresh=1.0, crop_nms_thresh=1.0)
    return generator.generate(image)


def assert_same_masks(expected, got):
    assert len(got) == len(expected) >= 4  # sam-hq: one mask per point
    for e, g in zip(expected, got):
        assert (e["segmentation"] != g["segmentation"]).mean() < 1e-4
        assert e["crop_box"] == g["crop_box"]
        assert g["predicted_iou"] == pytest.approx(e["predicted_iou"], abs=1e-5)


@pytest.mark.slow
def test_mask_generator_same_masks_with_crops_merging_off(tiny, chelsea):
    dense, apt = tiny
    passes = apt.image_encoder.token_stats.images
    expected, got = generate(dense, chelsea), generate(apt, chelsea)
    assert apt.image_encoder.token_stats.images == passes + 5  # the image and its 4 crops
    assert_same_masks(expected, got)


def test_hq_interm_embeddings_and_predictor_identical(chelsea):
    dense = tiny_sam(hq=True, depth=3, global_blocks=(1, 2))
    apt = pair(dense, adaptive=False)
    assert isinstance(apt.image_encoder, APTImageEncoderViTHQ)
    x = sam_input(chelsea, 256)[0]
    with torch.no_grad():
        (emb_e, interm_e), (emb_g, interm_g) = dense.image_encoder(x), apt.image_encoder(x)
    torch.testing.assert_close(emb_g, emb_e, **TOL)
    assert len(interm_g) == len(interm_e) == 2
    for e, g in zip(interm_e, interm_g):
        assert g.shape == e.shape == (1, 16, 16, 32)
        torch.testing.assert_close(g, e, **TOL)
    for hq_token_only in (False, True):
        assert_same_predictions(predict_all(dense, chelsea, segment_anything_hq.SamPredictor, hq_token_only=hq_token_only),
                                predict_all(apt, chelsea, segment_anything_hq.SamPredictor, hq_token_only=hq_token_only))


@pytest.mark.slow
def test_hq_mask_generator_same_masks_merging_off(chelsea):
    dense = tiny_sam(hq=True, depth=2, global_blocks=(1,))
    apt = pair(dense, adaptive=False)
    assert_same_masks(generate(dense, chelsea, segment_anything_hq.SamAutomaticMaskGenerator),
                      generate(apt, chelsea, segment_anything_hq.SamAutomaticMaskGenerator))


# --- merging on -------------------------------------------------------------------------------

def test_merging_on_letterboxed_photo_merges_the_padding(canvas_1024, chelsea):
    _, _, apt = canvas_1024
    encoder = apt.image_encoder
    assert encoder.planner.schedule.threshold_map() == APT_SETTINGS["sam"]
    predictor = SamPredictor(apt)
    predictor.set_image(chelsea)
    masks, iou, logits = predictor.predict(np.array([[200, 150]]), np.array([1]))
    layout = encoder.last_layout
    # 681 of 1024 rows are the photo: cell rows from 44 on (704 px) are padding only, all 32 px.
    assert (layout.cell_level[0, 44:] == 1).all()
    assert layout.tokens_per_image_host[0] < 0.8 * 4096
    assert encoder.token_stats.images >= 1 and 0 < encoder.token_stats.kept_fraction < 1
    assert predictor.features.shape == (1, 256, 64, 64) and torch.isfinite(predictor.features).all()
    assert masks.shape == (3, 300, 451) and np.isfinite(logits).all() and np.isfinite(iou).all()


def test_merging_on_with_a_checkpointed_thresholds_setting(tiny, chelsea):
    dense, _ = tiny
    apt = pair(dense, thresholds={"32": 8.5})  # keys as JSON gives them
    predict_all(apt, chelsea)
    assert apt.image_encoder.last_layout.mean_kept_fraction < 0.5


# --- thresholds -------------------------------------------------------------------------------

@pytest.mark.parametrize("thresholds", [{32: 2.0, 64: 2.0}, {32: 2.0, 64: 2.0, 128: 0.3}])
def test_patches_that_do_not_tile_sams_window_are_a_clear_error(tiny, thresholds):
    dense, _ = tiny
    for make in (lambda: pair(dense, thresholds=thresholds),
                 lambda: APTImageEncoderViT(256, embed_dim=32, depth=1, num_heads=2, window_size=14,
                                            thresholds=thresholds),
                 lambda: build_apt_sam("vit_b", depth=1, thresholds=thresholds)):
        with pytest.raises(ValueError, match=r"64 px.*14-cell \(224 px\) windows, which only 32 px patches tile"):
            make()


# --- builders, swap, checkpoints --------------------------------------------------------------

def test_sam_encoders_table_matches_segment_anythings_builders():
    for name, (embed_dim, depth, heads, global_blocks) in SAM_ENCODERS.items():
        with torch.device("meta"):
            config = encoder_config(sam_model_registry[name]().image_encoder)
        assert (config["embed_dim"], config["depth"], config["num_heads"], config["global_attn_indexes"]) == \
               (embed_dim, depth, heads, global_blocks)
        assert (config["img_size"], config["window_size"], config["mlp_ratio"], config["out_chans"]) == (1024, 14, 4.0, 256)


def test_host_presets_give_the_core_model_of_sams_encoder():
    """The first 3 blocks of ViT-B (the third global): the same shapes, but the core's fc1/fc2 and
    flat position grid."""
    with torch.device("meta"):
        host = sam_model_registry["vit_b"]().image_encoder
    core = APTViT(**host_kwargs("sam_vit_b", depth=3, window_block_indexes=(0, 1)), thresholds=APT_SETTINGS["sam"])
    host_sizes = {k: v.numel() for k, v in host.state_dict().items()}
    for key, value in core.state_dict().items():
        key = key.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2")
        if "patch_embed.d" not in key:
            assert host_sizes[key] == value.numel(), key
    assert core.pos_embed.shape == (1, 64 * 64, 768)
    assert set(HOSTS) >= {"sam_vit_b", "sam_vit_l", "sam_vit_h"}


def test_swap_keeps_device_dtype_mode_and_trainable_flags():
    dense = _build_sam_hq(32, 2, 2, [1]).double()  # sam-hq's builder freezes all but its HQ layers
    sam = swap_image_encoder(dense)
    assert sam is dense
    encoder = sam.image_encoder
    assert isinstance(encoder, APTImageEncoderViTHQ) and not encoder.training
    assert encoder.pos_embed.dtype == torch.float64
    trainable = sorted(n for n, p in encoder.named_parameters() if p.requires_grad)
    assert trainable == ["patch_embed.detail.bias", "patch_embed.detail.weight",
                         "patch_embed.downsample.bias", "patch_embed.downsample.weight"]
    assert encoder.planner.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    with pytest.raises(ValueError, match="already APT"):
        swap_image_encoder(sam)
    other = copy.deepcopy(sam)
    other.image_encoder = nn.Conv2d(3, 8, 16, 16)
    with pytest.raises(ValueError, match="ImageEncoderViT.*got Conv2d"):
        swap_image_encoder(other)


def test_builders_build_sam_with_the_apt_encoder():
    sam = build_apt_sam("vit_b", depth=2)
    assert isinstance(sam, sam_modeling.Sam) and not sam.training
    assert type(sam.image_encoder) is APTImageEncoderViT
    assert [b.use_window for b in sam.image_encoder.blocks] == [True, True]  # vit_b's first global block is 2
    hq = build_apt_sam("vit_b", hq=True, depth=3)
    assert isinstance(hq, hq_modeling.Sam) and isinstance(hq.image_encoder, APTImageEncoderViTHQ)
    assert hq.image_encoder.interm_indexes == (2,)
    assert hq.mask_decoder.compress_vit_feat[0].in_channels == 768
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'"):
        build_apt_sam("vit_x")
    with pytest.raises(ValueError, match="reads the architecture from a checkpoint"):
        build_apt_sam("auto")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """SAM and SAM-HQ files with SAM's real layout: SAM's builders with a narrow 2-block encoder."""
    folder = tmp_path_factory.mktemp("sam_checkpoints")
    torch.manual_seed(0)
    sam = randomise(_build_sam(32, 2, 2, [1]))
    torch.save(sam.state_dict(), folder / "sam_tiny.pth")
    torch.save(_build_sam_hq(32, 2, 2, [1]).state_dict(), folder / "sam_hq_tiny.pth")
    return folder, sam


def test_auto_checkpoint_loads_with_only_the_apt_layers_missing(tiny_checkpoints, caplog):
    folder, host = tiny_checkpoints
    with caplog.at_level("INFO", logger="apt_dense.checkpoints"):
        sam = build_apt_sam("auto", folder / "sam_tiny.pth", adaptive=False)
    assert "APT layers not in the checkpoint" in caplog.text and "Missing keys" not in caplog.text
    assert "Unexpected keys" not in caplog.text
    own = sam.state_dict()
    for key, value in host.state_dict().items():
        assert torch.equal(own[key], value), key
    dense, apt = build_sam_pair("auto", folder / "sam_tiny.pth")
    assert isinstance(apt.image_encoder, APTImageEncoderViT) and type(dense.image_encoder) is sam_modeling.ImageEncoderViT
    hq = build_apt_sam("auto", folder / "sam_hq_tiny.pth", hq=True)
    assert isinstance(hq.image_encoder, APTImageEncoderViTHQ)


def test_sam_and_sam_hq_checkpoints_are_not_mixed_up(tiny_checkpoints):
    folder, _ = tiny_checkpoints
    with pytest.raises(ValueError, match="is a SAM-HQ checkpoint.*SAM-HQ builders"):
        build_apt_sam("auto", folder / "sam_hq_tiny.pth")
    with pytest.raises(ValueError, match="without SAM-HQ's decoder layers.*would stay random"):
        build_apt_sam("auto", folder / "sam_tiny.pth", hq=True)
    with pytest.raises(ValueError, match="holds a SAM a ViT with embed_dim 32, 2 blocks image encoder, but vit_b is "
                                         r"ViT-B \(vit_b: embed_dim 768, 12 blocks\): use model_type='auto'"):
        build_apt_sam_vit_b(folder / "sam_tiny.pth")


def test_incomplete_or_foreign_checkpoints_are_clear_errors(tiny_checkpoints, tmp_path):
    folder, host = tiny_checkpoints
    state = host.state_dict()
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match=r"lacks 1 weights of the model.*mask_decoder\.iou_token\.weight"):
        build_apt_sam("auto", tmp_path / "incomplete.pth")
    # SAM 2 (Hiera trunk, memory attention) and EfficientSAM (plain ViT, timm MLP names) layouts.
    t = torch.zeros(2, 2)
    sam2 = {"model": {"image_encoder.trunk.patch_embed.proj.weight": t, "image_encoder.neck.convs.0.conv.weight": t,
                      "memory_attention.layers.0.self_attn.q_proj.weight": t, "sam_mask_decoder.iou_token.weight": t}}
    efficient = {"model": {"image_encoder.patch_embed.proj.weight": t, "image_encoder.pos_embed": torch.zeros(1, 197, 2),
                           "image_encoder.blocks.0.mlp.fc1.weight": t, "mask_decoder.iou_token.weight": t}}
    for name, data, what in (("sam2.pt", sam2, "a SAM 2 checkpoint"), ("efficient.pt", efficient, "an EfficientSAM")):
        torch.save(data, tmp_path / name)
        for build in (lambda p: build_apt_sam("vit_b", p), build_apt_sam_vit_h, lambda p: build_dense_sam("auto", p)):
            with pytest.raises(ValueError, match=f"is {what}.*not supported.*sam_vit_b_01ec64.pth"):
                build(tmp_path / name)
    torch.save({"backbone.net.patch_embed.proj.weight": t}, tmp_path / "detector.pth")
    with pytest.raises(ValueError, match="not a Segment Anything checkpoint: it has no image_encoder.patch_embed"):
        build_apt_sam("vit_b", tmp_path / "detector.pth")


@pytest.mark.slow
def test_registry_vit_b_checkpoint_loads_and_a_wrong_size_is_named(tmp_path):
    """A sam_model_registry ViT-B with random weights, saved: SAM's real file layout and size."""
    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_random.pth"
    host = randomise(sam_model_registry["vit_b"]())
    torch.save(host.state_dict(), path)
    del host
    with pytest.raises(ValueError, match=r"holds a SAM ViT-B \(vit_b: embed_dim 768, 12 blocks\) image encoder, "
                                         r"but vit_h is ViT-H \(vit_h: embed_dim 1280, 32 blocks\): use model type "
                                         r"'vit_b' \(build_apt_sam_vit_b\)"):
        build_apt_sam_vit_h(path)
    with pytest.raises(ValueError, match=r"is a SAM checkpoint without SAM-HQ's decoder layers"):
        build_apt_sam_hq_vit_b(path)
    sam = build_apt_sam_vit_b(path)
    saved = torch.load(path, weights_only=True)
    own = sam.state_dict()
    assert sorted(set(own) - set(saved)) == ["image_encoder.patch_embed.detail.bias",
                                             "image_encoder.patch_embed.detail.weight",
                                             "image_encoder.patch_embed.downsample.bias",
                                             "image_encoder.patch_embed.downsample.weight"]
    assert all(torch.equal(own[k], v) for k, v in saved.items())


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 500), (2000, 1500)])
def test_tiny_elongated_and_large_images_run_through_the_predictor(tiny, shape):
    dense, _ = tiny
    apt = pair(dense)
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    check_image(image)
    masks, iou, logits = predict_all(apt, image)[0]
    assert masks.shape == (3, *shape) and np.isfinite(logits).all() and np.isfinite(iou).all()
    assert apt.image_encoder.last_layout.tokens_per_image_host[0] <= 256


@pytest.mark.parametrize("image, message", [
    (np.zeros((20, 30), np.uint8), "grayscale image"),
    (np.zeros((20, 30, 1), np.uint8), "grayscale image"),
    (np.zeros((20, 30, 4), np.uint8), r"drop the alpha channel with image\[\.\.\., :3\]"),
    (np.zeros((0, 0, 3), np.uint8), "0x0 pixels"),
    (np.zeros((1, 3000, 3), np.uint8), "leaves the other at 0 pixels"),
    (np.full((20, 30, 3), 200.0), r"float image with values in \[200, 200\]"),
    (np.zeros((20, 30, 3), np.uint16), "uint8"),
    ([[0, 0, 0]], "numpy arrays"),
])
def test_images_sam_cannot_take_are_clear_errors(tiny, image, message):
    """SamPredictor.set_image fails on these inside torchvision/PIL (or wraps 0..255 floats):
    check_image names the problem; the swapped model fails exactly where the dense one does."""
    with pytest.raises((ValueError, TypeError), match=message):
        check_image(image)
    dense, apt = tiny
    outcomes = []
    for sam in (dense, apt):
        try:
            SamPredictor(sam).set_image(image)
            outcomes.append(None)
        except Exception as err:  # noqa: BLE001 - comparing SAM's own failures
            outcomes.append(type(err))
    assert outcomes[0] == outcomes[1]


def test_bad_tensors_reaching_the_encoder_are_clear_errors(tiny, chelsea):
    _, apt = tiny
    predictor = SamPredictor(apt)
    x = torch.from_numpy(chelsea).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(170, 256))
    x[..., 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        predictor.set_torch_image(x, chelsea.shape[:2])
    encoder = apt.image_encoder
    with pytest.raises(ValueError, match="takes 256x256 images, got 170x256.*SamPredictor.set_image"):
        encoder(torch.zeros(1, 3, 170, 256))
    with pytest.raises(ValueError, match="images have 1 channels"):
        encoder(torch.zeros(1, 1, 256, 256))
    with pytest.raises(TypeError, match="integer dtype"):
        encoder(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))


# --- the quality tool -------------------------------------------------------------------------

def test_iou_helpers():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    a[1, :, :2] = True
    b = a.clone()
    b[1, :, :1] = False
    assert mask_iou(a, b).tolist() == [1.0, 0.5, 1.0]  # two empty masks agree
    matrix = iou_matrix(a[:2], b[[1, 0]], chunk=5)
    assert matrix.tolist() == [[pytest.approx(0.2), 1.0], [0.5, pytest.approx(1 / 3)]]
    assert match_masks(matrix) == [(0, 1, 1.0), (1, 0, 0.5)]


def test_compare_image_perfect_without_merging_and_counts_tokens_with_it(tiny, chelsea):
    dense, apt = tiny
    amg = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    same = compare_image(dense, apt, "chelsea", chelsea, points_per_side=2, batch=3, amg=amg)
    assert same.point_prompts == 4 and same.tokens_kept == same.tokens_dense == 256
    # Float noise only flips pixels whose logit is within ~1e-6 of 0.
    assert same.point_miou == pytest.approx(1.0, abs=1e-4) and same.point_best_miou == pytest.approx(1.0, abs=1e-4)
    assert same.amg_dense_masks == same.amg_apt_masks > 0 and same.amg_matched_miou == pytest.approx(1.0, abs=1e-4)
    merged = compare_image(dense, pair(dense, thresholds={32: 8.5}), "chelsea", chelsea, points_per_side=2)
    assert merged.tokens_kept < merged.tokens_dense and 0 <= merged.point_miou <= 1
    assert merged.amg_dense_masks is None


@pytest.mark.slow
def test_quality_tool_writes_json_and_markdown(tiny_checkpoints, tmp_path, chelsea, capsys):
    from PIL import Image

    folder, _ = tiny_checkpoints
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(chelsea[::3, ::3]).save(images / "cat.png")
    Image.fromarray(np.zeros((1, 4000, 3), np.uint8)).save(images / "sliver.png")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(folder / "sam_tiny.pth"), "--images", str(images), "--points-per-side", "1",
            "--amg-points-per-side", "1", "--amg-pred-iou-thresh", "0", "--amg-stability-thresh", "0",
            "--thresholds", '{"32": 4}', "--output-dir", str(out), "--tag", "run", "--device", "cpu"]
    assert sam_quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "sliver.png: skipped" in printed and "leaves the other at 0 pixels" in printed
    data = json.loads((out / "run.json").read_text())
    assert data["config"]["thresholds"] == {"32": 4.0} and len(data["images"]) == 1
    row = data["images"][0]
    assert row["name"] == "cat.png" and row["tokens_dense"] == 4096 and row["tokens_kept"] < 4096
    assert 0 <= row["point_miou"] <= 1 and row["amg_dense_masks"] >= 0
    assert data["overall"]["images"] == 1 and data["overall"]["kept_fraction"] == pytest.approx(row["kept_fraction"])
    assert "| cat.png | 151x100 |" in (out / "run.md").read_text()


def test_quality_tool_argument_errors(tiny_checkpoints, tmp_path, capsys):
    folder, _ = tiny_checkpoints
    checkpoint = str(folder / "sam_tiny.pth")
    for argv, message in (
        (["--checkpoint", str(tmp_path / "missing.pth")], "does not exist"),
        (["--checkpoint", checkpoint, "--thresholds", '{"32": 2, "64": 2}'], "only 32 px patches tile"),
        (["--checkpoint", checkpoint, "--output-dir", checkpoint], "is a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            sam_quality.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    efficient = tmp_path / "efficient.pt"
    torch.save({"model": {"image_encoder.patch_embed.proj.weight": torch.zeros(2, 2),
                          "image_encoder.blocks.0.mlp.fc1.weight": torch.zeros(2, 2)}}, efficient)
    assert sam_quality.main(["--checkpoint", str(efficient), "--output-dir", str(tmp_path)]) == 1
    assert "EfficientSAM checkpoint" in capsys.readouterr().err

"""Bad input gets a clear error that names the fix."""
import numpy as np
import pytest
import torch

from apt_dense import APTViT, TokenPlanner
from apt_dense.schedule import thresholds_from_sequence


@pytest.fixture(scope="module")
def model():
    return APTViT(img_size=128, embed_dim=32, depth=1, num_heads=4, thresholds={32: 5.5, 64: 5.5},
                  window_size=4, window_block_indexes=(0,)).eval()


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(1, 1, 128, 128), ValueError, "1 channels but the model expects 3"),
        (torch.rand(1, 4, 128, 128), ValueError, "expects 3"),
        (torch.rand(3, 128, 128), ValueError, r"\(B, C, H, W\)"),
        (torch.rand(0, 3, 128, 128), ValueError, "empty batch"),
        (torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8), TypeError, r"images.float\(\)"),
        (torch.rand(1, 3, 120, 128), ValueError, "multiple of the largest patch size .64 px.; pad .* to 128x128"),
        (torch.rand(1, 3, 128, 96 + 16), ValueError, "pad the images"),
        ("not a tensor", TypeError, "torch.Tensor"),
        (torch.rand(1, 3, 0, 0), ValueError, "images are 0x0 pixels; drop empty images, or pad them .* at least 64x64"),
        (torch.rand(1, 3, 0, 128), ValueError, "images are 0x128 pixels"),
        (torch.rand(1, 3, 128, 0), ValueError, "images are 128x0 pixels"),
        (torch.empty(1, 3, 128, 128, device="meta"), ValueError, "meta device .* pass real images"),
        (torch.rand(1, 3, 128, 128, dtype=torch.float64), TypeError,
         r"float64 but the model's weights are torch.float32: convert the images \(images.float\(\)\) "
         r"or the model \(model.double\(\)\)$"),
        (torch.rand(1, 3, 128, 128).half(), TypeError,
         r"\(images.float\(\)\) or the model \(model.half\(\)\), or run mixed precision under torch.autocast"),
    ],
)
def test_bad_images(model, images, error, match):
    with pytest.raises(error, match=match):
        model(images)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("adaptive", [True, False])
def test_non_finite_pixels(bad, adaptive):
    model = APTViT(img_size=64, embed_dim=32, depth=1, num_heads=4, thresholds={32: 5.5}, adaptive=adaptive)
    x = torch.rand(2, 3, 64, 64) * 255
    x[1, 0, 5, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x)


def test_dense_mode_needs_only_patch_multiples():
    model = APTViT(img_size=64, embed_dim=32, depth=1, num_heads=4, thresholds={32: 5.5, 64: 5.5}, adaptive=False)
    assert model(torch.rand(1, 3, 48, 80)).features[0].shape == (1, 32, 3, 5)
    with pytest.raises(ValueError, match=r"multiple of the patch size \(16 px\)"):
        model(torch.rand(1, 3, 50, 80))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(thresholds={32: 1.0, 64: 1.0}, window_size=6, window_block_indexes=(0,)), "not a multiple of the largest patch"),
        (dict(thresholds=[1.0, 2.0]), "thresholds must be a mapping .*thresholds_from_sequence"),
        (dict(thresholds={32: float("nan")}), "finite"),
        (dict(block_type="swin"), "block_type"),
        (dict(block_type="eva02", use_rel_pos=True), "RoPE"),
        (dict(attention_backend="xformers"), "unknown attention backend"),
        (dict(window_block_indexes=(0,)), "positive window_size"),
        (dict(out_indices=(5,)), "out_indices"),
        (dict(num_heads=5), "divisible"),
        (dict(scorer="sobel"), "unknown scorer"),
        (dict(use_cls_token=True, window_size=2, window_block_indexes=(0,)), "global attention in every block"),
        (dict(use_cls_token=True, pretrain_use_cls_token=False), "cls entry"),
        (dict(pixel_mean=(1.0, 2.0, 3.0)), "both pixel_mean and pixel_std"),
        (dict(pixel_mean=(1.0,), pixel_std=(2.0,)), "one per channel"),
        (dict(pixel_mean=1.0, pixel_std=1.0), r"one value per input channel .* got the scalar 1.0; .* pass \(1.0,\) \* 3"),
        (dict(pixel_mean="RGB", pixel_std=(1.0, 1.0, 1.0)), "sequence of 3 numbers"),
        (dict(pixel_mean=(0.0, 0.0, 0.0), pixel_std=(58.0, 0.0, 57.0)), "pixel_std must be positive .* use 1.0"),
        (dict(pixel_mean=(0.0, 0.0, 0.0), pixel_std=(58.0, -57.0, 57.0)), "pixel_std must be positive"),
        (dict(pixel_mean=(0.0, 0.0, 0.0), pixel_std=(58.0, float("inf"), 57.0)), "pixel_std must be finite"),
        (dict(pixel_mean=(0.0, float("nan"), 0.0), pixel_std=(1.0, 1.0, 1.0)), "pixel_mean must be finite"),
        (dict(depth=0), "depth must be positive, got 0"),
        (dict(num_heads=0), "num_heads must be positive, got 0"),
        (dict(embed_dim=-32), "embed_dim must be positive, got -32"),
        (dict(patch_size=0), "patch_size must be positive"),
        (dict(img_size=0), "img_size must be positive"),
        (dict(in_chans=0), "in_chans must be positive"),
        (dict(pretrain_img_size=0), "pretrain_img_size must be positive"),
        (dict(thresholds={"32px": 1.0}), "thresholds key must be a patch size in pixels .* got '32px'"),
        (dict(thresholds={32.5: 1.0}), "thresholds key must be a patch size .* got 32.5"),
        (dict(thresholds={32: 1.0, "32": 2.0}), r"patch size 32 twice \(keys 32 and '32'\); keep one"),
        (dict(thresholds={32: "2.0"}), "threshold for 32 px patches must be a real number .* got '2.0'"),
        (dict(thresholds={32: torch.tensor([2.0])}), "must be a real number .* 0-d tensor"),
        # options that did nothing, or gave NaN features, or failed deep inside torch
        (dict(window_size=4), r"window_size=4 does nothing without window_block_indexes: list the blocks .* or set "
                              r"window_size=0 for global attention in every block"),
        (dict(window_size=-4, window_block_indexes=(0,)), "window_size must be non-negative, got -4"),
        (dict(use_cls_token=True, window_size=4), "a cls token needs global attention in every block; drop window_size"),
        (dict(block_type="eva02", rope_theta=0.0), r"rope_theta must be greater than 0, got 0; .*10000"),
        (dict(rope_theta=-1.0), "rope_theta must be greater than 0"),
        (dict(rope_pretrain_len=0), "rope_pretrain_len must be greater than 0"),
        (dict(out_indices="0"), r"out_indices must be a list of block indices \(integers\), got '0' \(str\); write out_indices=\[0\]"),
        (dict(out_indices=(0.0,)), r"out_indices must be block indices \(integers\), got 0.0 \(float\) in \[0.0\]; write out_indices=\[0\]"),
        (dict(out_indices=()), "out_indices must name at least one block"),
        (dict(depth="2"), r"depth must be an integer, got '2' \(str\); write depth=2"),
        (dict(embed_dim=32.0), r"embed_dim must be an integer, got 32.0 \(float\); write embed_dim=32"),
        (dict(num_heads=True), r"num_heads must be an integer, got True \(bool\)"),
        (dict(mlp_ratio=-1), r"mlp_ratio must be greater than 0, got -1; the MLP is mlp_ratio \* embed_dim wide"),
        (dict(mlp_ratio="4"), r"mlp_ratio must be a real number, got '4' \(str\)"),
        (dict(mlp_ratio=0.01), "mlp_ratio 0.01 gives an MLP of 0 hidden units at embed_dim 32"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must be at least 0 and below 1, got 1.5; it is the probability"),
        (dict(drop_path_rate=-0.1), "drop_path_rate must be at least 0 and below 1"),
        (dict(drop_path_rate=float("nan")), "drop_path_rate must be a finite number"),
        (dict(patch_size=0, thresholds={32: 1.0}), "patch_size must be positive, got 0"),
        (dict(patch_size=16.0), r"patch_size must be an integer, got 16.0 \(float\); write patch_size=16"),
        (dict(window_size=4, window_block_indexes="0"), r"window_block_indexes must be a list of block indices"),
        (dict(window_size=4, window_block_indexes=(3,)), r"window_block_indexes \[3\] out of range for depth 1"),
    ],
)
def test_bad_construction(kwargs, match):
    args = dict(img_size=64, embed_dim=32, depth=1, num_heads=4)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        APTViT(**args)


@pytest.mark.parametrize(
    "thresholds, patch_sizes, match",
    [([1.0, 2.0], (16, 32), "exactly 1"), ([2.0], (16, "thirty-two"), "patch_sizes must be a patch size")],
)
def test_bad_threshold_sequences(thresholds, patch_sizes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        thresholds_from_sequence(thresholds, patch_sizes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_size=-4), "window_size must be non-negative, got -4; use 0 for no window attention"),
        (dict(window_size=4.0), r"window_size must be an integer, got 4.0 \(float\); write window_size=4"),
        (dict(patch_size=0, thresholds={32: 1.0}), "patch_size must be positive, got 0"),  # not the thresholds
        (dict(in_chans=0), "in_chans must be positive"),
    ],
)
def test_bad_planner_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TokenPlanner(**kwargs)


def test_config_numbers_in_other_types_still_build():
    # numpy integers and floats (YAML, numpy arithmetic), one out index as an int, drop path 0
    model = APTViT(img_size=np.int64(64), embed_dim=np.int32(32), depth=np.int64(2), num_heads=np.int64(4),
                   mlp_ratio=np.float32(4.0), drop_path_rate=np.float64(0.0), out_indices=np.int64(1),
                   window_size=np.int64(2), window_block_indexes=np.array([0]), thresholds={"32": np.float32(5.5)})
    assert model.out_indices == (1,) and model.window_size == 2 and type(model.embed_dim) is int
    assert model.forward_features(torch.rand(1, 3, 64, 64) * 255).features[0].shape == (1, 32, 4, 4)

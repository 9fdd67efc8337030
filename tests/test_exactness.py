"""With adaptive patching off, APTViT equals an independent dense implementation."""
import pytest
import torch

from apt_dense import APTViT
from dense_reference import dense_forward

EPS = 1e-6


def make_model(block_type, **kwargs):
    args = dict(
        img_size=128, patch_size=16, embed_dim=32, depth=4, num_heads=4,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=EPS), block_type=block_type,
        pretrain_img_size=64, out_indices=(1, 3),
    )
    if block_type == "vitdet":
        args.update(use_rel_pos=True, rel_pos_zero_init=False)
    else:
        args.update(mlp_ratio=4 * 2 / 3)
    args.update(kwargs)
    torch.manual_seed(0)
    model = APTViT(**args).eval()
    with torch.no_grad():  # non-trivial biases and norms so every parameter matters
        for name, p in model.named_parameters():
            if "detail" not in name and (name.endswith("bias") or "norm" in name or "ffn_ln" in name):
                p.add_(torch.randn_like(p) * 0.1)
    return model, args


def reference_cfg(args):
    return dict(
        block_type=args["block_type"], num_heads=args["num_heads"], depth=args["depth"],
        patch_size=args["patch_size"], window_size=args.get("window_size", 0),
        window_block_indexes=tuple(args.get("window_block_indexes", ())), img_size=args["img_size"],
        eps=EPS, has_cls=args.get("pretrain_use_cls_token", True), out_indices=args["out_indices"],
    )


@pytest.mark.parametrize("block_type", ["vitdet", "eva02"])
@pytest.mark.parametrize(
    "size, window, window_blocks",
    [
        ((128, 128), 0, ()),  # global only
        ((128, 128), 4, (0, 2)),  # windows tile the grid exactly
        ((96, 160), 4, (0, 1, 2)),  # non-square
        ((112, 80), 4, (0, 2)),  # padded windows (7x5 cells, window 4), as ViTDet pads
    ],
)
def test_dense_equivalence(block_type, size, window, window_blocks):
    model, args = make_model(
        block_type, window_size=window, window_block_indexes=window_blocks,
        adaptive=False, thresholds={32: 5.0}, attention_backend="sdpa",
    )
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(images).features
        ref = dense_forward(model.state_dict(), reference_cfg(args), images)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_type", ["vitdet", "eva02"])
def test_merging_that_selects_nothing_is_dense(block_type):
    """Adaptive patching on, but thresholds no patch can pass: identical to the dense model."""
    model, args = make_model(
        block_type, window_size=4, window_block_indexes=(0, 2), thresholds={32: 0.0, 64: 0.0},
    )
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.no_grad():
        out = model(images)
        ref = dense_forward(model.state_dict(), reference_cfg(args), images)
    assert out.tokens_per_image.tolist() == [64, 64]
    for a, b in zip(out.features, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_type", ["vitdet", "eva02"])
def test_batch_with_different_token_counts_equals_images_alone(block_type):
    """Packing is exact: each image of a ragged batch gets what it gets alone."""
    model, _ = make_model(block_type, window_size=4, window_block_indexes=(0, 2), thresholds={32: 4.0, 64: 4.0})
    flat = torch.full((3, 128, 128), 90.0)
    flat[:, 64:, :] = 200.0
    busy = torch.rand(3, 128, 128) * 255
    half = busy.clone()
    half[:, :, :64] = 30.0
    images = torch.stack([flat, busy, half])
    with torch.no_grad():
        batched = model(images)
        alone = [model(images[i : i + 1]) for i in range(3)]
    counts = batched.tokens_per_image.tolist()
    assert len(set(counts)) == 3, counts
    for i, single in enumerate(alone):
        assert single.tokens_per_image.tolist() == [counts[i]]
        for a, b in zip(batched.features, single.features):
            torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_cls_token_dense_equivalence(size):
    """EVA-02 segmentation style: cls token, global attention everywhere, RoPE on patches only."""
    model, args = make_model("eva02", use_cls_token=True, adaptive=False, thresholds={32: 5.0}, out_indices=(0, 3))
    with torch.no_grad():
        model.cls_token.normal_()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(images).features
        ref = dense_forward(model.state_dict(), reference_cfg(args), images)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cls_token_ragged_batch_equals_images_alone():
    model, _ = make_model("eva02", use_cls_token=True, thresholds={32: 4.0, 64: 4.0})
    flat = torch.full((3, 128, 128), 90.0)
    busy = torch.rand(3, 128, 128) * 255
    images = torch.stack([flat, busy])
    with torch.no_grad():
        batched = model(images)
        alone = [model(images[i : i + 1]) for i in range(2)]
    assert batched.tokens_per_image.tolist()[0] < batched.tokens_per_image.tolist()[1]
    for i, single in enumerate(alone):
        for a, b in zip(batched.features, single.features):
            torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=1e-5)

"""Drop path, activation checkpointing, autocast, and the dense-mode switch."""
import pytest
import torch

from apt_dense import APTViT


def tiny(**kw):
    args = dict(img_size=64, embed_dim=32, depth=3, num_heads=4, thresholds={32: 4.0},
                window_size=2, window_block_indexes=(0,), block_type="vitdet", use_rel_pos=True)
    args.update(kw)
    torch.manual_seed(0)
    return APTViT(**args)


def images():
    x = torch.rand(2, 3, 64, 96) * 255
    x[0, :, :32] = 10.0
    return x


def test_activation_checkpointing_gives_same_gradients():
    x = images()
    grads = []
    for ckpt in (False, True):
        model = tiny(use_act_checkpoint=ckpt).train()
        model(x).features[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_drop_path_drops_whole_images():
    model = tiny(drop_path_rate=0.99, depth=2).train()
    torch.manual_seed(3)
    out = model(images())
    assert torch.isfinite(out.features[0]).all()
    model.eval()
    x = images()
    a, b = model(x).features[0], model(x).features[0]
    torch.testing.assert_close(a, b)  # deterministic in eval


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_type", ["vitdet", "eva02"])
def test_autocast(dtype, block_type):
    extra = {"use_rel_pos": block_type == "vitdet", "block_type": block_type}
    model = tiny(**extra).eval()
    x = images()
    with torch.no_grad():
        ref = model(x).features[0]
        with torch.autocast("cpu", dtype=dtype):
            low = model(x).features[0]
    relative_error = (low.float() - ref).norm() / ref.norm()
    assert relative_error < 2e-2, relative_error


def test_adaptive_switch():
    x = images()
    on = tiny().eval()
    off = tiny(adaptive=False).eval()
    off.load_state_dict(on.state_dict())
    assert on(x).tokens_per_image.tolist() != [24, 24]
    assert off(x).tokens_per_image.tolist() == [24, 24]
    assert not off.planner.merges and on.planner.merges


def test_forward_features_any_size_and_token_stats():
    from apt_dense import TokenStats

    model = tiny(use_rel_pos=False, block_type="eva02", thresholds={32: 4.0, 64: 4.0}, window_size=4).eval()
    assert model.size_divisibility == 64
    x = torch.rand(2, 3, 80, 100) * 255
    out = model.forward_features(x)
    assert out.features[0].shape == (2, 32, 5, 7)
    stats = TokenStats()
    stats.update(out.layout)
    assert stats.images == 2 and stats.cells == 2 * 8 * 8 and 0 < stats.kept_fraction <= 1


def test_layer_ids_for_layer_decay():
    from apt_dense.param_groups import layer_decay_scale, vit_layer_id

    assert vit_layer_id("backbone.cls_token", 12) == 0
    assert vit_layer_id("backbone.net.pos_embed", 12) == 0
    assert vit_layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert vit_layer_id("backbone.patch_embed.detail.weight", 12) == 13  # APT layer: full lr
    assert vit_layer_id("backbone.blocks.4.attn.q_bias", 12) == 5
    assert vit_layer_id("backbone.fpn1.0.weight", 12) == 13
    assert vit_layer_id("decode_head.conv_seg.weight", 12) == 13
    assert layer_decay_scale("backbone.blocks.11.mlp.w3.weight", 0.5, 12) == 0.5

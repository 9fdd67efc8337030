"""Adaptive patch embedding: zero-init, exact area resize, gradients, position embeddings."""
import torch
import torch.nn.functional as F

from apt_dense import APTViT


def tiny(**kw):
    args = dict(img_size=128, embed_dim=32, depth=2, num_heads=4, thresholds={32: 3.0, 64: 3.0},
                window_size=4, window_block_indexes=(0,), block_type="eva02", mlp_ratio=8 / 3)
    args.update(kw)
    torch.manual_seed(0)
    return APTViT(**args)


def images_with_flat_regions():
    x = torch.rand(2, 3, 128, 128) * 255
    x[0, :, :64, :64] = 40.0
    x[1, :, 64:, :] = 220.0
    x[1, :, :32, :32] = torch.linspace(0, 255, 32).view(1, 1, 32)  # smooth ramp: not uniform
    return x


def test_large_patch_token_is_resize_only_embedding_at_init():
    model = tiny().eval()
    x = images_with_flat_regions()
    layout = model.planner(x)
    tokens = model.patch_embed(x, layout)
    proj = model.patch_embed.proj
    assert (layout.token_level > 0).any()
    for t in torch.nonzero(layout.token_level > 0).flatten().tolist():
        b, k = layout.token_image[t].item(), layout.token_level[t].item()
        r, c = (layout.token_cell[t] * 16).tolist()
        side = 16 << k
        patch = x[b : b + 1, :, r : r + side, c : c + side]
        area = patch.unflatten(2, (16, side // 16)).unflatten(4, (16, side // 16)).mean(dim=(3, 5))
        expected = proj(area).flatten()
        torch.testing.assert_close(tokens[t], expected, atol=1e-4, rtol=1e-5)


def test_position_embedding_is_mean_of_covered_cells():
    model = tiny().eval()
    x = images_with_flat_regions()
    layout = model.planner(x)
    with torch.no_grad():
        pos_tokens = model.embed(x, layout) - model.patch_embed(x, layout)
        grid = F.interpolate(model.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(8, 8),
                             mode="bicubic", align_corners=False)[0]
    for t in range(layout.num_tokens):
        r, c = layout.token_cell[t].tolist()
        s = 1 << layout.token_level[t].item()
        torch.testing.assert_close(pos_tokens[t], grid[:, r : r + s, c : c + s].mean(dim=(1, 2)), atol=1e-4, rtol=1e-4)


def test_gradients_reach_new_layers_and_backbone():
    model = tiny().train()
    with torch.no_grad():
        model.patch_embed.detail.weight.normal_(std=0.02)  # past step 0 of fine-tuning
    x = images_with_flat_regions()
    out = model(x)
    assert (out.layout.token_level > 0).any()
    out.features[0].square().mean().backward()
    for name in ["patch_embed.downsample.weight", "patch_embed.detail.weight", "patch_embed.detail.bias",
                 "patch_embed.proj.weight", "pos_embed", "blocks.0.attn.q_proj.weight", "blocks.1.mlp.w3.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_zero_initialised_detail_passes_gradient_to_itself():
    model = tiny().train()
    out = model(images_with_flat_regions())
    out.features[0].sum().backward()
    assert model.patch_embed.detail.weight.grad.abs().sum() > 0

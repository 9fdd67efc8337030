"""The core's DINOv2 pieces without transformers: prefix slots (cls + registers), the dinov2 block
family in ragged batches, position grids for the image's own cells, and the 14 px threshold setting
(tools/translate_thresholds.py). Equality with transformers' DINOv2 itself is tested in
test_transformers.py."""
import pytest
import torch

from apt_dense import APTViT, ImagePrefix, TokenPlanner
from apt_dense.embedding import dinov2_pos_grid, grid_position_embeddings


def dinov2(**kwargs):
    args = dict(img_size=112, patch_size=14, embed_dim=32, depth=2, num_heads=2, block_type="dinov2",
                use_cls_token=True, num_register_tokens=3, pretrain_img_size=112, pos_embed_resize="dinov2_registers",
                layerscale_value=0.5, thresholds={28: 4.0, 56: 4.0}, out_indices=(0, 1))
    args.update(kwargs)
    torch.manual_seed(0)
    model = APTViT(**args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_prefix_slots_lead_every_image():
    planner = TokenPlanner(patch_size=14, thresholds={28: 4.0})
    images = torch.stack([torch.full((3, 56, 84), 90.0), torch.rand(3, 56, 84) * 255])
    layout = planner(images)
    prefix = ImagePrefix.build(layout, num_prefix=3)
    n, b = layout.num_tokens, layout.batch_size
    assert prefix.num_prefix == 3 and prefix.images.lengths.tolist() == [k + 3 for k in layout.images.lengths]
    starts = prefix.images.cu_seqlens[:-1].long()
    assert prefix.prefix_slot.tolist() == [[int(s) + j for j in range(3)] for s in starts]
    tokens, vectors = torch.randn(n, 4), torch.randn(3, 4)
    slots = prefix.insert(tokens, vectors)
    assert torch.equal(prefix.tokens(slots), tokens)
    assert torch.equal(prefix.prefixes(slots), vectors.expand(b, 3, 4))
    assert prefix.slot_image.tolist() == sum(([i] * int(k) for i, k in enumerate(prefix.images.lengths)), [])
    assert prefix.images.prefix.sum() == 3 * b
    with pytest.raises(ValueError, match="at least 1"):
        ImagePrefix.build(layout, num_prefix=0)


def test_registers_ragged_batch_equals_images_alone():
    model = dinov2()
    images = torch.stack([torch.full((3, 112, 168), 90.0), torch.rand(3, 112, 168) * 255])
    with torch.no_grad():
        batched = model(images)
        alone = [model(images[i : i + 1]) for i in range(2)]
    kept = batched.tokens_per_image.tolist()
    assert kept[0] < kept[1]
    for i, single in enumerate(alone):
        for a, b in zip(batched.features + batched.prefix_tokens, single.features + single.prefix_tokens):
            torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=1e-5)
    assert [p.shape for p in batched.prefix_tokens] == [(2, 4, 32)] * 2


def test_padding_cells_repeat_the_position_grid_edge():
    pos = torch.randn(1, 1 + 8 * 8, 5)
    grid = dinov2_pos_grid(pos, (6, 7))
    assert grid.shape == (1, 6, 7, 5)
    assert torch.equal(dinov2_pos_grid(pos, (8, 8)), pos[:, 1:].reshape(1, 8, 8, 5))
    planner = TokenPlanner(patch_size=14, adaptive=False)
    layout = planner(torch.zeros(1, 3, 8 * 14, 8 * 14))
    per_token = grid_position_embeddings(grid, layout).view(8, 8, 5)
    assert torch.equal(per_token[:6, :7], grid[0])
    assert torch.equal(per_token[7, 3], grid[0, 5, 3]) and torch.equal(per_token[2, 7], grid[0, 2, 6])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window_size=4, window_block_indexes=(0,)), "attend globally"),
        (dict(use_rel_pos=True), "no relative positions"),
        (dict(block_type="vitdet", use_swiglu_ffn=True, num_register_tokens=0), "use_swiglu_ffn"),
        (dict(use_cls_token=False), "register tokens follow a cls token"),
        (dict(pos_embed_resize="nearest"), "pos_embed_resize must be one of"),
        (dict(pretrain_use_cls_token=False), "cls entry"),
    ],
)
def test_dinov2_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dinov2(**kwargs)


def test_swiglu_width_follows_dinov2_giant():
    model = dinov2(use_swiglu_ffn=True, mlp_ratio=4.0)
    mlp = model.blocks[0].mlp
    assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (88, 88)  # 128 * 2/3 = 85.3 -> 88
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 112, 112) * 255).features[0]).all()


def translate_tool():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import translate_thresholds

    return translate_thresholds


def test_depth_setting_is_the_translated_segmentation_threshold(tmp_path):
    """APT_SETTINGS['depth'] is what tools/translate_thresholds.py gives for the paper's 5.75 at 32
    and 64 px on the five sample photos: the same share of the photos merged per level."""
    import json

    from apt_dense.presets import APT_SETTINGS

    out = tmp_path / "t14.json"
    assert translate_tool().main(["--reference", '{"32": 5.75, "64": 5.75}', "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    translated = {int(k): v for k, v in result["translated"]["thresholds"].items()}
    assert translated == pytest.approx(APT_SETTINGS["depth"], abs=0.005)
    assert result["translated"]["areas"] == pytest.approx(result["reference"]["areas"], abs=0.005)
    assert sum(result["translated"]["kept"]) / 5 == pytest.approx(0.60, abs=0.01)


def test_translate_thresholds_arguments(tmp_path, capsys):
    tool = translate_tool()
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, message in [
        (["--reference", '{"48": 5.0}'], "is not 16 px times 2, 4, 8"),
        (["--output", str(blocker / "t.json")], "is a file"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            tool.parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err

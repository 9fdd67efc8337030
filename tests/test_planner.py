"""The planner on its own, the feature contract (pad, plan, crop) and the names kept for adapters."""
import pytest
import torch

from apt_dense import APTViT, TokenPlanner, thresholds_from_sequence
from apt_dense.presets import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from conftest import photo_batch

PLANNING = dict(thresholds={32: 5.0, 64: 5.0}, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD,
                input_format="BGR")


def normalised(raw):
    return (raw - torch.tensor(IMAGENET_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_PIXEL_STD).view(1, 3, 1, 1)


def same_layout(a, b):
    assert a.tokens_per_image_host == b.tokens_per_image_host and a.num_levels == b.num_levels
    for name in ("cell_level", "token_image", "token_cell", "token_level", "cell_to_token", "tokens_per_image"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for kind in ("images", "windows"):
        sa, sb = getattr(a, kind), getattr(b, kind)
        if sa is None or sb is None:
            assert sa is sb is None, kind
            continue
        assert torch.equal(sa.cu_seqlens, sb.cu_seqlens) and torch.equal(sa.positions, sb.positions), kind


def test_planner_alone_plans_what_the_model_plans(photos):
    x = normalised(photo_batch(photos, 128, count=3))
    model = APTViT(img_size=128, embed_dim=32, depth=1, num_heads=4, window_size=4, window_block_indexes=(0,), **PLANNING)
    planner = TokenPlanner(patch_size=16, window_size=4, **PLANNING)
    same_layout(planner(x), model.planner(x))
    # scores once, then only selection and packing (the threshold calibration loop)
    same_layout(planner.plan_scores(planner.scores(x)), planner(x))
    assert planner.size_divisibility == 64 and planner.levels == 2


def test_planner_holds_no_state_dict_entries_and_follows_the_model():
    model = APTViT(img_size=64, embed_dim=32, depth=1, num_heads=4, **PLANNING)
    assert not any(key.startswith("planner.") for key in model.state_dict())
    assert list(model.planner.parameters()) == []
    assert model.to(torch.float64).planner.pixel_mean.dtype == torch.float64


def test_dense_plan_has_no_coarse_levels():
    layout = TokenPlanner(patch_size=16, thresholds={32: 5.0}, adaptive=False)(torch.rand(2, 3, 64, 96) * 255)
    assert layout.is_dense and layout.num_levels == 0 and layout.tokens_per_image_host == (24, 24)


def test_forward_features_pads_plans_and_crops(photos):
    torch.manual_seed(0)
    model = APTViT(img_size=128, embed_dim=32, depth=2, num_heads=4, out_indices=(0, 1), thresholds={32: 4.0, 64: 4.0}).eval()
    x = photo_batch(photos, 128, count=2)[..., :100, :90]
    with torch.no_grad():
        out = model.forward_features(x)
        padded = model(torch.nn.functional.pad(x, (0, 128 - 90, 0, 128 - 100)))
    assert [f.shape[-2:] for f in out.features] == [(7, 6), (7, 6)]
    for a, b in zip(out.features, padded.features):
        torch.testing.assert_close(a, b[..., :7, :6])
    with pytest.raises(ValueError, match="pad the images"):
        model(x)


def test_thresholds_from_sequence_takes_only_sequences():
    assert thresholds_from_sequence((2.0, 0.3), ("16", 32, 64.0)) == {32: 2.0, 64: 0.3}
    with pytest.raises(TypeError, match="needs no patch_sizes"):
        thresholds_from_sequence({32: 2.0}, (16, 32))

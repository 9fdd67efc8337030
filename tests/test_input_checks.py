"""Config values in disguise, and dtypes under autocast."""
import numpy as np
import pytest
import torch

from apt_dense import APTViT, PatchSchedule
from conftest import photo_batch


def tiny(**kw):
    args = dict(img_size=128, embed_dim=32, depth=1, num_heads=4, thresholds={32: 4.0, 64: 4.0})
    args.update(kw)
    torch.manual_seed(0)
    return APTViT(**args).eval()


@pytest.mark.parametrize(
    "thresholds, patch_sizes",
    [
        ({"32": 2.0, "64": 0.5}, None),  # JSON / YAML keys
        ({np.int64(32): np.float32(2.0), np.int32(64): np.float64(0.5)}, None),
        ({32.0: torch.tensor(2.0), 64: torch.tensor(0.5, dtype=torch.float64)}, None),
        ([np.float32(2.0), torch.tensor(0.5)], ("16", np.int64(32), 64.0)),
    ],
)
def test_thresholds_in_disguise_are_converted(thresholds, patch_sizes):
    schedule = PatchSchedule.create(16, thresholds, patch_sizes)
    assert schedule == PatchSchedule.create(16, {32: 2.0, 64: 0.5})
    assert all(type(v) is float for v in schedule.thresholds)
    assert schedule.threshold_map() == {32: 2.0, 64: 0.5}


def test_string_keys_give_the_same_layout(photos):
    x = photo_batch(photos, 128, count=2)
    plain = tiny(thresholds={32: 5.0, 64: 5.0}).build_layout(x)
    from_json = tiny(thresholds={"32": 5.0, "64": 5.0}).build_layout(x)
    assert torch.equal(plain.cell_level, from_json.cell_level)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_accepts_low_precision_inputs(autocast_dtype, input_dtype, photos):
    x = photo_batch(photos, 128, count=1).to(input_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
        assert tiny()(x).features[0].shape == (1, 32, 8, 8)


def test_autocast_does_not_cast_float64():
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"images.float\(\)"):
        tiny()(torch.rand(1, 3, 128, 128, dtype=torch.float64) * 255)


def test_half_model_takes_half_images(photos):
    model = tiny().half()
    with pytest.raises(TypeError, match=r"images.half\(\)"):
        model(photo_batch(photos, 128, count=1))
    model(photo_batch(photos, 128, count=1).half())

"""Config values in disguise."""
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

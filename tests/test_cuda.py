"""CUDA-only checks: host syncs per forward, and APT vs dense numerics in bf16."""
import warnings

import pytest
import torch

from apt_dense import APTViT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_and_images():
    torch.manual_seed(0)
    model = APTViT(img_size=256, embed_dim=64, depth=2, num_heads=4, block_type="eva02", mlp_ratio=8 / 3,
                   window_size=8, window_block_indexes=(0,), thresholds={32: 4.0, 64: 4.0},
                   pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375)).cuda().eval()
    x = torch.randn(2, 3, 256, 256, device="cuda")
    x[0, :, :128] = 0.0
    return model, x


def test_one_host_sync_per_forward():
    model, x = model_and_images()
    with torch.no_grad():
        model(x)  # warm caches (geometry tables are built once per shape)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_bf16_matches_fp32():
    model, x = model_and_images()
    with torch.no_grad():
        ref = model(x).features[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x).features[0]
    assert (low.float() - ref).norm() / ref.norm() < 2e-2

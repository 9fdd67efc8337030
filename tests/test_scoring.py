"""Scorers against NumPy references of their definitions (SPEC section 1)."""
import numpy as np
import pytest
import torch

from apt_dense import EntropyScorer, LaplacianScorer, TokenPlanner, UpsampleMSEScorer, build_scorer, to_intensity
from conftest import photo_batch


def numpy_gray(rgb):
    rgb = rgb.astype(np.float32)
    return np.float32(0.2989) * rgb[0] + np.float32(0.5870) * rgb[1] + np.float32(0.1140) * rgb[2]


def numpy_entropy(patch, bins=512, lo=0.0, hi=255.0):
    """The public APT code's definition: histc(bins, lo, hi), p = count / pixels, bits."""
    v = patch.astype(np.float32).ravel()
    inside = (v >= lo) & (v <= hi)
    idx = ((v[inside] - np.float32(lo)) * np.float32(bins) / np.float32(hi - lo)).astype(np.int64)
    idx = np.minimum(idx, bins - 1)
    p = np.bincount(idx, minlength=bins).astype(np.float64) / v.size
    return float(-(p * np.log2(p + 1e-10)).sum())


def per_patch(fn, gray, size):
    h, w = gray.shape
    return np.array([[fn(gray[i : i + size, j : j + size]) for j in range(0, w, size)] for i in range(0, h, size)])


def test_entropy_matches_numpy_reference_on_real_photos(photos):
    images = photo_batch(photos, 256, count=3)
    scores = EntropyScorer()(to_intensity(images), 16, 3)
    for b in range(images.shape[0]):
        gray = numpy_gray(images[b].numpy())
        for k, level in enumerate(scores, start=1):
            expected = per_patch(numpy_entropy, gray, 16 << k)
            np.testing.assert_allclose(level[b].numpy(), expected, atol=1e-4)


def test_entropy_matches_torch_histc_per_patch(photos):
    """The public code calls torch.histc once per patch; we bin once and sum-pool."""
    images = photo_batch(photos, 128, count=2)
    gray = to_intensity(images)
    scores = EntropyScorer()(gray, 16, 2)
    for k, level in enumerate(scores, start=1):
        size = 16 << k
        for b in range(gray.shape[0]):
            for i in range(0, 128, size):
                for j in range(0, 128, size):
                    patch = gray[b, i : i + size, j : j + size]
                    hist = torch.histc(patch, bins=512, min=0, max=255)
                    p = hist / patch.numel()
                    expected = -(p * torch.log2(p + 1e-10)).sum()
                    torch.testing.assert_close(level[b, i // size, j // size], expected, atol=1e-5, rtol=0)


def test_entropy_bounds_and_uniform():
    flat = torch.full((1, 64, 64), 77.0)
    assert EntropyScorer()(flat, 16, 2)[0].abs().max() < 1e-6
    ramp = torch.arange(32 * 32, dtype=torch.float32).view(1, 32, 32) * 255 / 1023
    h = EntropyScorer()(ramp, 16, 1)[0]
    assert h.item() <= 9.0 + 1e-5  # a 32 px patch has 1024 pixels spread over 512 bins


def test_entropy_undoes_normalisation(photos):
    images = photo_batch(photos, 64, count=2)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    raw = EntropyScorer()(to_intensity(images), 16, 2)
    undone = EntropyScorer()(to_intensity(normalised, mean, std), 16, 2)
    for a, b in zip(raw, undone):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # integer pixels come back exactly


def test_bgr_input_scores_like_rgb(photos):
    images = photo_batch(photos, 64, count=2)
    rgb = to_intensity(images)
    torch.testing.assert_close(to_intensity(images.flip(1), channel_order="BGR"), rgb)
    with pytest.raises(ValueError, match="channel_order"):
        to_intensity(images, channel_order="RGBA")


def test_entropy_other_bin_counts():
    gray = torch.rand(1, 64, 64) * 255
    scorer = EntropyScorer(bins=64)
    expected = per_patch(lambda p: numpy_entropy(p, bins=64), gray[0].numpy(), 32)
    np.testing.assert_allclose(scorer(gray, 16, 1)[0][0].numpy(), expected, atol=1e-4)


def test_entropy_memory_is_per_patch_not_per_pixel():
    """Histogram counts scale with patches x bins: (B, H/2p, W/2p, bins)."""
    hist = EntropyScorer().histograms(torch.rand(2, 128, 64) * 255, 32)
    assert hist.shape == (2, 4, 2, 512)
    assert hist.sum().item() == 2 * 128 * 64


def numpy_laplacian(gray):
    g = np.pad(gray.astype(np.float64) / 255.0, 1, mode="edge")
    h, w = gray.shape
    out = -9 * g[1:-1, 1:-1]
    for di in range(3):
        for dj in range(3):
            out = out + g[di : di + h, dj : dj + w]
    return np.abs(out)


def test_laplacian_matches_numpy(photos):
    images = photo_batch(photos, 128, count=2)
    gray = to_intensity(images)
    scores = LaplacianScorer()(gray, 16, 2)
    for b in range(2):
        resp = numpy_laplacian(gray[b].numpy())
        for k, level in enumerate(scores, start=1):
            expected = per_patch(np.mean, resp, 16 << k)
            np.testing.assert_allclose(level[b].numpy(), expected, atol=1e-5)


def numpy_upsample_mse(gray, factor):
    g = torch.from_numpy(gray.astype(np.float64) / 255.0)[None, None]
    low = torch.nn.functional.avg_pool2d(g, factor)
    up = torch.nn.functional.interpolate(low, size=g.shape[-2:], mode="bilinear", align_corners=False)
    return ((g - up) ** 2)[0, 0].numpy()


def test_upsample_mse_matches_reference(photos):
    images = photo_batch(photos, 128, count=2)
    gray = to_intensity(images)
    scores = UpsampleMSEScorer()(gray, 16, 2)
    for b in range(2):
        for k, level in enumerate(scores, start=1):
            expected = per_patch(np.mean, numpy_upsample_mse(gray[b].numpy(), 1 << k), 16 << k)
            np.testing.assert_allclose(level[b].numpy(), expected, atol=1e-6)


def test_build_scorer_errors():
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("variance")
    with pytest.raises(ValueError, match="at least 2 bins"):
        EntropyScorer(bins=1)
    with pytest.raises(ValueError, match="only when the scorer is given by name"):
        build_scorer(lambda g, p, k: [], bins=3)


def level_means(gray, p, levels):
    return [torch.nn.functional.avg_pool2d(gray.unsqueeze(1), p << k).squeeze(1) for k in range(1, levels + 1)]


@pytest.mark.parametrize(
    "scorer, error, match",
    [
        (lambda g, p, k: None, TypeError, r"returned NoneType; a scorer returns a list of 2 tensors, .* here \[\(2, 2, 4\), \(2, 1, 2\)\]"),
        (lambda g, p, k: level_means(g, p, k)[:1], ValueError, "returned 1 score maps"),
        (lambda g, p, k: [s.numpy() for s in level_means(g, p, k)], TypeError,
         r"scores\[0\] is a ndarray, not a torch.Tensor; convert it with torch.as_tensor\(score, device=gray.device\)"),
        (lambda g, p, k: level_means(g, p, k)[::-1], ValueError, r"scores\[0\] has shape \(2, 1, 2\) on cpu"),
        (lambda g, p, k: [s > 1 for s in level_means(g, p, k)], TypeError, "dtype torch.bool; scores must be real"),
    ],
)
def test_a_scorer_returning_the_wrong_thing_is_a_clear_error(scorer, error, match):
    from apt_dense import APTViT

    model = APTViT(img_size=64, embed_dim=32, depth=1, num_heads=2, thresholds={32: 4.0, 64: 4.0}, scorer=scorer)
    with pytest.raises(error, match=match):
        model.forward_features(torch.rand(2, 3, 64, 96) * 255)


def test_a_callable_scorer_plans_like_the_named_one(photos):
    x = photo_batch(photos[:2], 128)
    named = TokenPlanner(thresholds={32: 5.0, 64: 5.0})
    custom = TokenPlanner(thresholds={32: 5.0, 64: 5.0}, scorer=lambda g, p, k: EntropyScorer()(g, p, k))
    assert torch.equal(named(x).cell_level, custom(x).cell_level)

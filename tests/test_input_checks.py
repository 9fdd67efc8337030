"""Config values in disguise, dtypes under autocast, and the once-per-model input-scale warning."""
import warnings

import numpy as np
import pytest
import torch

from apt_dense import APTViT, InputScaleWarning, PatchSchedule, thresholds_from_sequence
from apt_dense.presets import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.scoring import intensity_extremes, intensity_scale_problem
from conftest import photo_batch

MEAN = torch.tensor(IMAGENET_PIXEL_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_PIXEL_STD).view(1, 3, 1, 1)
IMAGENET = dict(pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD)


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
    if patch_sizes is not None:
        thresholds = thresholds_from_sequence(thresholds, patch_sizes)
    schedule = PatchSchedule.create(16, thresholds)
    assert schedule == PatchSchedule.create(16, {32: 2.0, 64: 0.5})
    assert all(type(v) is float for v in schedule.thresholds)
    assert schedule.threshold_map() == {32: 2.0, 64: 0.5}


def test_string_keys_give_the_same_layout(photos):
    x = photo_batch(photos, 128, count=2)
    plain = tiny(thresholds={32: 5.0, 64: 5.0}).planner(x)
    from_json = tiny(thresholds={"32": 5.0, "64": 5.0}).planner(x)
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


def normalised(raw):
    return (raw - MEAN) / STD


def letterboxed(raw):
    """Photos in the top-left quarter of a canvas padded with zeros after normalisation (ViTDet)."""
    canvas = torch.zeros(raw.shape[0], 3, 256, 256)
    canvas[..., :128, :128] = normalised(raw)
    return canvas


@pytest.mark.parametrize(
    "make_images, kwargs, match",
    [
        (normalised, {}, r"inputs look normalised or scaled to 0..1 \(brightest grayscale value 2\.\d\d .*pass pixel_mean"),
        (lambda raw: raw / 255, {}, r"brightest grayscale value (0\.\d\d|1\.00) on the 0..255 scale"),
        (lambda raw: raw, IMAGENET, r"values reach 1\d{4} after undoing pixel_mean/pixel_std .* drop pixel_mean"),
        # Statistics on the 0..1 scale (torchvision's) for images normalised from 0..1.
        (normalised, dict(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)),
         "after undoing pixel_mean/pixel_std, .* on the 0..255 scale"),
        (lambda raw: raw * 257, {}, r"values reach \d{5} .* rescale the inputs to 0..255"),
    ],
)
def test_input_scale_mismatch_warns_once(make_images, kwargs, match, photos):
    model = tiny(**kwargs)
    x = make_images(photo_batch(photos, 128, count=2))
    with pytest.warns(InputScaleWarning, match=match):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputScaleWarning)
        model(x)  # once per model


def dark(raw):
    """A genuinely dark photo: the brightest pixel at about 5% of full scale."""
    return (raw * 0.05).round()


@pytest.mark.parametrize(
    "make_images, kwargs",
    [
        (lambda raw: raw, {}),
        (dark, {}),
        (normalised, IMAGENET),
        (lambda raw: normalised(dark(raw)), IMAGENET),
        (letterboxed, IMAGENET),
        (lambda raw: torch.zeros_like(raw), {}),  # black frames: every scale scores them the same
        (lambda raw: torch.zeros_like(raw), IMAGENET),  # canvases of padding
        (lambda raw: torch.randn(raw.shape, generator=torch.Generator().manual_seed(0)), IMAGENET),
    ],
)
def test_genuine_inputs_do_not_warn(make_images, kwargs, photos):
    x = make_images(photo_batch(photos, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputScaleWarning)
        tiny(**kwargs)(x)


def test_no_scale_check_without_scoring(photos):
    x = photo_batch(photos, 128, count=2) / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputScaleWarning)
        tiny(adaptive=False)(x)
        tiny(thresholds=None)(x)


def test_intensity_extremes_round_trip():
    gray = torch.tensor([[[-3.5, 0.25], [2.6, 1e30]]])
    assert intensity_extremes(gray).tolist() == [-3.5 * 256, 2.0**31 * 256]
    assert intensity_scale_problem([0, 3 * 256], undone=False) is not None
    assert intensity_scale_problem([0, 4 * 256], undone=False) is None
    assert intensity_scale_problem([0, 1000 * 256], undone=True) is None
    assert intensity_scale_problem([0, 1001 * 256], undone=True) is not None
    assert intensity_scale_problem([256, 256], undone=False) is None  # constant


@pytest.mark.parametrize("kwargs", [{}, IMAGENET, dict(adaptive=False)])
def test_one_host_transfer_per_forward(kwargs, photos):
    """The finite-pixel and scale checks ride on the layout's single transfer (CPU stand-in for
    tests/test_cuda.py's sync count: every Tensor-to-Python conversion is counted)."""
    model = tiny(window_size=4, window_block_indexes=(0,), **kwargs)
    x = photo_batch(photos, 128, count=2) / 255  # warns: the scale check is on its most eager path
    names = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def call(self, *args, **kw):
            calls.append(name)
            return originals[name](self, *args, **kw)
        return call

    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", InputScaleWarning)
            model(x)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    assert calls == ["tolist"]

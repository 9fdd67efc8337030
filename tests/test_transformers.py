"""transformers' DINOv2 backbones, Depth Anything and DPT with APT (apt_dense.transformers).

Tiny models (width 64, 3-4 blocks) with random weights, built from configs and saved to local
folders: nothing is downloaded. With merging off, every output is compared with transformers' own
model holding the same weights.
"""
import json

import pytest
import torch

from conftest import require

require("transformers", "transformers")

from transformers import (  # noqa: E402
    DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Backbone, Dinov2Config, Dinov2WithRegistersBackbone,
    Dinov2WithRegistersConfig, DPTConfig, DPTForDepthEstimation, pipeline,
)

from apt_dense.checkpoints import is_apt_layer  # noqa: E402
from apt_dense.presets import APT_SETTINGS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD  # noqa: E402
from apt_dense.sample_images import normalise  # noqa: E402
from apt_dense.transformers import APTDinov2Backbone, from_pretrained, swap_to_apt  # noqa: E402
from apt_dense.transformers.quality import depth_anything_processor, depth_errors  # noqa: E402

SIZES = [(518, 518), (518, 686)]
DEPTH_THRESHOLDS = APT_SETTINGS["depth"]
CONFIGS = {"dinov2": (Dinov2Config, Dinov2Backbone), "registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersBackbone)}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight (LayerScale, biases, cls/register/mask tokens start as constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def backbone_config(kind: str = "dinov2", **overrides):
    args = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=518, patch_size=14,
                layerscale_value=0.5, out_indices=[1, 3])
    args.update(overrides)
    return CONFIGS[kind][0](**args)


def depth_anything(**backbone):
    args = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=518, patch_size=14,
                out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    args.update(backbone)
    config = DepthAnythingConfig(backbone_config=Dinov2Config(**args), reassemble_hidden_size=64,
                                 neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=16, head_hidden_size=8)
    torch.manual_seed(0)
    return with_positive_depth(randomise(DepthAnythingForDepthEstimation(config)))


def with_positive_depth(model):
    """Random heads end in a ReLU that zeroes every depth and barely vary: a positive bias and
    larger weights in the last layer make the depth maps positive and varied."""
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias.fill_(1.0)
        last.weight.mul_(100.0)
    return model


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    """A saved Depth Anything folder (random weights) with its processor config."""
    folder = tmp_path_factory.mktemp("depth_anything")
    depth_anything().save_pretrained(folder)
    depth_anything_processor().save_pretrained(folder)
    return folder


def pixels(photos, size):
    """Real photos resized to ``size``, normalised as the processor does."""
    raw = torch.stack([torch.nn.functional.interpolate(
        torch.from_numpy(p).permute(2, 0, 1)[None].float(), size=size, mode="bilinear")[0] for p in photos[:2]])
    return normalise(raw.round().clamp(0, 255), IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)


# (reshape_hidden_states, apply_layernorm): feature maps or sequences (Depth Anything, DPT), each
# with and without the final LayerNorm.
LAYOUTS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_backbone_matches_transformers_with_merging_off(kind, size):
    torch.manual_seed(0)
    dense = randomise(CONFIGS[kind][1](backbone_config(kind)))
    apt = APTDinov2Backbone.from_dense(dense, adaptive=False, thresholds=DEPTH_THRESHOLDS).eval()
    assert apt.config is dense.config
    assert {k for k in apt.state_dict() if not is_apt_layer(k)} == set(dense.state_dict())
    assert (apt.out_features, apt.out_indices, apt.channels) == (dense.out_features, dense.out_indices, dense.channels)
    x = torch.randn(2, 3, *size)
    cells = (size[0] // 14) * (size[1] // 14)
    prefix = 1 + getattr(dense.config, "num_register_tokens", 0)
    # Both backbones read these settings from the config object they share at every call.
    for reshape, layernorm in LAYOUTS:
        dense.config.reshape_hidden_states, dense.config.apply_layernorm = reshape, layernorm
        with torch.no_grad():
            expected, got = dense(x).feature_maps, apt(x).feature_maps
        shape = (2, 64, size[0] // 14, size[1] // 14) if reshape else (2, prefix + cells, 64)
        assert len(got) == len(expected) == 2
        for a, b in zip(got, expected):
            assert a.shape == b.shape == shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backbone_position_grid_from_another_pretraining_size():
    """A grid learned at 224 (16 x 16 cells) is resized as transformers does, with and without antialiasing."""
    for kind in CONFIGS:
        dense = randomise(CONFIGS[kind][1](backbone_config(kind, image_size=224, out_indices=[3])))
        apt = APTDinov2Backbone.from_dense(dense, adaptive=False).eval()
        x = torch.randn(1, 3, 518, 686)
        with torch.no_grad():
            torch.testing.assert_close(apt(x).feature_maps[0], dense(x).feature_maps[0], atol=1e-5, rtol=1e-5)


def test_swiglu_backbone_matches_transformers():
    """DINOv2-giant's SwiGLU MLP (transformers 5 keys ``mlp.{gate,up,down}_proj``)."""
    for kind in CONFIGS:
        dense = randomise(CONFIGS[kind][1](backbone_config(kind, use_swiglu_ffn=True, reshape_hidden_states=False)))
        apt = APTDinov2Backbone.from_dense(dense, adaptive=False).eval()
        assert any(k.endswith("mlp.gate_proj.weight") for k in apt.state_dict())
        x = torch.randn(1, 3, 518, 686)
        with torch.no_grad():
            for a, b in zip(apt(x).feature_maps, dense(x).feature_maps):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_depth_anything_predicted_depth_identical(depth_folder, size):
    dense = DepthAnythingForDepthEstimation.from_pretrained(depth_folder).eval()
    apt = from_pretrained(depth_folder, apt=dict(adaptive=False, thresholds=DEPTH_THRESHOLDS)).eval()
    assert isinstance(apt.backbone, APTDinov2Backbone)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected, got = dense(pixel_values=x).predicted_depth, apt(pixel_values=x).predicted_depth
    assert got.shape == expected.shape == (1, *size) and expected.std() > 0.01
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_depth_pipeline_identical(depth_folder):
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.coffee())  # 400 x 600: processed to 350 x 518
    expected = pipeline("depth-estimation", model=str(depth_folder))(photo)
    apt = from_pretrained(depth_folder, apt=dict(adaptive=False))
    got = pipeline("depth-estimation", model=apt, image_processor=str(depth_folder))(photo)
    assert expected["predicted_depth"].std() > 0.01
    torch.testing.assert_close(got["predicted_depth"], expected["predicted_depth"], atol=1e-5, rtol=1e-5)
    assert got["depth"].size == expected["depth"].size == photo.size


def dpt(**backbone):
    """DPT on a DINOv2 backbone; its reassemble stage reads the cls token (readout 'project') as well as the grid."""
    args = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=518, out_indices=[1, 2, 3, 4],
                reshape_hidden_states=False)
    args.update(backbone)
    config = DPTConfig(backbone_config=Dinov2Config(**args), is_hybrid=False, readout_type="project",
                       neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=16, head_in_index=-1,
                       reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    return with_positive_depth(randomise(DPTForDepthEstimation(config)))


def test_dpt_with_dinov2_backbone_identical(tmp_path):
    """The swap of a DPT model in hand, and a saved DPT folder loaded with the swap."""
    dense = dpt()
    dense.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, apt=dict(adaptive=False)).eval()
    swapped = swap_to_apt(dense, adaptive=False).eval()
    reference = DPTForDepthEstimation.from_pretrained(tmp_path).eval()
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = reference(pixel_values=x).predicted_depth
            assert expected.std() > 0.01
            for apt in (swapped, loaded):
                assert isinstance(apt.backbone, APTDinov2Backbone)
                torch.testing.assert_close(apt(pixel_values=x).predicted_depth, expected, atol=1e-5, rtol=1e-5)


def test_folder_loads_with_only_apt_layers_missing(depth_folder, tmp_path):
    model, info = from_pretrained(depth_folder, output_loading_info=True, apt=dict(thresholds=DEPTH_THRESHOLDS))
    apt_layers = sorted(k for k in model.state_dict() if is_apt_layer(k))
    assert apt_layers == [f"backbone.embeddings.patch_embeddings.{m}.{p}" for m in ("detail", "downsample")
                          for p in ("bias", "weight")]
    assert info == {"missing_keys": apt_layers, "unexpected_keys": []}
    detail = model.backbone.embeddings.patch_embeddings.detail
    assert not detail.weight.any() and not detail.bias.any()
    # A fine-tuned APT model saves its APT layers and loads them back.
    with torch.no_grad():
        detail.weight.normal_()
    model.save_pretrained(tmp_path)
    again, info = from_pretrained(tmp_path, output_loading_info=True, apt=dict(thresholds=DEPTH_THRESHOLDS))
    assert info == {"missing_keys": [], "unexpected_keys": []}
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_mismatched_folder_is_an_error_naming_the_keys(depth_folder, tmp_path):
    """The weights of a width-64 model under a width-96 config."""
    for name in ("model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((depth_folder / name).read_bytes())
    config = json.loads((depth_folder / "config.json").read_text())
    config["backbone_config"]["hidden_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"backbone\.embeddings\.cls_token"):
        from_pretrained(tmp_path)


def test_folder_lacking_weights_is_an_error_naming_them(depth_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(depth_folder / "model.safetensors")
    del state["backbone.layernorm.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((depth_folder / "config.json").read_bytes())
    with pytest.raises(ValueError, match=r"backbone\.layernorm\.weight"):
        from_pretrained(tmp_path)


def test_merging_on_real_photos(depth_folder, photos):
    dense = DepthAnythingForDepthEstimation.from_pretrained(depth_folder).eval()
    apt = from_pretrained(depth_folder, apt=dict(thresholds=DEPTH_THRESHOLDS)).eval()
    x = pixels(photos, (518, 686))
    with torch.no_grad():
        expected, got = dense(pixel_values=x).predicted_depth, apt(pixel_values=x).predicted_depth
    assert got.shape == expected.shape and torch.isfinite(got).all()
    stats = apt.backbone.token_stats
    assert stats.images == 2 and stats.tokens < 0.9 * 2 * 37 * 49  # padding's tokens included


def test_registers_backbone_merges_and_keeps_prefix_tokens(photos):
    dense = randomise(Dinov2WithRegistersBackbone(backbone_config("registers", reshape_hidden_states=False)))
    apt = APTDinov2Backbone.from_dense(dense, thresholds=DEPTH_THRESHOLDS).eval()
    x = pixels(photos, (518, 518))
    with torch.no_grad():
        expected, got = dense(x).feature_maps, apt(x).feature_maps
    for a, b in zip(got, expected):
        assert a.shape == b.shape == (2, 5 + 37 * 37, 64) and torch.isfinite(a).all()
    assert apt.token_stats.tokens < 0.9 * 2 * 37 * 37


def test_swap_errors():
    dense = randomise(Dinov2Backbone(backbone_config()))
    apt = swap_to_apt(dense)
    assert isinstance(apt, APTDinov2Backbone)
    holder = torch.nn.Module()
    holder.backbone = apt
    with pytest.raises(TypeError, match="already"):
        swap_to_apt(holder)
    with pytest.raises(TypeError, match="no DINOv2 backbone"):
        swap_to_apt(torch.nn.Linear(2, 2))
    x = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError, match="attention weights"):
        apt(x, output_attentions=True)
    with pytest.raises(ValueError, match="attention_mask"):
        apt(x, attention_mask=torch.ones(1, 17))
    with pytest.raises(ValueError, match="stem"):
        APTDinov2Backbone(backbone_config(out_indices=[0, 3]))
    with pytest.raises(ValueError, match="no whole 14 px patch"):
        apt(torch.randn(1, 3, 10, 56))
    assert apt(x, return_dict=False)[0][0].shape == (1, 64, 4, 4)


def test_core_presets_build_and_run():
    from apt_dense import APTViT
    from apt_dense.presets import HOSTS, host_kwargs

    for name in ("dinov2_s", "depth_anything_v2_s", "depth_anything_v2_l"):
        assert HOSTS[name]["patch_size"] == 14 and HOSTS[name]["block_type"] == "dinov2"
    model = APTViT(**host_kwargs("depth_anything_v2_s", depth=3, out_indices=(0, 2)), thresholds=DEPTH_THRESHOLDS,
                   pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD).eval()
    x = torch.zeros(1, 3, 518, 518)
    with torch.no_grad():
        out = model.forward_features(x)
    assert [f.shape for f in out.features] == [(1, 384, 37, 37)] * 2
    assert [p.shape for p in out.prefix_tokens] == [(1, 1, 384)] * 2
    assert out.layout.grid_size == (40, 40) and out.layout.num_tokens < 37 * 37 / 4


@pytest.mark.slow
def test_compiled_blocks_match_eager(fresh_dynamo, photos):
    dense = randomise(Dinov2WithRegistersBackbone(backbone_config("registers")))
    apt = APTDinov2Backbone.from_dense(dense, thresholds=DEPTH_THRESHOLDS).eval()
    x = pixels(photos, (518, 518))
    with torch.no_grad():
        eager = apt(x).feature_maps
        apt.apt.compile_blocks(backend="aot_eager")
        for a, b in zip(apt(x).feature_maps, eager):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def depth_quality_tool():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import depth_quality

    return depth_quality


def test_depth_quality_tool_wiring(depth_folder, tmp_path, capsys):
    args = ["--model", str(depth_folder), "--limit", "2", "--output-dir", str(tmp_path), "--tag", "q"]
    assert depth_quality_tool().main(args) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert [row["name"] for row in result["images"]] == ["astronaut", "coffee"]
    assert [(row["height"], row["width"]) for row in result["images"]] == [(518, 518), (350, 518)]
    for row in result["images"]:
        assert 0 < row["tokens_kept"] < row["tokens_dense"] and 0 < row["abs_rel"] < 1 and 0 <= row["delta1"] <= 1
    kept = sum(row["tokens_kept"] for row in result["images"]) / sum(row["tokens_dense"] for row in result["images"])
    assert result["overall"]["images"] == 2 and result["overall"]["kept_fraction"] == pytest.approx(kept)
    assert result["config"]["thresholds"] == {str(k): v for k, v in DEPTH_THRESHOLDS.items()}
    assert "| **overall** (2 images)" in (tmp_path / "q.md").read_text()
    assert "overall:" in capsys.readouterr().out


def test_depth_errors():
    assert depth_errors(torch.ones(4, 4), torch.ones(4, 4)) == (0.0, 1.0)
    assert depth_errors(torch.full((2,), 2.0), torch.ones(2)) == (1.0, 0.0)
    # Only pixels with a positive dense depth count; none at all gives NaN, not a division error.
    assert depth_errors(torch.tensor([1.2, 5.0]), torch.tensor([1.0, 0.0])) == pytest.approx((0.2, 1.0))
    assert all(v != v for v in depth_errors(torch.ones(3), torch.zeros(3)))


def test_depth_quality_tool_errors(depth_folder, tmp_path, capsys):
    tool = depth_quality_tool()
    backbone_folder, empty, broken, blocker = (tmp_path / name for name in ("dinov2", "empty", "broken", "file"))
    randomise(Dinov2Backbone(backbone_config())).save_pretrained(backbone_folder)
    empty.mkdir()
    broken.mkdir()
    (broken / "photo.png").write_bytes(b"not a png")
    blocker.write_text("")
    out = ["--output-dir", str(tmp_path / "out")]
    usage_errors = {
        "does not exist": ["--model", str(tmp_path / "missing"), *out],
        "no config.json": ["--model", str(empty), *out],
        "'dinov2' model, not a depth model": ["--model", str(backbone_folder), *out],
        "holds no image files": ["--model", str(depth_folder), "--images", str(empty), *out],
        "is a file": ["--model", str(depth_folder), "--output-dir", str(blocker / "out")],
    }
    for message, argv in usage_errors.items():
        with pytest.raises(SystemExit) as exit_:
            tool.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, message
    assert tool.main(["--model", str(depth_folder), "--images", str(broken), *out]) == 1
    assert "no readable images" in capsys.readouterr().err
    # DPT on its own ViT (Intel/dpt-large's kind): a depth model APT cannot swap.
    own_vit = tmp_path / "dpt_vit"
    DPTForDepthEstimation(DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                    image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                                    neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=8)).save_pretrained(own_vit)
    assert tool.main(["--model", str(own_vit), *out]) == 1
    assert "DPT on its own ViT (Intel/dpt-large, dpt-hybrid) is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_dinov2_model_folder_loads_as_backbone(kind, tmp_path):
    """facebook/dinov2-* folders hold a Dinov2Model (or Dinov2WithRegistersModel): the backbone's keys."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    model_class = {"dinov2": Dinov2Model, "registers": Dinov2WithRegistersModel}[kind]
    randomise(model_class(backbone_config(kind))).save_pretrained(tmp_path)
    apt, info = from_pretrained(tmp_path, output_loading_info=True, apt=dict(adaptive=False), out_indices=[1, 3])
    dense = CONFIGS[kind][1].from_pretrained(tmp_path, out_indices=[1, 3]).eval()
    assert isinstance(apt, APTDinov2Backbone) and info["unexpected_keys"] == []
    x = torch.randn(1, 3, 518, 686)
    with torch.no_grad():
        for a, b in zip(apt.eval()(x).feature_maps, dense(x).feature_maps):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_translate_thresholds_resizes_as_the_depth_processor(photos):
    """tools/translate_thresholds.py scores photos at the sizes Depth Anything's processor gives them."""
    from test_dinov2_core import translate_tool

    resize = translate_tool().resize_as_dpt
    processor = depth_anything_processor()
    for photo in photos:
        expected = processor(images=photo, return_tensors="pt").pixel_values.shape[-2:]
        assert resize(photo, 518, 14).shape[-2:] == expected

#!/usr/bin/env python
"""APT vs the dense model, side by side: same weights, same images, alternating, after warm-up.

    python tools/benchmark.py                                   # CPU-friendly default sweep
    python tools/benchmark.py --host eva02_l_det --size 1536 --setting detection --device cuda --dtype bf16
    python tools/benchmark.py --host eva02_b_seg --size 512 --level full      # + UperNet (mmseg)
    python tools/benchmark.py --host vitdet_b --size 1024 --setting detection --level full --framework mmdet
    python tools/benchmark.py --images coco/val2017 --limit 64 --batch 8
    python tools/benchmark.py --host sam_vit_b --level full        # SamPredictor.set_image + predict
    python tools/benchmark.py --host depth_anything_v2_l --level full --threads 1

Images are prepared as each host's own pipeline does: ViTDet / EVA-02 hosts letterboxed to a
``--size`` square; SAM hosts (``sam_vit_b|l|h``) as ``SamPredictor.set_image`` does (longest side
1024, normalised, zeros bottom/right), encoder alone (``--level backbone``) or ``set_image`` +
``predict`` with a few point prompts (``--level full``); DINOv2 / Depth Anything hosts as Depth
Anything's image processor does (about 518 px, aspect kept, sides multiples of 14; one image per
batch), backbone alone or the whole ``DepthAnythingForDepthEstimation``. For SAM and DINOv2 hosts
the dense side is the host library's own model (segment-anything's, transformers') with the same
random weights; the APT side is it with APT swapped in.

Each configuration (a thresholds map) is one row: tokens kept (mean/min/max), img/s of both sides,
speedup, the ideal speedup for the tokens kept (FLOP ratio), achieved/ideal, time spent in
scoring + layout, and the peak memory of each side for inference and for a training step of the
backbone (one forward + backward, every parameter trainable, the first batch): on CUDA the most
memory allocated, on CPU the peak resident set size of the process (reset before each side, so
it includes the weights and everything else the process holds). At the full level, detectors keep every detection up to
their per-image limit (score threshold 0), so that random weights give the heads the work of a
trained detector. The dense side is the same module with adaptive patching
off: no scoring, equal-length sequences, one batched SDPA (flash / memory-efficient kernels), the
fastest honest dense path. Every argument and configuration is checked before anything is
measured, the output files included. Results go to ``<output-dir>/<tag>.{json,md,png}``, by
default ``benchmarks/results/<host>-<size>-<level>-<device>-<dtype>[-compiled][-stream].*`` (level
``full-<framework>`` for detectors), each written whole or not at all. Ctrl-C stops cleanly and
keeps the rows measured so far.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from apt_dense.attention import BACKENDS, resolve_backend
from apt_dense.benchmarking import (
    apt_engine, apt_layout, backbone_builder, backbone_flops, check_host_library, dense_layout, dinov2_config, host_family, host_image,
    host_planner, host_setting, host_size, host_window, image_folder, non_negative_float, non_negative_int,
    output_path, peak_memory_mib, positive_int, process_peak_rss_mib, same_weights_pair, sam_builder, setting_label,
    thresholds_json, time_side_by_side, timed_call, times_side_by_side, torch_device,
)
from apt_dense.outputs import atomic_write, check_output_file, check_output_folder, ctrl_c_deferred, write_error
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import image_source

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="eva02_b_seg", choices=sorted(HOSTS), help="host architecture preset")
    p.add_argument("--size", type=positive_int, default=None,
                   help="square canvas (ViTDet-style letterbox), a multiple of the largest patch (default 512); "
                        "SAM: its 1024 canvas; DINOv2 / Depth Anything: the processor's size (default 518)")
    p.add_argument("--window", type=positive_int, default=None, help="window size in cells (default: the host's)")
    p.add_argument("--depth", type=positive_int, default=None, help="fewer blocks (quick runs)")
    p.add_argument("--setting", default=None, choices=sorted(APT_SETTINGS),
                   help="base thresholds (default: sam for SAM hosts, depth for DINOv2 hosts, else segmentation)")
    p.add_argument("--scales", type=non_negative_float, nargs="+", default=[0.0, 0.8, 1.0, 1.15],
                   help="configurations: the setting's thresholds times each scale (0 = merging off)")
    p.add_argument("--thresholds", action="append", type=thresholds_json, default=None,
                   help='explicit configuration(s), JSON like \'{"32": 2, "64": 2, "128": 0.3}\' (repeatable)')
    p.add_argument("--images", type=image_folder, default=None,
                   help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--batch", type=positive_int, default=None, help="images per forward (default: all)")
    p.add_argument("--level", choices=["backbone", "full"], default="backbone",
                   help="full: the whole model, UperNet (mmseg) for *_seg hosts, Cascade / Mask R-CNN (--framework) "
                        "for detection hosts, SamPredictor.set_image + predict for sam_* hosts, "
                        "DepthAnythingForDepthEstimation for depth_anything_v2_* hosts; the ideal then counts the "
                        "heads' FLOPs")
    p.add_argument("--framework", choices=sorted(DET_CONFIGS), default=None,
                   help="detector framework for --level full with a detection host (default: detectron2)")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true",
                   help="both sides' blocks through torch.compile (APTViT.compile_blocks): the first batch "
                        "compiles and is timed as compile time; later batches that recompile are counted")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend with --compile (default inductor; eager checks the wiring quickly)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's); 1 makes the CPU-time speedup robust to other processes "
                        "on a shared machine (no spin-waiting threads)")
    p.add_argument("--stream", action="store_true",
                   help="a stream of different batches: every image also as two 60%% crops (3x the images, each "
                        "batch with its own token counts); use with --batch")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS, help="APT side's attention kernels")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory columns (each runs every input once more per side, and a training step)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per side first")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per side (the median counts)")
    p.add_argument("--output-dir", type=output_path, default=ROOT / "benchmarks" / "results",
                   help="results go to OUTPUT_DIR/TAG.json, .md and .png "
                        "(default: benchmarks/results in the repository)")
    p.add_argument("--tag", default=None, help="output file stem (default: host-size-level-device-dtype)")
    # A fresh process measures one side's peak memory where the high-water mark cannot be reset.
    p.add_argument("--memory-of", choices=["apt", "dense"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-step", choices=["inference", "train"], default="inference", help=argparse.SUPPRESS)
    p.add_argument("--memory-configuration", type=non_negative_int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        check_host_library(args.host)
        args.size = host_size(args.host, args.size, 512)
        args.setting = args.setting or host_setting(args.host, "segmentation")
        check(args)
    except ValueError as err:
        p.error(str(err))
    return args


FULL_HOSTS = {"sam": "sam_vit_b, sam_vit_l, sam_vit_h", "dinov2": "depth_anything_v2_s, depth_anything_v2_b, depth_anything_v2_l"}


def check(args) -> None:
    """Everything that can be checked before measuring: the options that go together, the
    attention backend on this device and dtype, every configuration against the host's patch
    size and windows and the canvas size, and the result files (ValueError naming it)."""
    if args.framework is not None and (args.level != "full" or args.host not in DET_CONFIGS["detectron2"]):
        raise ValueError(f"--framework chooses the detector for --level full with a detection host "
                         f"({', '.join(sorted(DET_CONFIGS['detectron2']))}); drop it or add --level full")
    family = host_family(args.host)
    full_hosts = [*SEG_CONFIGS, *DET_CONFIGS["detectron2"], *(h for h in HOSTS if h.startswith(("sam_", "depth_anything")))]
    if args.level == "full" and args.host not in full_hosts:
        raise ValueError(f"--level full has models for {', '.join(sorted(full_hosts))}; "
                         f"use one of those hosts, or --level backbone for {args.host}")
    if args.compile_backend is not None:
        import torch._dynamo

        if not args.compile:
            raise ValueError(f"--compile-backend {args.compile_backend} chooses torch.compile's backend: add --compile")
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in backends:
            raise ValueError(f"--compile-backend {args.compile_backend}: not a torch.compile backend here; "
                             f"choose one of {', '.join(backends)}")
    if (family == "dinov2" or (family == "sam" and args.level == "full")) and (args.batch or 1) != 1:
        what = "images at their own sizes" if family == "dinov2" else "one image per SamPredictor.set_image"
        raise ValueError(f"--batch {args.batch}: {args.host} takes {what}; drop --batch")
    if family == "dinov2" and args.depth is not None and args.depth < 4:
        raise ValueError(f"--depth {args.depth}: DINOv2 hosts read four blocks' outputs; use --depth 4 or more")
    host = HOSTS[args.host]
    if args.attention_backend != "auto":
        try:
            resolve_backend(args.attention_backend, args.device, DTYPES[args.dtype], has_bias=host.get("use_rel_pos", False),
                            head_dim=host["embed_dim"] // host["num_heads"], compiled=args.compile)
        except RuntimeError as err:
            raise ValueError(f"--attention-backend {args.attention_backend} on {args.device.type} in {args.dtype}: {err}") from None
    host_window(args.host, args.window, args.depth)
    for thresholds in configurations(args):
        try:
            host_planner(args.host, thresholds, img_size=args.size, window=args.window, depth=args.depth)
        except ValueError as err:
            raise ValueError(f"configuration {thresholds}: {err}") from None
    if args.memory_configuration >= len(configurations(args)):
        raise ValueError(f"--memory-configuration {args.memory_configuration}: there are {len(configurations(args))}")
    tag = args.tag or default_tag(args, args.device)
    if Path(tag).name != tag or tag in (".", ".."):
        raise ValueError(f"--tag {tag!r}: a file name without folders (the results go to --output-dir), e.g. run1")
    check_output_folder(args.output_dir, what="--output-dir")
    for path in result_paths(args).values():
        check_output_file(path, what="--output-dir/--tag")


def result_paths(args) -> dict[str, Path]:
    """``{"json": ..., "md": ..., "png": ...}``: the result files, ``<output-dir>/<tag>.<kind>``
    (the tag may contain dots: ``run.1`` gives ``run.1.json``)."""
    tag = args.tag or default_tag(args, args.device)
    return {kind: args.output_dir / f"{tag}.{kind}" for kind in ("json", "md", "png")}


def level_label(args) -> str:
    """``backbone``, ``full`` (segmentors) or ``full-<framework>`` (detectors)."""
    if args.level == "full" and args.host in DET_CONFIGS["detectron2"]:
        return f"full-{args.framework or 'detectron2'}"
    return args.level


def default_tag(args, device: torch.device) -> str:
    """``<host>-<size>-<level>-<device>-<dtype>[-compiled][-stream]``: runs that measure different
    things never overwrite each other's results."""
    suffixes = [name for name, on in (("compiled", args.compile), ("stream", args.stream)) if on]
    return "-".join([args.host, str(args.size), level_label(args), device.type, args.dtype, *suffixes])


def configurations(args) -> list[dict[int, float]]:
    if args.thresholds:
        return args.thresholds
    base = APT_SETTINGS[args.setting]
    return [{size: round(value * scale, 4) for size, value in base.items()} for scale in args.scales]


class Images(NamedTuple):
    """The photos (``(H, W, 3)`` uint8, by name), and per batch the model inputs (normalised)
    and raw 0..255 canvases (the detectors' inputs), each ``(B, 3, H, W)``."""

    photos: dict[str, np.ndarray]
    batches: list[torch.Tensor]
    raw_batches: list[torch.Tensor]


def load_images(args) -> Images:
    """The photos prepared as the host's pipeline does (:func:`apt_dense.benchmarking.host_image`),
    in batches of ``--batch`` (DINOv2 hosts: one image per batch, each at its own size).

    Raises:
        ValueError: no image of the folder could be read.
    """
    photos = dict(image_source(args.images, args.limit)[1])
    if args.stream:
        for name, photo in list(photos.items()):
            h, w = photo.shape[:2]
            photos[f"{name} top-left"] = np.ascontiguousarray(photo[: h * 3 // 5, : w * 3 // 5])
            photos[f"{name} bottom-right"] = np.ascontiguousarray(photo[h * 2 // 5 :, w * 2 // 5 :])
    prepared = [host_image(args.host, photo, args.size) for photo in photos.values()]
    one_by_one = host_family(args.host) == "dinov2" or (host_family(args.host) == "sam" and args.level == "full")
    batch = args.batch or (1 if one_by_one else len(photos))
    stacked = [[torch.stack(side) for side in zip(*prepared[i : i + batch])] for i in range(0, len(prepared), batch)]
    return Images(photos, [x.to(args.device) for _, x in stacked], [raw.to(args.device) for raw, _ in stacked])


SEG_CONFIGS = {"eva02_b_seg": "apt_upernet_eva02_b_512_ade20k.py", "eva02_l_seg": "apt_upernet_eva02_l_512_ade20k.py"}


def segmentor_builder(args, thresholds: dict, overrides: dict):
    """``build(adaptive)``: an mmseg UperNet ``EncoderDecoder`` from the project's config (BN
    instead of SyncBN: one process)."""
    try:
        from mmengine.config import Config
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    except ImportError:
        raise SystemExit("--level full needs mmsegmentation: bash tools/install_openmmlab.sh") from None
    register_all_modules()
    cfg = Config.fromfile(str(ROOT / "configs" / SEG_CONFIGS[args.host]))
    bn = dict(type="BN", requires_grad=True)
    backbone = dict(img_size=args.size, thresholds=thresholds, fpn_norm_cfg=bn,
                    attention_backend=overrides["attention_backend"])
    if "depth" in overrides:
        depth = overrides["depth"]
        backbone.update(depth=depth, out_indices=[max(0, round((i + 1) * depth / 4) - 1) for i in range(4)])
    cfg.model.backbone.update(backbone)
    cfg.model.decode_head.norm_cfg = cfg.model.auxiliary_head.norm_cfg = bn

    def build(adaptive: bool):
        cfg.model.backbone.adaptive = adaptive
        return MODELS.build(cfg.model)

    return build


DET_CONFIGS = {
    "detectron2": {"eva02_b_det": "projects/apt_vitdet_b.py", "eva02_l_det": "projects/apt_vitdet_l.py",
                   "vitdet_b": "projects/apt_mask_rcnn_vitdet_b.py", "vitdet_l": "projects/apt_mask_rcnn_vitdet_b.py"},
    "mmdet": {"eva02_b_det": "configs/mmdet/apt_eva02_cascade-mask-rcnn_vit-l_1536_coco.py",
              "eva02_l_det": "configs/mmdet/apt_eva02_cascade-mask-rcnn_vit-l_1536_coco.py",
              "vitdet_b": "configs/mmdet/apt_vitdet_mask-rcnn_vit-b_1024_coco.py",
              "vitdet_l": "configs/mmdet/apt_vitdet_mask-rcnn_vit-b_1024_coco.py"},
}


def keep_every_detection(model: torch.nn.Module) -> None:
    """Score threshold 0 in detectron2's box predictors: random weights score below the usual 0.05,
    which would leave the mask head idle; a trained detector fills its per-image limit."""
    for module in model.modules():
        if hasattr(module, "test_score_thresh"):
            module.test_score_thresh = 0.0


def detector_builder(args, thresholds: dict, overrides: dict):
    """``build(adaptive)``: a detectron2 detector from the project's LazyConfigs (Cascade Mask
    R-CNN for EVA-02, Mask R-CNN for ViTDet) with the host preset's backbone."""
    try:
        from detectron2.config import LazyConfig, instantiate
    except ImportError:
        raise SystemExit("--level full for detection hosts needs detectron2 (see README), or use --framework mmdet") from None
    from apt_dense.presets import host_kwargs

    cfg = LazyConfig.load(str(ROOT / DET_CONFIGS["detectron2"][args.host]))
    net = {k: v for k, v in host_kwargs(args.host).items() if k not in ("block_type", "norm_layer")}
    net.update(img_size=args.size, thresholds=thresholds, attention_backend=overrides["attention_backend"],
               rope=HOSTS[args.host]["block_type"] == "eva02", drop_path_rate=0.0)
    net.update(host_overrides(overrides, net["window_block_indexes"]))
    cfg.model.backbone.net.update(net)
    cfg.model.backbone.square_pad = args.size

    def build(adaptive: bool):
        cfg.model.backbone.net.adaptive = adaptive
        model = instantiate(cfg.model)
        keep_every_detection(model)
        return model

    return build


def mmdet_detector_builder(args, thresholds: dict, overrides: dict):
    """``build(adaptive)``: an MMDetection detector from the project's configs (Cascade Mask R-CNN
    for EVA-02, Mask R-CNN for ViTDet) with the host preset's backbone and a pyramid neck sized
    for it, score threshold 0 (see ``keep_every_detection``)."""
    try:
        from mmengine.config import Config
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    except ImportError:
        raise SystemExit("--level full --framework mmdet needs MMDetection: bash tools/install_openmmlab.sh") from None
    from apt_dense.presets import host_kwargs

    register_all_modules()
    import apt_dense.mmdet  # noqa: F401  (registers APTViT, APTSimpleFPN, APTRunner)

    cfg = Config.fromfile(str(ROOT / DET_CONFIGS["mmdet"][args.host]))
    backbone = {k: v for k, v in host_kwargs(args.host).items() if k != "norm_layer"}
    backbone.update(img_size=args.size, thresholds=thresholds, attention_backend=overrides["attention_backend"],
                    drop_path_rate=0.0, init_cfg=None, use_act_checkpoint=False)
    backbone.update(host_overrides(overrides, backbone["window_block_indexes"]))
    cfg.model.backbone.update(backbone)
    dim = backbone["embed_dim"]
    cfg.model.neck.update(backbone_channel=dim, in_channels=[dim // 4, dim // 2, dim, dim])
    cfg.model.data_preprocessor.batch_augments[0].size = (args.size, args.size)
    cfg.model.test_cfg.rcnn.score_thr = 0.0

    def build(adaptive: bool):
        cfg.model.backbone.adaptive = adaptive
        return MODELS.build(cfg.model)

    return build


def host_overrides(overrides: dict, window_block_indexes) -> dict:
    """``--window`` / ``--depth`` for a detector backbone (window blocks beyond the depth dropped)."""
    out = {key: overrides[key] for key in ("window_size", "depth") if key in overrides}
    if "depth" in overrides:
        out["window_block_indexes"] = [i for i in window_block_indexes if i < overrides["depth"]]
    return out


def detector_inputs(raw_batches: list[torch.Tensor]) -> list[list[dict]]:
    """detectron2 inputs: raw 0..255 RGB images (the detector normalises and pads them itself)."""
    return [[{"image": image, "height": image.shape[1], "width": image.shape[2]} for image in batch] for batch in raw_batches]


def mmdet_inputs(raw_batches: list[torch.Tensor]) -> list[dict]:
    """MMDetection ``test_step`` batches: raw 0..255 images in BGR channel order, as
    ``LoadImageFromFile`` gives them (the data preprocessor flips, normalises and pads), and
    ``DetDataSample``s with the canvas as the original image."""
    from mmdet.structures import DetDataSample

    def sample(image: torch.Tensor) -> DetDataSample:
        shape = tuple(image.shape[1:])
        return DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, scale_factor=(1.0, 1.0)))

    return [dict(inputs=[image.flip(0) for image in batch], data_samples=[sample(image) for image in batch])
            for batch in raw_batches]


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """``model``'s parameters not trainable meanwhile: FlopCounterMode's module tracker fails on a
    view of a trainable parameter made under no_grad (SAM's prompt encoder returns one)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def time_layout(model, images, repeats: int, device: torch.device) -> float:
    """Median seconds of scoring + selection + packing for one batch."""
    return time_side_by_side({"layout": lambda: apt_layout(model, images)}, device, warmup=0, repeats=repeats)["layout"]


def train_step(level: "Level", model, images: torch.Tensor, autocast) -> None:
    """One training step's forward + backward of a side's backbone (``level.backbone(model)``)
    with every parameter trainable (the loss: the sum of its feature maps, ``level.features``);
    the gradients are dropped afterwards."""
    backbone = level.backbone(model)
    for param in backbone.parameters():
        param.requires_grad_(True)
    with torch.enable_grad(), autocast:
        loss = sum(feature.float().sum() for feature in level.features(backbone, images))
    loss.backward()
    backbone.zero_grad(set_to_none=True)


class Level(NamedTuple):
    """The models of a level: ``build(adaptive)`` makes one side; ``backbone(model)`` is the ViT
    inside it (an APT model on the APT side, the host's own or APT with patching off on the
    dense side); ``features(backbone, images)`` its feature maps (a list of tensors);
    ``step(model, input)`` runs one input of ``inputs``, which are the batches (or photos) in the
    form ``step`` takes; ``neck_flops(backbone)``: FLOPs per image of the part of the backbone's
    output that is no block (SAM's neck), the same on both sides."""

    build: Callable[[bool], torch.nn.Module]
    backbone: Callable
    features: Callable
    step: Callable
    inputs: list
    neck_flops: Callable = lambda backbone: 0.0


def apt_features(model, images: torch.Tensor) -> list[torch.Tensor]:
    """An APTViT's (or a framework adapter's) feature maps."""
    return model.forward_features(images).features


def transformers_features(model, images: torch.Tensor) -> list[torch.Tensor]:
    """A DINOv2 backbone's (transformers' or APT's) feature maps."""
    return list(model(images).feature_maps)


def sam_neck_flops(encoder) -> float:
    """FLOPs of SAM's neck on one image's last block map."""
    grid = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
    first = encoder.neck[0]
    return flops_of(lambda: encoder.neck(first.weight.new_zeros(1, first.in_channels, grid, grid)))


# Point prompts of the SAM full level, as fractions of the image's width and height: one
# SamPredictor.predict per point, three masks each (as an interactive user clicks).
PROMPT_POINTS = ((0.25, 0.25), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75))


def sam_step(model, photo: np.ndarray) -> None:
    """``SamPredictor.set_image`` on ``photo``, then ``predict`` for each of :data:`PROMPT_POINTS`."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(model)
    predictor.set_image(photo)
    h, w = photo.shape[:2]
    for fx, fy in PROMPT_POINTS:
        predictor.predict(point_coords=np.array([[fx * w, fy * h]]), point_labels=np.array([1]), multimask_output=True)


# Depth Anything V2's DPT necks (depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf configs):
# neck_hidden_sizes and fusion_hidden_size.
DEPTH_NECKS = {
    "depth_anything_v2_s": ([48, 96, 192, 384], 64),
    "depth_anything_v2_b": ([96, 192, 384, 768], 128),
    "depth_anything_v2_l": ([256, 512, 1024, 1024], 256),
}


def depth_anything_builder(args, thresholds: dict, overrides: dict):
    """``build(adaptive)``: transformers' ``DepthAnythingForDepthEstimation`` with Depth Anything
    V2's shapes for ``args.host``, with APT swapped in for the APT side."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    from apt_dense.transformers import swap_to_apt

    neck, fusion = DEPTH_NECKS[args.host]
    config = DepthAnythingConfig(backbone_config=dinov2_config(args.host, overrides.get("depth")),
                                 reassemble_hidden_size=HOSTS[args.host]["embed_dim"], neck_hidden_sizes=neck,
                                 fusion_hidden_size=fusion)

    def build(adaptive: bool):
        model = DepthAnythingForDepthEstimation(copy.deepcopy(config)).eval()
        return swap_to_apt(model, thresholds=thresholds, attention_backend=overrides["attention_backend"]) if adaptive else model

    return build


def level_models(args, thresholds: dict, overrides: dict, images: Images) -> Level:
    """The models of the level (see :class:`Level`). DINOv2 hosts with every threshold 0 get base
    patches only (``thresholds=None``): APT pads images to the largest patch only to merge."""
    level, family = level_label(args), host_family(args.host)
    if family == "dinov2" and not any(thresholds.values()):
        thresholds = None
    batches = images.batches
    if level == "full-detectron2":
        return Level(detector_builder(args, thresholds, overrides), lambda m: m.backbone.net, apt_features,
                     lambda m, x: m(x), detector_inputs(images.raw_batches))
    if level == "full-mmdet":
        return Level(mmdet_detector_builder(args, thresholds, overrides), lambda m: m.backbone, apt_features,
                     lambda m, x: m.test_step(x), mmdet_inputs(images.raw_batches))
    if level == "full" and family == "sam":
        build = sam_builder(args.host, thresholds, depth=overrides.get("depth"),
                            attention_backend=overrides["attention_backend"])
        return Level(build, lambda m: m.image_encoder, lambda m, x: [m(x)], sam_step, list(images.photos.values()),
                     sam_neck_flops)
    if level == "full" and family == "dinov2":
        return Level(depth_anything_builder(args, thresholds, overrides), lambda m: m.backbone, transformers_features,
                     lambda m, x: m(pixel_values=x), batches)
    if level == "full":
        return Level(segmentor_builder(args, thresholds, overrides), lambda m: m.backbone, apt_features,
                     lambda m, x: m._forward(x), batches)
    build = backbone_builder(args.host, thresholds, **overrides)
    if family == "sam":
        return Level(build, lambda m: m, lambda m, x: [m(x)], lambda m, x: m(x), batches, sam_neck_flops)
    if family == "dinov2":
        return Level(build, lambda m: m, transformers_features, lambda m, x: m(x), batches)
    return Level(build, lambda m: m, apt_features, lambda m, x: m(x), batches)


def compile_side(backbone, backend) -> None:
    """Both sides' blocks through ``torch.compile``: an APT model's ``compile_blocks``; a host
    library's own model (SAM's encoder, transformers' DINOv2) block by block."""
    engine = apt_engine(backbone)
    if hasattr(engine, "compile_blocks"):
        engine.compile_blocks(backend=backend)
        return
    blocks = backbone.blocks if hasattr(backbone, "blocks") else backbone.encoder.layer
    for block in blocks:
        block.compile(backend=backend)


def one_side_peak(args, level: Level, batches, autocast) -> float | None:
    """In a fresh process: the peak RSS of building one side (``--memory-of``) and running its
    inference on every input or its training step (``--memory-step``)."""
    torch.manual_seed(0)
    model = level.build(args.memory_of == "apt").eval().to(args.device)
    with autocast:
        if args.memory_step == "inference":
            [level.step(model, x) for x in level.inputs]
    if args.memory_step == "train":
        train_step(level, model, batches[0], autocast)
    return process_peak_rss_mib()


def peak_in_fresh_process(argv: list[str], configuration: int, side: str, step: str) -> float | None:
    """:func:`one_side_peak` in a new process running this tool with the same arguments."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-of", side, "--memory-step", step,
               "--memory-configuration", str(configuration)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"warning: measuring the {side} side's memory in a fresh process failed: "
              f"{(result.stderr.strip().splitlines() or ['no message'])[-1]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    return dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU",
        threads=torch.get_num_threads(), cpus=os.cpu_count(), load_before=load_average(), torch=torch.__version__,
        python=platform.python_version(), memory="CUDA max allocated" if device.type == "cuda" else "peak RSS of the process",
    )


def mib_pair(row: dict, key: str) -> str:
    """``dense/APT`` peak MiB of ``peak_mib`` or ``train_peak_mib``, each with what the call added
    to the memory held when it started (``2079 (+420)``); ``n/a`` when not measured."""
    def side(name: str) -> str:
        peak, start = row.get(f"{key}_{name}"), row.get(f"{key.replace('peak', 'start')}_{name}")
        return f"{peak:.0f}" + ("" if start is None else f" (+{peak - start:.0f})")

    if row.get(f"{key}_dense") is None or row.get(f"{key}_apt") is None:
        return "n/a"
    return f"{side('dense')}/{side('apt')}"


def results_table(env: dict, args, rows: list[dict]) -> str:
    load = "/".join(f"{x:g}" for x in env["load_before"] or []) or "n/a"
    depth = rows[0]["depth"] if rows else None
    full_depth = HOSTS[args.host]["depth"]
    blocks = f"{depth} of {full_depth} blocks, " if depth is not None and depth != full_depth else ""
    lines = [
        f"{env['device']} ({env['threads']} threads of {env['cpus']} CPUs, load {load} before), torch {env['torch']}, "
        f"{args.dtype}, {level_label(args)}, {args.host} at {args.size} ({blocks}{pipeline(args)}), "
        f"batch {args.batch or 'all'}, {env['date']}; memory: {env['memory']}",
        "",
        "| thresholds | tokens kept mean (min-max) | dense img/s | APT img/s | speedup | fastest runs / CPU time | ideal "
        "| achieved/ideal | scoring+layout | inference peak MiB (added) dense/APT | train step peak MiB (added) dense/APT |"
        + (" compile s dense/APT | recompiles dense/APT |" if args.compile else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""),
    ]
    for r in rows:
        compiled = (f" {r['dense_compile_s']:.0f}/{r['apt_compile_s']:.0f} | {r['dense_recompiles']}/{r['apt_recompiles']} |"
                    if args.compile else "")
        lines.append(
            f"| {r['thresholds']} | {r['kept_mean']:.1%} ({r['kept_min']:.1%}-{r['kept_max']:.1%}) | {r['dense_img_s']:.3f} | "
            f"{r['apt_img_s']:.3f} | {r['speedup']:.2f}x | {r['speedup_of_fastest']:.2f}x / {r['cpu_speedup']:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {r['achieved_over_ideal']:.2f} | "
            f"{r['layout_fraction']:.1%} | {mib_pair(r, 'peak_mib')} | {mib_pair(r, 'train_peak_mib')} |{compiled}"
        )
    return "\n".join(lines) + "\n"


def pipeline(args) -> str:
    """How the images were prepared and what the dense side is."""
    return {"vit": "letterboxed, the dense side APT with patching off",
            "sam": "letterboxed as SamPredictor does, the dense side segment-anything's own",
            "dinov2": "Depth Anything's processor, the dense side transformers' own"}[host_family(args.host)]


def write_outputs(paths: dict[str, Path], env: dict, args, rows: list[dict]) -> list[Path]:
    """The JSON record, the table and the plot (when matplotlib is installed), each written whole
    or not at all; returns the files written."""
    options = {key: value for key, value in vars(args).items() if not key.startswith("memory_")}
    with atomic_write(paths["json"], "w") as f:
        f.write(json.dumps(dict(environment=env, args=options, rows=rows), indent=1, default=str))
    with atomic_write(paths["md"], "w") as f:
        f.write(results_table(env, args, rows))
    written = [paths["json"], paths["md"]]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return written
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["kept_mean"])
    kept = [100 * rows[i]["kept_mean"] for i in order]
    fig, ax = plt.subplots(figsize=(6, 4.4))
    ax.plot(kept, [rows[i]["ideal_speedup"] for i in order], "o--", color="tab:grey", label="ideal (FLOP ratio)")
    ax.plot(kept, [rows[i]["speedup"] for i in order], "s-", color="tab:blue", label="measured")
    setting = {str(k): round(v, 4) for k, v in APT_SETTINGS[args.setting].items()}
    setting_text = ", ".join(f"{k} px: {v:g}" for k, v in setting.items())
    for r in rows:
        if r["thresholds"] == setting:
            ax.plot([100 * r["kept_mean"]], [r["speedup"]], "*", ms=16, color="tab:red",
                    label=f"{setting_label(args.setting)} ({setting_text})")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("tokens kept (% of dense, mean over images)")
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title(f"{args.host} at {args.size} px, {level_label(args)}, {env['device']} ({env['threads']} threads), "
                 f"{args.dtype}, batch {args.batch or 'all'}", fontsize=9)
    ax.invert_xaxis()  # fewer tokens to the right: faster
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(paths["png"]) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return written + [paths["png"]]


def memory_columns(args, sides: dict, level: Level, calls: dict, batches, run, autocast, argv: list[str],
                   configuration: int) -> dict:
    """``peak_mib_<side>`` (inference on every batch) and ``train_peak_mib_<side>`` (a training
    step of the backbone on the first batch; not with ``--compile``, where it would compile the
    backward pass) for both sides, each measured alone, and what was held when each started
    (``start_mib_<side>``, ``train_start_mib_<side>``); in a fresh process per side where this
    process's peak cannot be reset (no start values then)."""
    measured = {}
    for name in ("dense", "apt"):
        measured[f"peak_mib_{name}"] = peak_memory_mib(lambda: run(calls[name]), args.device)
        measured[f"train_peak_mib_{name}"] = None if args.compile else peak_memory_mib(
            lambda: train_step(level, sides[name], batches[0], autocast), args.device)
    if measured["peak_mib_dense"] is not None:
        memory = {key: None if value is None else value.peak for key, value in measured.items()}
        memory.update({key.replace("peak", "start"): None if value is None else value.start
                       for key, value in measured.items()})
        return memory
    memory = {}
    for name in ("dense", "apt"):
        memory[f"peak_mib_{name}"] = peak_in_fresh_process(argv, configuration, name, "inference")
        memory[f"train_peak_mib_{name}"] = None if args.compile else peak_in_fresh_process(argv, configuration, name, "train")
    return memory


@torch.no_grad()
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    try:
        images = load_images(args)
    except (ValueError, ImportError) as err:  # e.g. no readable images in the folder, a library missing
        raise SystemExit(f"error: {err}") from None
    names, batches = list(images.photos), images.batches
    env = environment(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    overrides = dict(attention_backend=args.attention_backend)
    if host_family(args.host) == "vit":
        overrides.update(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD)
    if args.window is not None:
        overrides["window_size"] = args.window
    if args.depth is not None:
        overrides["depth"] = args.depth
    configs = configurations(args)
    if args.memory_of is not None:
        level = level_models(args, configs[args.memory_configuration], overrides, images)
        print(json.dumps({"peak_mib": one_side_peak(args, level, batches, autocast)}))
        return 0
    rows: list[dict] = []
    head: float | None = None
    print(f"{len(names)} images, {len(configs)} configurations, {env['device']}, {env['threads']} threads, "
          f"torch {env['torch']}, load {env['load_before']}", flush=True)
    try:
        for index, thresholds in enumerate(configs, start=1):
            level = level_models(args, thresholds, overrides, images)
            sides = dict(zip(("apt", "dense"), (m.to(device) for m in same_weights_pair(level.build))))
            apt, dense = level.backbone(sides["apt"]), level.backbone(sides["dense"])
            engine = apt_engine(apt)
            # Each side: a zero-argument call that runs every input, and one that runs the first.
            calls = {name: (lambda m=model: [level.step(m, x) for x in level.inputs]) for name, model in sides.items()}
            first = {name: (lambda m=model: level.step(m, level.inputs[0])) for name, model in sides.items()}
            if head is None:
                # Everything the model computes beyond the ViT's blocks: the heads (the whole model
                # minus its backbone) and the backbone's neck. The same on both sides and for
                # every configuration (the dense side does not depend on the thresholds).
                with frozen(sides["dense"]):
                    head = len(names) * level.neck_flops(dense) + (0.0 if args.level == "backbone" else (
                        flops_of(calls["dense"]) - sum(flops_of(lambda x=x: dense(x)) for x in batches)))

            def run(call):
                with autocast:
                    return call()

            compiled = {}
            if args.compile:
                # Entries of earlier configurations would count towards dynamo's recompile limit.
                torch._dynamo.reset()
                for name, model in (("dense", dense), ("apt", apt)):
                    counter = CompileCounterWithBackend(args.compile_backend or "inductor")
                    compile_side(model, counter)
                    first_seconds = timed_call(lambda: run(first[name]), device)
                    compiled[name] = (counter, counter.frame_count, first_seconds)

            layouts = [apt_layout(apt, x) for x in batches]
            dense_layouts = [dense_layout(apt, x) for x in batches]
            kept = np.concatenate([np.asarray(a.tokens_per_image_host) / np.asarray(d.tokens_per_image_host)
                                   for a, d in zip(layouts, dense_layouts)])
            ideal = (sum(backbone_flops(engine, d) for d in dense_layouts) + head) / (
                sum(backbone_flops(engine, a) for a in layouts) + head
            )
            times = times_side_by_side({"dense": lambda: run(calls["dense"]), "apt": lambda: run(calls["apt"])}, device,
                                       warmup=args.warmup, repeats=args.repeats)
            seconds = {name: t.median for name, t in times.items()}
            layout_seconds = sum(time_layout(apt, x, args.repeats, device) for x in batches)
            row = dict(
                thresholds={str(k): round(v, 4) for k, v in thresholds.items()},
                kept_mean=float(kept.mean()), kept_min=float(kept.min()), kept_max=float(kept.max()),
                dense_img_s=len(names) / seconds["dense"], apt_img_s=len(names) / seconds["apt"],
                speedup=seconds["dense"] / seconds["apt"], ideal_speedup=ideal,
                achieved_over_ideal=seconds["dense"] / seconds["apt"] / ideal,
                speedup_of_fastest=min(times["dense"].wall) / min(times["apt"].wall),
                cpu_speedup=times["dense"].cpu_median / times["apt"].cpu_median,
                seconds={name: dict(wall=t.wall, cpu=t.cpu) for name, t in times.items()},
                layout_fraction=layout_seconds / seconds["apt"],
                attention=engine.attention_backends(device, DTYPES[args.dtype]), depth=len(engine.blocks),
                window=engine.window_size, batches=len(batches),
            )
            for name, (counter, frames, first_seconds) in compiled.items():
                row[f"{name}_compile_s"] = first_seconds - timed_call(lambda: run(first[name]), device)
                row[f"{name}_recompiles"] = counter.frame_count - frames
            if not args.no_memory:
                row.update(memory_columns(args, sides, level, calls, batches, run, autocast, argv, index - 1))
            rows.append(row)
            print(f"[{index}/{len(configs)}] thresholds {row['thresholds']}: kept {row['kept_mean']:.1%}, "
                  f"speedup {row['speedup']:.2f}x (fastest runs {row['speedup_of_fastest']:.2f}x, CPU time "
                  f"{row['cpu_speedup']:.2f}x; ideal {ideal:.2f}x), scoring+layout {row['layout_fraction']:.1%}, "
                  f"peak MiB (added) dense/APT {mib_pair(row, 'peak_mib')}, train step {mib_pair(row, 'train_peak_mib')}",
                  flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: keeping {len(rows)} measured configuration(s)")
    if not rows:
        return 130
    env["load_after"] = load_average()
    with ctrl_c_deferred() as ctrl_c:
        try:
            written = write_outputs(result_paths(args), env, args, rows)
        except OSError as err:
            print(f"error: {write_error(err)}", file=sys.stderr)
            return 1
    print(results_table(env, args, rows))
    print(f"wrote {', '.join(map(str, written))}")
    return 0 if len(rows) == len(configs) and not ctrl_c.pressed else 130


if __name__ == "__main__":
    sys.exit(main())

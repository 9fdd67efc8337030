#!/usr/bin/env python
"""APT vs the dense model, side by side: same weights, same images, alternating, after warm-up.

    python tools/benchmark.py                                   # CPU-friendly default sweep
    python tools/benchmark.py --host eva02_l_det --size 1536 --setting detection --device cuda --dtype bf16
    python tools/benchmark.py --host eva02_b_seg --size 512 --level full      # + UperNet (mmseg)
    python tools/benchmark.py --host vitdet_b --size 1024 --setting detection --level full --framework mmdet
    python tools/benchmark.py --images coco/val2017 --limit 64 --batch 8

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
import datetime as dt
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from apt_dense.attention import BACKENDS, resolve_backend
from apt_dense.benchmarking import (
    backbone_flops, host_planner, host_window, image_folder, model_builder, non_negative_float, non_negative_int, peak_memory_mib,
    positive_int, process_peak_rss_mib, same_weights_pair, thresholds_json, time_side_by_side, timed_call,
    torch_device,
)
from apt_dense.outputs import atomic_write, check_output_file, check_output_folder, ctrl_c_deferred, write_error
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import image_source, letterbox, normalise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="eva02_b_seg", choices=sorted(HOSTS), help="host architecture preset")
    p.add_argument("--size", type=positive_int, default=512,
                   help="square canvas (ViTDet-style letterbox), a multiple of the largest patch")
    p.add_argument("--window", type=positive_int, default=None, help="window size in cells (default: the host's)")
    p.add_argument("--depth", type=positive_int, default=None, help="fewer blocks (quick runs)")
    p.add_argument("--setting", default="segmentation", choices=sorted(APT_SETTINGS), help="paper thresholds")
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
                        "for detection hosts; the ideal then counts the heads' FLOPs")
    p.add_argument("--framework", choices=sorted(DET_CONFIGS), default=None,
                   help="detector framework for --level full with a detection host (default: detectron2)")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true",
                   help="both sides' blocks through torch.compile (APTViT.compile_blocks, inductor): the first batch "
                        "compiles and is timed as compile time; later batches that recompile are counted")
    p.add_argument("--stream", action="store_true",
                   help="a stream of different batches: every image also as two 60%% crops (3x the images, each "
                        "batch with its own token counts); use with --batch")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS, help="APT side's attention kernels")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per side first")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per side (the median counts)")
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results",
                   help="results go to OUTPUT_DIR/TAG.json, .md and .png "
                        "(default: benchmarks/results in the repository)")
    p.add_argument("--tag", default=None, help="output file stem (default: host-size-level-device-dtype)")
    # A fresh process measures one side's peak memory where the high-water mark cannot be reset.
    p.add_argument("--memory-of", choices=["apt", "dense"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-step", choices=["inference", "train"], default="inference", help=argparse.SUPPRESS)
    p.add_argument("--memory-configuration", type=non_negative_int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        check(args)
    except ValueError as err:
        p.error(str(err))
    return args


def check(args) -> None:
    """Everything that can be checked before measuring: the options that go together, the
    attention backend on this device and dtype, every configuration against the host's patch
    size and windows and the canvas size, and the result files (ValueError naming it)."""
    if args.framework is not None and (args.level != "full" or args.host not in DET_CONFIGS["detectron2"]):
        raise ValueError(f"--framework chooses the detector for --level full with a detection host "
                         f"({', '.join(sorted(DET_CONFIGS['detectron2']))}); drop it or add --level full")
    if args.level == "full" and args.host not in SEG_CONFIGS and args.host not in DET_CONFIGS["detectron2"]:
        raise ValueError(f"--level full has models for {', '.join(sorted([*SEG_CONFIGS, *DET_CONFIGS['detectron2']]))}; "
                         f"use one of those hosts, or --level backbone for {args.host}")
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


def load_images(args) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Names, raw 0..255 letterboxed canvases and their normalised versions ``(N, 3, S, S)``.

    Raises:
        ValueError: no image of the folder could be read.
    """
    photos = dict(image_source(args.images, args.limit)[1])
    if args.stream:
        for name, photo in list(photos.items()):
            h, w = photo.shape[:2]
            photos[f"{name} top-left"] = np.ascontiguousarray(photo[: h * 3 // 5, : w * 3 // 5])
            photos[f"{name} bottom-right"] = np.ascontiguousarray(photo[h * 2 // 5 :, w * 2 // 5 :])
    names = list(photos)
    raw = torch.stack([letterbox(photos[name], args.size, IMAGENET_PIXEL_MEAN)[0] for name in names])
    return names, raw, normalise(raw, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)


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


def time_layout(model, images, repeats: int, device: torch.device) -> float:
    """Median seconds of scoring + selection + packing for one batch."""
    return time_side_by_side({"layout": lambda: model.planner(images)}, device, warmup=0, repeats=repeats)["layout"]


def train_step(model, images: torch.Tensor, autocast) -> None:
    """One training step's forward + backward of a backbone with every parameter trainable (the
    loss: the sum of its feature maps); the gradients are dropped afterwards."""
    for param in model.parameters():
        param.requires_grad_(True)
    with torch.enable_grad(), autocast:
        loss = sum(feature.float().sum() for feature in model(images).features)
    loss.backward()
    model.zero_grad(set_to_none=True)


def level_models(args, thresholds: dict, overrides: dict, batches, raw_batches):
    """The models of the level: ``(build, backbone, step, inputs)``: ``build(adaptive)`` makes one
    side, ``backbone(model)`` is where its APTViT sits, ``step(model, batch)`` runs one batch, and
    ``inputs`` are the batches in the form ``step`` takes."""
    level = level_label(args)
    if level == "full-detectron2":
        return (detector_builder(args, thresholds, overrides), lambda m: m.backbone.net, lambda m, x: m(x),
                detector_inputs(raw_batches))
    if level == "full-mmdet":
        return (mmdet_detector_builder(args, thresholds, overrides), lambda m: m.backbone, lambda m, x: m.test_step(x),
                mmdet_inputs(raw_batches))
    if level == "full":
        return segmentor_builder(args, thresholds, overrides), lambda m: m.backbone, lambda m, x: m._forward(x), batches
    return model_builder(args.host, thresholds, **overrides), lambda m: m, lambda m, x: m(x), batches


def one_side_peak(args, build, backbone, step, inputs, batches, autocast) -> float | None:
    """In a fresh process: the peak RSS of building one side (``--memory-of``) and running its
    inference on every batch or its training step (``--memory-step``)."""
    torch.manual_seed(0)
    model = build(args.memory_of == "apt").eval().to(args.device)
    with autocast:
        if args.memory_step == "inference":
            [step(model, x) for x in inputs]
    if args.memory_step == "train":
        train_step(backbone(model), batches[0], autocast)
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


def environment(device: torch.device) -> dict:
    return dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU",
        threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        memory="CUDA max allocated" if device.type == "cuda" else "peak RSS of the process",
    )


def mib_pair(row: dict, key: str) -> str:
    """``dense/APT`` MiB of ``peak_mib_*`` or ``train_peak_mib_*``, ``n/a`` when not measured."""
    dense, apt = row.get(f"{key}_dense"), row.get(f"{key}_apt")
    return "n/a" if dense is None or apt is None else f"{dense:.0f}/{apt:.0f}"


def results_table(env: dict, args, rows: list[dict]) -> str:
    lines = [
        f"{env['device']} ({env['threads']} threads), torch {env['torch']}, {args.dtype}, {level_label(args)}, "
        f"{args.host} at {args.size}, batch {args.batch or 'all'}, {env['date']}; memory: {env['memory']}",
        "",
        "| thresholds | tokens kept mean (min-max) | dense img/s | APT img/s | speedup | ideal | achieved/ideal | scoring+layout "
        "| inference peak MiB dense/APT | train step peak MiB dense/APT |"
        + (" compile s dense/APT | recompiles dense/APT |" if args.compile else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""),
    ]
    for r in rows:
        compiled = (f" {r['dense_compile_s']:.0f}/{r['apt_compile_s']:.0f} | {r['dense_recompiles']}/{r['apt_recompiles']} |"
                    if args.compile else "")
        lines.append(
            f"| {r['thresholds']} | {r['kept_mean']:.1%} ({r['kept_min']:.1%}-{r['kept_max']:.1%}) | {r['dense_img_s']:.3f} | "
            f"{r['apt_img_s']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['achieved_over_ideal']:.2f} | "
            f"{r['layout_fraction']:.1%} | {mib_pair(r, 'peak_mib')} | {mib_pair(r, 'train_peak_mib')} |{compiled}"
        )
    return "\n".join(lines) + "\n"


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
    paper = {str(k): round(v, 4) for k, v in APT_SETTINGS[args.setting].items()}
    paper_text = ", ".join(f"{k} px: {v:g}" for k, v in paper.items())
    for r in rows:
        if r["thresholds"] == paper:
            ax.plot([100 * r["kept_mean"]], [r["speedup"]], "*", ms=16, color="tab:red",
                    label=f"the paper's {args.setting} setting ({paper_text})")
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


def memory_columns(args, sides: dict, backbone, calls: dict, batches, run, autocast, argv: list[str],
                   configuration: int) -> dict:
    """``peak_mib_<side>`` (inference on every batch) and ``train_peak_mib_<side>`` (a training
    step of the backbone on the first batch; not with ``--compile``, where it would compile the
    backward pass) for both sides, each measured alone; in a fresh process per side where this
    process's peak cannot be reset."""
    memory = {}
    for name in ("dense", "apt"):
        memory[f"peak_mib_{name}"] = peak_memory_mib(lambda: run(calls[name]), args.device)
        memory[f"train_peak_mib_{name}"] = None if args.compile else peak_memory_mib(
            lambda: train_step(backbone(sides[name]), batches[0], autocast), args.device)
    if memory["peak_mib_dense"] is None:
        for name in ("dense", "apt"):
            memory[f"peak_mib_{name}"] = peak_in_fresh_process(argv, configuration, name, "inference")
            if not args.compile:
                memory[f"train_peak_mib_{name}"] = peak_in_fresh_process(argv, configuration, name, "train")
    return memory


@torch.no_grad()
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    device = args.device
    try:
        names, raw_images, images = load_images(args)
    except ValueError as err:  # e.g. no readable images in the folder
        raise SystemExit(f"error: {err}") from None
    batch = args.batch or len(names)
    batches = [images[i : i + batch].to(device) for i in range(0, len(names), batch)]
    raw_batches = [raw_images[i : i + batch].to(device) for i in range(0, len(names), batch)]
    env = environment(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    overrides = dict(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD,
                     attention_backend=args.attention_backend)
    if args.window is not None:
        overrides["window_size"] = args.window
    if args.depth is not None:
        overrides["depth"] = args.depth
    configs = configurations(args)
    if args.memory_of is not None:
        models = level_models(args, configs[args.memory_configuration], overrides, batches, raw_batches)
        print(json.dumps({"peak_mib": one_side_peak(args, *models, batches, autocast)}))
        return 0
    rows: list[dict] = []
    head: float | None = None
    print(f"{len(names)} images, {len(configs)} configurations, {env['device']}, torch {env['torch']}")
    try:
        for index, thresholds in enumerate(configs, start=1):
            build, backbone, step, inputs = level_models(args, thresholds, overrides, batches, raw_batches)
            sides = dict(zip(("apt", "dense"), (m.to(device) for m in same_weights_pair(build))))
            apt, dense = backbone(sides["apt"]), backbone(sides["dense"])
            # Each side: a zero-argument call that runs every batch, and one that runs the first.
            calls = {name: (lambda m=model: [step(m, x) for x in inputs]) for name, model in sides.items()}
            first = {name: (lambda m=model: step(m, inputs[0])) for name, model in sides.items()}
            if head is None:
                # The heads: everything the whole model counts beyond its ViT. The same on both sides
                # and for every configuration (the dense side does not depend on the thresholds).
                head = 0.0 if args.level == "backbone" else (
                    flops_of(calls["dense"]) - sum(flops_of(lambda x=x: dense(x)) for x in batches))

            def run(call):
                with autocast:
                    return call()

            compiled = {}
            if args.compile:
                # Entries of earlier configurations would count towards dynamo's recompile limit.
                torch._dynamo.reset()
                for name, model in (("dense", dense), ("apt", apt)):
                    counter = CompileCounterWithBackend("inductor")
                    model.compile_blocks(backend=counter)
                    first_seconds = timed_call(lambda: run(first[name]), device)
                    compiled[name] = (counter, counter.frame_count, first_seconds)

            layouts = [apt.planner(x) for x in batches]
            dense_layouts = [dense.planner(x) for x in batches]
            kept = np.concatenate([layout.kept_fraction for layout in layouts])
            ideal = (sum(backbone_flops(apt, d) for d in dense_layouts) + head) / (
                sum(backbone_flops(apt, a) for a in layouts) + head
            )
            seconds = time_side_by_side({"dense": lambda: run(calls["dense"]), "apt": lambda: run(calls["apt"])}, device,
                                        warmup=args.warmup, repeats=args.repeats)
            layout_seconds = sum(time_layout(apt, x, args.repeats, device) for x in batches)
            row = dict(
                thresholds={str(k): round(v, 4) for k, v in thresholds.items()},
                kept_mean=float(kept.mean()), kept_min=float(kept.min()), kept_max=float(kept.max()),
                dense_img_s=len(names) / seconds["dense"], apt_img_s=len(names) / seconds["apt"],
                speedup=seconds["dense"] / seconds["apt"], ideal_speedup=ideal,
                achieved_over_ideal=seconds["dense"] / seconds["apt"] / ideal,
                layout_fraction=layout_seconds / seconds["apt"],
                attention=apt.attention_backends(device, DTYPES[args.dtype]), depth=len(apt.blocks), window=apt.window_size,
                batches=len(batches),
            )
            for name, (counter, frames, first_seconds) in compiled.items():
                row[f"{name}_compile_s"] = first_seconds - timed_call(lambda: run(first[name]), device)
                row[f"{name}_recompiles"] = counter.frame_count - frames
            row.update(memory_columns(args, sides, backbone, calls, batches, run, autocast, argv, index - 1))
            rows.append(row)
            print(f"[{index}/{len(configs)}] thresholds {row['thresholds']}: kept {row['kept_mean']:.1%}, "
                  f"speedup {row['speedup']:.2f}x (ideal {ideal:.2f}x), scoring+layout {row['layout_fraction']:.1%}, "
                  f"peak MiB dense/APT {mib_pair(row, 'peak_mib')}, train step {mib_pair(row, 'train_peak_mib')}")
    except KeyboardInterrupt:
        print(f"interrupted: keeping {len(rows)} measured configuration(s)")
    if not rows:
        return 130
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

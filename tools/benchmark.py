#!/usr/bin/env python
"""APT vs the dense model, side by side: same weights, same images, alternating, after warm-up.

    python tools/benchmark.py                                   # CPU-friendly default sweep
    python tools/benchmark.py --host eva02_l_det --size 1536 --setting detection --device cuda --dtype bf16
    python tools/benchmark.py --host eva02_b_seg --size 512 --level full      # + UperNet (mmseg)
    python tools/benchmark.py --images coco/val2017 --limit 64 --batch 8

Each configuration (a thresholds map) is one row: tokens kept (mean/min/max), img/s of both sides,
speedup, the ideal speedup for the tokens kept (FLOP ratio), achieved/ideal, time spent in
scoring + layout, and peak memory (CUDA). The dense side is the same module with adaptive patching
off: no scoring, equal-length sequences, one batched SDPA (flash / memory-efficient kernels), the
fastest honest dense path. Results go to ``<output-dir>/<tag>.{json,md,png}``. Ctrl-C stops
cleanly and keeps the rows measured so far.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apt_dense.benchmarking import backbone_flops, build_model_pair, time_side_by_side
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import letterbox, load_image_folder, load_sample_photos, normalise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="eva02_b_seg", choices=sorted(HOSTS), help="host architecture preset")
    p.add_argument("--size", type=int, default=512, help="square canvas (ViTDet-style letterbox)")
    p.add_argument("--window", type=int, default=None, help="window size in cells (default: the host's)")
    p.add_argument("--depth", type=int, default=None, help="fewer blocks (quick runs)")
    p.add_argument("--setting", default="segmentation", choices=sorted(APT_SETTINGS), help="paper thresholds")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.8, 1.0, 1.15],
                   help="configurations: the setting's thresholds times each scale (0 = merging off)")
    p.add_argument("--thresholds", action="append", type=json.loads, default=None,
                   help='explicit configuration(s), JSON like \'{"32": 2, "64": 2, "128": 0.3}\' (repeatable)')
    p.add_argument("--images", type=Path, default=None, help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images from --images")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default: all)")
    p.add_argument("--level", choices=["backbone", "full"], default="backbone",
                   help="full: backbone + UperNet (mmseg, *_seg hosts); the ideal then counts the head's FLOPs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks of both sides")
    p.add_argument("--attention-backend", default="auto", help="APT side: auto, flash_attn, torch_varlen or sdpa")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default=None, help="output file stem (default: host-size-level-device-dtype)")
    return p.parse_args(argv)


def configurations(args) -> list[dict[int, float]]:
    if args.thresholds:
        return [{int(k): float(v) for k, v in t.items()} for t in args.thresholds]
    base = APT_SETTINGS[args.setting]
    return [{size: value * scale for size, value in base.items()} for scale in args.scales]


def load_images(args) -> tuple[list[str], torch.Tensor]:
    photos = load_image_folder(args.images, args.limit) if args.images else load_sample_photos()
    raw = torch.stack([letterbox(image, args.size, IMAGENET_PIXEL_MEAN)[0] for image in photos.values()])
    return list(photos), normalise(raw, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)


SEG_CONFIGS = {"eva02_b_seg": "apt_upernet_eva02_b_512_ade20k.py", "eva02_l_seg": "apt_upernet_eva02_l_512_ade20k.py"}


def build_segmentor_pair(args, thresholds: dict, overrides: dict):
    """``(apt, dense)`` mmseg UperNet ``EncoderDecoder``s from the project's config, same weights
    (BN instead of SyncBN: one process)."""
    if args.host not in SEG_CONFIGS:
        raise SystemExit(f"--level full supports the segmentation hosts {sorted(SEG_CONFIGS)} (UperNet)")
    try:
        from mmengine.config import Config
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    except ImportError:
        raise SystemExit("--level full needs mmsegmentation: bash tools/install_mmseg.sh") from None
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
    models = []
    for adaptive in (True, False):
        cfg.model.backbone.adaptive = adaptive
        torch.manual_seed(0)
        models.append(MODELS.build(cfg.model).eval())
    models[1].load_state_dict(models[0].state_dict())
    return models


def head_flops(segmentor, images: torch.Tensor) -> float:
    """FLOPs of the decode head on ``images``' features (the same for both sides)."""
    from torch.utils.flop_counter import FlopCounterMode

    features = segmentor.extract_feat(images)
    with FlopCounterMode(display=False) as counter:
        segmentor.decode_head(features)
    return float(counter.get_total_flops())


def time_layout(model, images, repeats: int, device: torch.device) -> float:
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.build_layout(images)
        timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def peak_memory(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def environment(device: torch.device) -> dict:
    return dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU",
        threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
    )


def write_outputs(stem: Path, env: dict, args, rows: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(environment=env, args=vars(args) | {"images": str(args.images),
                                                    "output_dir": str(args.output_dir)}, rows=rows), indent=1))
    lines = [
        f"{env['device']} ({env['threads']} threads), torch {env['torch']}, {args.dtype}, {args.level}, "
        f"{args.host} at {args.size}, {env['date']}",
        "",
        "| thresholds | tokens kept mean (min-max) | dense img/s | APT img/s | speedup | ideal | achieved/ideal | scoring+layout | peak MiB dense/APT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "n/a" if r["peak_mib_apt"] is None else f"{r['peak_mib_dense']:.0f}/{r['peak_mib_apt']:.0f}"
        lines.append(
            f"| {r['thresholds']} | {r['kept_mean']:.1%} ({r['kept_min']:.1%}-{r['kept_max']:.1%}) | {r['dense_img_s']:.3f} | "
            f"{r['apt_img_s']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['achieved_over_ideal']:.2f} | "
            f"{r['layout_fraction']:.1%} | {mem} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    kept = [r["kept_mean"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(kept, [r["ideal_speedup"] for r in rows], "o--", label="ideal (FLOP ratio)")
    ax.plot(kept, [r["speedup"] for r in rows], "s-", label="measured")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("mean fraction of tokens kept")
    ax.set_ylabel("speedup over dense")
    ax.set_title(f"{args.host} {args.size}, {env['device']}, {args.dtype}", fontsize=9)
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    names, images = load_images(args)
    batch = args.batch or len(names)
    batches = [images[i : i + batch].to(device) for i in range(0, len(names), batch)]
    env = environment(device)
    stem = args.output_dir / (args.tag or f"{args.host}-{args.size}-{args.level}-{device.type}-{args.dtype}")
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    overrides = dict(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD,
                     attention_backend=args.attention_backend)
    if args.window is not None:
        overrides["window_size"] = args.window
    if args.depth is not None:
        overrides["depth"] = args.depth
    rows: list[dict] = []
    configs = configurations(args)
    print(f"{len(names)} images, {len(configs)} configurations, {env['device']}, torch {env['torch']}")
    try:
        for index, thresholds in enumerate(configs, start=1):
            head = 0.0
            if args.level == "full":
                apt_run, dense_run = (m.to(device) for m in build_segmentor_pair(args, thresholds, overrides))
                apt, dense = apt_run.backbone, dense_run.backbone
                head = sum(head_flops(dense_run, x) for x in batches)
                apt_call, dense_call = apt_run._forward, dense_run._forward
            else:
                apt, dense = (m.to(device) for m in build_model_pair(args.host, thresholds, **overrides))
                apt_call, dense_call = apt, dense
            if args.compile:
                for model in (apt, dense):
                    for block in model.blocks:
                        block.compile(dynamic=True)

            def run(model):
                with autocast:
                    return [model(x) for x in batches]

            layouts = [apt.build_layout(x) for x in batches]
            dense_layouts = [dense.build_layout(x) for x in batches]
            kept = np.concatenate([layout.kept_fraction for layout in layouts])
            ideal = (sum(backbone_flops(apt, d) for d in dense_layouts) + head) / (
                sum(backbone_flops(apt, a) for a in layouts) + head
            )
            seconds = time_side_by_side({"dense": lambda: run(dense_call), "apt": lambda: run(apt_call)}, device,
                                        warmup=args.warmup, repeats=args.repeats)
            layout_seconds = sum(time_layout(apt, x, args.repeats, device) for x in batches)
            row = dict(
                thresholds={str(k): round(v, 4) for k, v in thresholds.items()},
                kept_mean=float(kept.mean()), kept_min=float(kept.min()), kept_max=float(kept.max()),
                dense_img_s=len(names) / seconds["dense"], apt_img_s=len(names) / seconds["apt"],
                speedup=seconds["dense"] / seconds["apt"], ideal_speedup=ideal,
                achieved_over_ideal=seconds["dense"] / seconds["apt"] / ideal,
                layout_fraction=layout_seconds / seconds["apt"],
                peak_mib_dense=peak_memory(lambda: run(dense_call), device), peak_mib_apt=peak_memory(lambda: run(apt_call), device),
                attention=apt.attention_backends(device, DTYPES[args.dtype]), depth=len(apt.blocks), window=apt.window_size,
            )
            rows.append(row)
            print(f"[{index}/{len(configs)}] thresholds {row['thresholds']}: kept {row['kept_mean']:.1%}, "
                  f"speedup {row['speedup']:.2f}x (ideal {ideal:.2f}x), scoring+layout {row['layout_fraction']:.1%}")
    except KeyboardInterrupt:
        print(f"interrupted: keeping {len(rows)} measured configuration(s)")
    if rows:
        write_outputs(stem, env, args, rows)
        print(stem.with_suffix(".md").read_text())
        print(f"wrote {stem}.json, .md" + (", .png" if stem.with_suffix(".png").exists() else ""))
    return 0 if len(rows) == len(configs) else 130


if __name__ == "__main__":
    sys.exit(main())

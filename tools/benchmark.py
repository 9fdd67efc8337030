#!/usr/bin/env python
"""Backbone speed of APT vs the dense model, side by side on the same photos and weights.

Both sides are the same APTViT weights; the dense side runs with adaptive patching off, which
takes the regular path (no scoring, equal-length sequences, plain batched SDPA). Results are
appended to ``benchmarks/results.jsonl`` and printed as a markdown row.

    python tools/benchmark.py --host eva02_b_det --size 1024 --setting detection
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from apt_dense.benchmarking import backbone_flops, time_side_by_side
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import letterbox, load_sample_photos

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import build_models  # noqa: E402  (same model construction as the demo)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="eva02_b_det", choices=sorted(HOSTS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--setting", default="detection", choices=sorted(APT_SETTINGS))
    p.add_argument("--no-merge", action="store_true", help="APT path with thresholds that merge nothing (overhead)")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: all sample photos)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results.jsonl"))
    return p.parse_args(argv)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    photos = list(load_sample_photos().values())[: args.batch]
    raw = torch.stack([letterbox(p, args.size, IMAGENET_PIXEL_MEAN)[0] for p in photos])
    images = ((raw - torch.tensor(IMAGENET_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_PIXEL_STD).view(1, 3, 1, 1))
    images = images.to(device)
    apt, dense = build_models(args)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

    def run(model):
        with autocast:
            return model(images)

    apt_layout, dense_layout = run(apt).layout, run(dense).layout
    seconds = time_side_by_side({"dense": lambda: run(dense), "apt": lambda: run(apt)}, device, repeats=args.repeats)
    kept = np.array(apt_layout.kept_fraction)
    ideal = backbone_flops(apt, dense_layout) / backbone_flops(apt, apt_layout)
    speedup = seconds["dense"] / seconds["apt"]
    record = dict(
        date=dt.date.today().isoformat(), host=args.host, size=args.size, setting=args.setting,
        thresholds={str(k): v for k, v in apt.schedule.threshold_map().items()}, window=apt.window_size,
        depth=len(apt.blocks), batch=len(photos), device=args.device,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), dtype=args.dtype, torch=torch.__version__,
        attention=apt.attention_backends(device, DTYPES[args.dtype]),
        kept_mean=float(kept.mean()), kept_min=float(kept.min()), kept_max=float(kept.max()),
        dense_s_per_img=seconds["dense"] / len(photos), apt_s_per_img=seconds["apt"] / len(photos),
        speedup=speedup, ideal_speedup=ideal, achieved_over_ideal=speedup / ideal,
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print("| host | size | setting | device | dtype | kept mean (min-max) | dense img/s | APT img/s | speedup | ideal | achieved/ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    setting = "merging off" if args.no_merge else args.setting
    print(f"| {args.host} | {args.size} | {setting} | {record['device_name']} x{record['threads']} | {args.dtype} | "
          f"{kept.mean():.1%} ({kept.min():.1%}-{kept.max():.1%}) | {1 / record['dense_s_per_img']:.3f} | "
          f"{1 / record['apt_s_per_img']:.3f} | {speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Depth Anything V2 with APT against transformers' dense model: speed, tokens kept and the FLOP
ideal, for the backbone alone or the whole model (backbone, DPT neck and head).

Both sides are transformers' ``DepthAnythingForDepthEstimation`` with Depth Anything V2's shapes
(random weights: patch choice does not depend on them) and the same weights; the APT side has its
backbone swapped (``apt_dense.transformers.swap_to_apt``). Inputs are photos processed as Depth
Anything's processor does (shorter side 518, multiples of 14), one image per call, timed in
alternation after a warm-up: the median of the repeats (wall and process CPU time), and the
ratio of each side's fastest run (less sensitive to other processes on a shared machine). CPU only.

The ideal speedup is the FLOP ratio: the blocks' FLOPs at the tokens kept (padding's included)
plus the neck and head (the whole dense model's FLOPs minus its backbone's), as tools/benchmark.py
counts them.

    python tools/benchmark_depth.py --host depth_anything_v2_b --level full
    python tools/benchmark_depth.py --host depth_anything_v2_l --level backbone --limit 3 --output outputs/da_l.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from apt_dense.benchmarking import backbone_flops, image_folder, positive_int, thresholds_json
from apt_dense.planner import TokenPlanner
from apt_dense.presets import APT_SETTINGS, HOSTS
from apt_dense.sample_images import load_image_folder, load_sample_photos

# Depth Anything V2's DPT necks (depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf configs):
# neck_hidden_sizes and fusion_hidden_size.
NECKS = {
    "depth_anything_v2_s": ([48, 96, 192, 384], 64),
    "depth_anything_v2_b": ([96, 192, 384, 768], 128),
    "depth_anything_v2_l": ([256, 512, 1024, 1024], 256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="depth_anything_v2_b", choices=sorted(NECKS))
    p.add_argument("--level", default="full", choices=["backbone", "full"])
    p.add_argument("--thresholds", type=thresholds_json, default=APT_SETTINGS["depth"],
                   help="APT thresholds (JSON); merging off is always measured too")
    p.add_argument("--images", type=image_folder, default=None, help="photos (default: scikit-image's)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's); 1 makes process CPU time robust to other processes "
                        "on a shared machine (no spin-waiting threads)")
    p.add_argument("--depth", type=positive_int, default=None, help="fewer blocks, at least 4 (smoke runs)")
    p.add_argument("--output", type=Path, default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.depth is not None and args.depth < 4:
        p.error("--depth must be at least 4: the DPT neck reads four blocks")
    return args


def depth_anything_v2(host: str, depth: int | None = None):
    """transformers' Depth Anything V2 model of ``host``'s shapes, random weights, eval mode."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    shape = HOSTS[host]
    layers = depth or shape["depth"]
    stages = [i + 1 for i in shape["out_indices"]] if depth is None else list(range(layers - 3, layers + 1))
    backbone = Dinov2Config(hidden_size=shape["embed_dim"], num_hidden_layers=layers, num_attention_heads=shape["num_heads"],
                            image_size=518, patch_size=14, out_indices=stages, reshape_hidden_states=False)
    neck, fusion = NECKS[host]
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=shape["embed_dim"],
                                 neck_hidden_sizes=neck, fusion_hidden_size=fusion)
    torch.manual_seed(0)
    return DepthAnythingForDepthEstimation(config).eval()


def processed(photos: dict) -> list[torch.Tensor]:
    from transformers import DPTImageProcessor

    processor = DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                  resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                  do_pad=False)
    return [processor(images=image, return_tensors="pt").pixel_values for image in photos.values()]


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def time_both(calls: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median wall and process CPU seconds (all threads) of each zero-argument call, run in
    alternation after ``warmup`` untimed rounds. CPU time is less sensitive to other processes
    on the cores, but counts the threads' spin-waits."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    median = lambda t: sorted(t)[len(t) // 2]  # noqa: E731
    wall_median = {n: median(t) for n, t in wall.items()}
    wall_median.update({f"{n}_min": min(t) for n, t in wall.items()})
    return wall_median, {n: median(t) for n, t in cpu.items()}


@torch.no_grad()
def measure(args, dense, thresholds, inputs, head: float) -> dict:
    from apt_dense.transformers import APTDinov2Backbone

    merging = thresholds is not None
    apt_model = depth_anything_v2(args.host, args.depth)
    apt_model.load_state_dict(dense.state_dict())
    apt_model.backbone = APTDinov2Backbone.from_dense(apt_model.backbone, thresholds=thresholds or APT_SETTINGS["depth"],
                                                     adaptive=merging).eval()
    sides = {"dense": dense, "apt": apt_model}
    if args.level == "backbone":
        sides = {name: model.backbone for name, model in sides.items()}
    calls = {name: (lambda m=model: [m(pixel_values=x) if args.level == "full" else m(x) for x in inputs])
             for name, model in sides.items()}
    wall, cpu = time_both(calls, args.warmup, args.repeats)
    apt = apt_model.backbone.apt
    layouts = [apt.planner(torch.nn.functional.pad(x, _padding(x, apt.size_divisibility))) for x in inputs]
    dense_layouts = [TokenPlanner(patch_size=apt.patch_size, adaptive=False)(x) for x in inputs]
    ideal = (sum(backbone_flops(apt, d) for d in dense_layouts) + head) / (sum(backbone_flops(apt, a) for a in layouts) + head)
    kept = np.array([a.num_tokens / d.num_tokens for a, d in zip(layouts, dense_layouts)])
    return dict(
        thresholds={str(k): v for k, v in thresholds.items()} if merging else "off",
        kept_mean=float(kept.mean()), kept_min=float(kept.min()), kept_max=float(kept.max()),
        dense_s=wall["dense"], apt_s=wall["apt"], speedup=wall["dense"] / wall["apt"],
        speedup_of_fastest=wall["dense_min"] / wall["apt_min"],
        cpu_speedup=cpu["dense"] / cpu["apt"], ideal=ideal, achieved_over_ideal=wall["dense"] / wall["apt"] / ideal,
        cpu_achieved_over_ideal=cpu["dense"] / cpu["apt"] / ideal,
    )


def _padding(x: torch.Tensor, unit: int) -> tuple[int, int, int, int]:
    return (0, (-x.shape[-1]) % unit, 0, (-x.shape[-2]) % unit)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = load_image_folder(args.images, args.limit) if args.images else load_sample_photos()
    photos = dict(list(photos.items())[: args.limit])
    inputs = processed(photos)
    dense = depth_anything_v2(args.host, args.depth)
    with torch.no_grad():
        head = 0.0 if args.level == "backbone" else sum(
            flops_of(lambda x=x: dense(pixel_values=x)) - flops_of(lambda x=x: dense.backbone(x)) for x in inputs)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    env = dict(host=args.host, level=args.level, images=list(photos), sizes=[list(x.shape[-2:]) for x in inputs],
               torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
               load_before=load)
    import transformers

    env["transformers"] = transformers.__version__
    print(f"{args.host} {args.level}: {len(inputs)} images {env['sizes']}, torch {env['torch']}, "
          f"{env['threads']} threads, load {' '.join(load)}", flush=True)
    rows = []
    for thresholds in (None, args.thresholds):
        row = measure(args, dense, thresholds, inputs, head)
        rows.append(row)
        print(f"thresholds {row['thresholds']}: kept {row['kept_mean']:.1%} ({row['kept_min']:.1%}-{row['kept_max']:.1%}), "
              f"dense {row['dense_s']:.2f} s, APT {row['apt_s']:.2f} s, speedup {row['speedup']:.3f}x "
              f"(fastest runs {row['speedup_of_fastest']:.3f}x) "
              f"(CPU time {row['cpu_speedup']:.3f}x), ideal {row['ideal']:.3f}x, achieved/ideal "
              f"{row['achieved_over_ideal']:.2f} (CPU time {row['cpu_achieved_over_ideal']:.2f})", flush=True)
    env["load_after"] = Path("/proc/loadavg").read_text().split()[:3] if load else []
    print(f"load after: {' '.join(env['load_after'])}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

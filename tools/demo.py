#!/usr/bin/env python
"""APT on real photos in about a minute: tokens kept per photo and a patch-map picture first,
then the dense and the APT backbone timed side by side for as long as a time budget allows.

    python tools/demo.py                      # EVA-02-B detection backbone at 1024, paper thresholds
    python tools/demo.py --budget 0           # time all five photos (about 3 minutes on 2 CPU cores)
    python tools/demo.py --size 512 --setting segmentation
    python tools/demo.py --host sam_vit_b      # SAM's image encoder, photos letterboxed as SamPredictor does
    python tools/demo.py --host depth_anything_v2_b   # DINOv2 backbone of Depth Anything V2, its processor

The models have random weights: patch selection does not depend on weights, and speed depends
only on shapes. For SAM and DINOv2 hosts the dense side is the host library's own model
(segment-anything's ``ImageEncoderViT``, transformers' ``Dinov2Backbone``). Timing runs each photo once per side (batch 1, alternating dense and APT) after
a short warm-up, in an order that keeps the photos timed so far representative of all of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from apt_dense import TokenPlanner
from apt_dense.benchmarking import (
    apt_engine, apt_layout, backbone_builder, backbone_flops, check_host_library, dense_layout, host_family, host_image,
    host_planner, host_setting, host_size, host_window, non_negative_float, output_path, positive_int,
    same_size_maps, same_weights_pair, setting_label, timed_call, torch_device,
)
from apt_dense.outputs import check_output_file, ctrl_c_deferred, write_error
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import load_sample_photos
from apt_dense.visualize import patch_map, patch_map_sheet, picture_formats, save_picture

DEFAULT_OUTPUT = Path("outputs/demo_patch_map.png")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="eva02_b_det", choices=sorted(HOSTS), help="host ViT architecture")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="square canvas the photos are letterboxed to, a multiple of the largest patch (default "
                             "1024; SAM: its 1024; DINOv2: the processor's size, default 518)")
    parser.add_argument("--setting", default=None, choices=sorted(APT_SETTINGS),
                        help="thresholds (default: sam for SAM hosts, depth for DINOv2 hosts, else detection)")
    parser.add_argument("--window", type=positive_int, default=None, help="window size in cells (default: the host's)")
    parser.add_argument("--depth", type=positive_int, default=None, help="fewer blocks for a quicker run")
    parser.add_argument("--budget", type=non_negative_float, default=60.0,
                        help="seconds for the whole demo (default 60): photos are timed until the next one would "
                             "overrun it, at least one; 0 times every photo")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--output", type=output_path, default=DEFAULT_OUTPUT,
                        help=f"patch-map picture, .png, .jpg, ... (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    try:
        check_host_library(args.host)
        args.size = host_size(args.host, args.size, 1024)
        args.setting = args.setting or host_setting(args.host, "detection")
        patching(args)
        check_output_file(args.output, suffixes=picture_formats(), what="--output")
    except ValueError as err:
        parser.error(str(err))
    return args


def patching(args) -> TokenPlanner:
    """The host's planner on raw 0..255 pixels: layouts without the big model."""
    return host_planner(args.host, APT_SETTINGS[args.setting], img_size=args.size, window=args.window, depth=args.depth)


def build_models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(apt, dense)`` backbones of the host with the same random weights
    (:func:`apt_dense.benchmarking.backbone_builder`)."""
    overrides = {}
    if host_family(args.host) == "vit":
        overrides.update(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD)
    if args.window is not None:
        overrides["window_size"] = args.window
    if args.depth is not None:
        overrides["depth"] = args.depth
    apt, dense = same_weights_pair(backbone_builder(args.host, APT_SETTINGS[args.setting], **overrides))
    return apt.to(args.device), dense.to(args.device)


def timing_order(kept: Sequence[float]) -> list[int]:
    """Photo indices ordered so that every prefix keeps about the mean fraction of tokens of all
    photos: timing only the first few then gives a representative speedup."""
    target = sum(kept) / len(kept)
    order: list[int] = []
    left = list(range(len(kept)))
    while left:
        done = sum(kept[j] for j in order)
        best = min(left, key=lambda i: abs((done + kept[i]) / (len(order) + 1) - target))
        order.append(best)
        left.remove(best)
    return order


def describe_host(args) -> str:
    host = HOSTS[args.host]
    depth = args.depth or host["depth"]
    window = host_window(args.host, args.window, args.depth)
    parts = [f"{depth} blocks" + (" (reduced by --depth)" if args.depth else ""), f"dim {host['embed_dim']}"]
    if window:
        parts.append(f"window {window} cells")
    return f"{args.host} ({', '.join(parts)})"


def warmup_images(images: torch.Tensor, unit: int, device: torch.device, any_size: bool = True) -> torch.Tensor:
    """What the warm-up pass runs on: the first photo as is on CUDA, where kernels are chosen per
    shape, or where the model takes one size only (``any_size`` False: SAM's encoder); on CPU, its
    top-left crop at about half the canvas, since the kernels need no tuning and only thread pools
    and the allocator need a first call."""
    if device.type == "cuda" or not any_size:
        return images[:1]
    side = max(unit, images.shape[-1] // 2 // unit * unit)
    return images[:1, :, :side, :side]


@torch.no_grad()
def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    device = args.device
    photos = load_sample_photos()
    names = list(photos)

    # 1. Tokens kept and the patch map: patching needs no big model.
    planner = patching(args)
    prepared = [host_image(args.host, photo, args.size, planner.size_divisibility) for photo in photos.values()]
    patch = planner.patch_size
    kept, maps = [], []
    thresholds = planner.schedule.threshold_map()
    canvas = f"{args.size}x{args.size}" if host_family(args.host) != "dinov2" else f"{args.size} px (aspect kept)"
    print(f"{describe_host(args)} at {canvas}; patch sizes {planner.schedule.patch_sizes}, "
          f"thresholds {thresholds} ({setting_label(args.setting)})")
    print(f"{'photo':<20}{'tokens':>8}{'dense':>8}{'kept':>8}")
    for name, (raw, x) in zip(names, prepared):
        layout = planner(raw[None])
        tokens, cells = layout.tokens_per_image_host[0], (x.shape[-2] // patch) * (x.shape[-1] // patch)
        kept.append(tokens / cells)
        maps.append(dataclasses.replace(patch_map(raw, layout, 0, planner.schedule.patch_sizes, name), dense_tokens=cells))
        print(f"{name:<20}{tokens:>8}{cells:>8}{kept[-1]:>8.1%}")
    print(f"{'mean':<20}{'':>16}{sum(kept) / len(kept):>8.1%}")
    title = (f"APT patch sizes on scikit-image photos for {args.host} at {args.size} px, thresholds {thresholds} "
             f"({setting_label(args.setting)})")
    sheet = patch_map_sheet(same_size_maps(maps), columns=3, title=title,
                            notes=["the canvas below or right of a photo is padding"])
    with ctrl_c_deferred() as ctrl_c:
        try:
            save_picture(sheet, args.output)
        except OSError as err:
            print(f"error: {write_error(err)}", file=sys.stderr)
            return 1
    if ctrl_c.pressed:
        return 130
    print(f"patch map written to {args.output}\n")

    # 2. Speed: the real host shapes, one photo at a time while the budget lasts.
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    budget = f"budget {args.budget:g} s for the whole demo" if args.budget else "no budget: every photo"
    print(f"Speed, dense vs APT backbone: same random weights, batch 1, one run per side per photo, "
          f"{device.type}{threads}; {budget}")
    tick = time.perf_counter()
    print("building both models ...", end=" ", flush=True)
    apt, dense = build_models(args)
    print(f"{time.perf_counter() - tick:.1f} s")
    images = [x[None].to(device) for _, x in prepared]
    engine = apt_engine(apt)
    warm = warmup_images(images[0], engine.size_divisibility, device, any_size=host_family(args.host) != "sam")
    print(f"warm-up pass on {warm.shape[-2]}x{warm.shape[-1]} ...", end=" ", flush=True)
    print(f"{timed_call(lambda: (dense(warm), apt(warm)), device):.1f} s")

    print(f"{'photo':<20}{'kept':>8}{'dense s':>10}{'APT s':>8}{'speedup':>9}{'ideal':>8}")
    order = timing_order(kept)
    timed: list[int] = []
    seconds = {"dense": 0.0, "apt": 0.0}
    cpu_seconds = {"dense": 0.0, "apt": 0.0}  # this process's CPU time: what other load cannot inflate
    flops = {"dense": 0.0, "apt": 0.0}
    interrupted = False
    try:
        for i in order:
            per_photo = (seconds["dense"] + seconds["apt"]) / len(timed) if timed else 0.0
            if timed and args.budget and time.perf_counter() - start + per_photo > args.budget:
                break
            x = images[i]
            print(f"{names[i]:<20}{kept[i]:>8.1%}", end="", flush=True)
            cpu = time.process_time()
            dense_s = timed_call(lambda: dense(x), device)
            cpu_seconds["dense"] += time.process_time() - cpu
            print(f"{dense_s:>10.2f}", end="", flush=True)
            cpu = time.process_time()
            apt_s = timed_call(lambda: apt(x), device)
            cpu_seconds["apt"] += time.process_time() - cpu
            # Ideal speedup: the ratio of block FLOPs for the tokens kept.
            photo_flops = {"dense": backbone_flops(engine, dense_layout(apt, x)),
                           "apt": backbone_flops(engine, apt_layout(apt, x))}
            ideal = photo_flops["dense"] / photo_flops["apt"]
            print(f"{apt_s:>8.2f}{dense_s / apt_s:>8.2f}x{ideal:>7.2f}x", flush=True)
            seconds["dense"] += dense_s
            seconds["apt"] += apt_s
            for side in flops:
                flops[side] += photo_flops[side]
            timed.append(i)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted")
    if not timed:
        return 130
    if len(timed) < len(names) and not interrupted:
        print(f"timed {len(timed)} of {len(names)} photos to stay within the {args.budget:g} s budget; "
              f"--budget 0 times all {len(names)}")
    timed_kept = sum(kept[i] for i in timed) / len(timed)
    n = len(timed)
    which = f"all {n} photos" if n == len(names) else ("this photo" if n == 1 else f"these {n} photos")
    print(f"on {which}: {timed_kept:.1%} of tokens kept, dense "
          f"{seconds['dense'] / n:.2f} s/photo, APT {seconds['apt'] / n:.2f} s/photo, speedup "
          f"{seconds['dense'] / seconds['apt']:.2f}x (ideal {flops['dense'] / flops['apt']:.2f}x)")
    share = sum(cpu_seconds.values()) / (sum(seconds.values()) * torch.get_num_threads())
    if device.type == "cpu" and share < 0.8:
        print(f"note: other processes shared the CPU (this one got {share:.0%} of {torch.get_num_threads()} threads' "
              f"time), so the wall times are inflated and noisy; in CPU time the speedup is "
              f"{cpu_seconds['dense'] / cpu_seconds['apt']:.2f}x")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

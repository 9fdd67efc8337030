#!/usr/bin/env python
"""APT on real photos: tokens kept per image, dense-vs-APT backbone speed, and a patch-map picture.

    python tools/demo.py                      # EVA-02-B detection backbone at 1024, paper thresholds
    python tools/demo.py --size 512 --setting segmentation
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from apt_dense import APTViT
from apt_dense.benchmarking import build_model_pair, time_side_by_side
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import SAMPLE_PHOTOS, letterbox, load_sample_photos, normalise
from apt_dense.visualize import draw_patch_map, image_grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="eva02_b_det", choices=sorted(HOSTS), help="host ViT architecture")
    parser.add_argument("--size", type=int, default=1024, help="square canvas the photos are letterboxed to")
    parser.add_argument("--setting", default="detection", choices=sorted(APT_SETTINGS), help="paper thresholds")
    parser.add_argument("--window", type=int, default=None, help="window size in cells (default: the host's)")
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks for a quicker run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("outputs/demo_patch_map.png"))
    return parser.parse_args(argv)


def build_models(args) -> tuple[APTViT, APTViT]:
    overrides = dict(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD)
    if args.window is not None:
        overrides["window_size"] = args.window
    if args.depth is not None:
        overrides["depth"] = args.depth
    apt, dense = build_model_pair(args.host, APT_SETTINGS[args.setting], **overrides)
    return apt.to(args.device), dense.to(args.device)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    photos = load_sample_photos()
    canvases = [letterbox(photo, args.size, IMAGENET_PIXEL_MEAN)[0] for photo in photos.values()]
    raw = torch.stack(canvases)
    images = normalise(raw, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD).to(args.device)

    apt, dense = build_models(args)
    out = apt(images)
    layout = out.layout
    cells = layout.grid_size[0] * layout.grid_size[1]
    print(f"host {args.host} (random weights) at {args.size}x{args.size}, patch sizes "
          f"{apt.schedule.patch_sizes}, thresholds {apt.schedule.threshold_map()} ({args.setting})")
    print(f"{'image':<20}{'tokens':>8}{'dense':>8}{'kept':>8}")
    for name, kept in zip(SAMPLE_PHOTOS, layout.tokens_per_image_host):
        print(f"{name:<20}{kept:>8}{cells:>8}{kept / cells:>8.1%}")
    mean_kept = sum(layout.kept_fraction) / len(layout.kept_fraction)
    print(f"{'mean':<20}{'':>16}{mean_kept:>8.1%}")

    seconds = time_side_by_side(
        {"dense": lambda: dense(images), "apt": lambda: apt(images)}, torch.device(args.device), repeats=args.repeats
    )
    batch = images.shape[0]
    print(f"backbone time per image on {args.device} ({torch.get_num_threads()} threads): "
          f"dense {seconds['dense'] / batch:.3f} s, APT {seconds['apt'] / batch:.3f} s, "
          f"speedup {seconds['dense'] / seconds['apt']:.2f}x")

    pictures = [draw_patch_map(raw[i], layout, i, apt.patch_size) for i in range(batch)]
    captions = [f"{n}: {k}/{cells} tokens" for n, k in zip(SAMPLE_PHOTOS, layout.tokens_per_image_host)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pictures, columns=min(batch, 5), tile=320, captions=captions).save(args.output)
    print(f"patch map written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

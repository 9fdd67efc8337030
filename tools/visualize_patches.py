#!/usr/bin/env python
"""Patch-size maps over images: a PNG sheet (colour per patch size, token counts, legend) and
tokens kept per image (CSV next to it).

    python tools/visualize_patches.py                               # scikit-image's sample photos
    python tools/visualize_patches.py --images val2017 --limit 24 --size 1536 --setting detection

Images are read one at a time; Ctrl-C writes the images done so far.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import torch

from apt_dense.benchmarking import existing_folder, build_planner, positive_int, thresholds_json
from apt_dense.presets import APT_SETTINGS, IMAGENET_PIXEL_MEAN
from apt_dense.sample_images import image_files, iter_image_folder, letterbox, load_sample_photos
from apt_dense.visualize import patch_map, patch_map_sheet

DEFAULT_OUTPUT = Path("outputs/patch_maps.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=existing_folder, default=None,
                   help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--size", type=positive_int, default=1024,
                   help="square canvas (ViTDet-style letterbox), a multiple of the largest patch")
    p.add_argument("--patch-size", type=positive_int, default=16)
    p.add_argument("--setting", default="detection", choices=sorted(APT_SETTINGS))
    p.add_argument("--thresholds", type=thresholds_json, default=None,
                   help='JSON {"32": 2, "64": 2, "128": 0.3} (overrides --setting)')
    p.add_argument("--scorer", default="entropy", choices=["entropy", "laplacian", "upsample_mse"])
    p.add_argument("--columns", type=positive_int, default=4)
    p.add_argument("--tile", type=positive_int, default=320, help="width of each map in pixels")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help=f"PNG sheet; the CSV gets the same name (default: {DEFAULT_OUTPUT})")
    args = p.parse_args(argv)
    try:
        patching(args)
    except ValueError as err:
        p.error(str(err))
    return args


def patching(args):
    """The planner with the requested patching, on raw 0..255 pixels."""
    thresholds = args.thresholds or APT_SETTINGS[args.setting]
    return build_planner(thresholds, img_size=args.size, patch_size=args.patch_size, scorer=args.scorer)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    planner = patching(args)
    if args.images:
        total = min(len(image_files(args.images)), args.limit or sys.maxsize)
        photos = iter_image_folder(args.images, args.limit)
    else:
        photos = iter(load_sample_photos().items())
        total = 5
    cells = (args.size // args.patch_size) ** 2
    maps, rows = [], []
    interrupted = False
    try:
        for index, (name, image) in enumerate(photos, start=1):
            raw, _ = letterbox(image, args.size, IMAGENET_PIXEL_MEAN)
            layout = planner(raw.unsqueeze(0))
            maps.append(patch_map(raw, layout, 0, planner.schedule.patch_sizes, name, args.tile))
            kept = layout.tokens_per_image_host[0]
            rows.append((name, kept, cells, round(kept / cells, 4)))
            print(f"[{index}/{total}] {name}: {kept}/{cells} tokens ({kept / cells:.1%})", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} images done so far")
    if not rows:
        return 130
    title = (f"APT patch sizes at {args.size} px, thresholds {planner.schedule.threshold_map()}, "
             f"{args.scorer} scorer")
    notes = ["the canvas below or right of an image is letterbox padding"]
    sheet = patch_map_sheet(maps, args.columns, title, notes)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    with args.output.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "tokens", "dense_tokens", "kept_fraction"])
        writer.writerows(rows)
    mean = sum(r[1] for r in rows) / (len(rows) * cells)
    print(f"mean kept {mean:.1%}; wrote {args.output} and {args.output.with_suffix('.csv')}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

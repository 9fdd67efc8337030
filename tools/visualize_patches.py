#!/usr/bin/env python
"""Patch-size maps over images: a PNG sheet (colour per patch size, token counts, legend) and
tokens kept per image (CSV next to it).

    python tools/visualize_patches.py                               # scikit-image's sample photos
    python tools/visualize_patches.py --images val2017 --limit 24 --size 1536 --setting detection
    python tools/visualize_patches.py --host sam_vit_b              # as SamPredictor letterboxes, SAM setting
    python tools/visualize_patches.py --host depth_anything_v2_b    # Depth Anything's processor, 14 px patches

Without ``--host`` images are letterboxed to a ``--size`` square (ViTDet's LSJ). With a host they
are prepared as its own pipeline does (SAM: longest side 1024, padded bottom/right; DINOv2 /
Depth Anything: about 518 px, aspect kept, padded only to the largest patch), scored with its
patch size and windows, and the thresholds default to its setting.

Images are read one at a time; Ctrl-C writes the images done so far. The output paths are
checked before any image is read, and the files are written whole or not at all.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from apt_dense.benchmarking import (
    add_patching_arguments,
    host_image, image_folder, int_between, output_path, positive_int, resolve_host_arguments, same_size_maps,
    setting_label, thresholds_json, tool_planner,
)
from apt_dense.outputs import atomic_write, check_output_file, ctrl_c_deferred, write_error
from apt_dense.presets import APT_SETTINGS
from apt_dense.sample_images import image_source
from apt_dense.visualize import patch_map, patch_map_sheet, picture_formats, save_picture

DEFAULT_OUTPUT = Path("outputs/patch_maps.png")
MAX_TILE = 2048  # px: a map is drawn at this width in float32 before it is pasted
MAX_SHEET_PIXELS = 2**27  # about 400 MB of RGB for the whole sheet, held in memory once


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=image_folder, default=None,
                   help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    add_patching_arguments(p, default_size=1024, default_setting="detection")
    p.add_argument("--thresholds", type=thresholds_json, default=None,
                   help='JSON {"32": 2, "64": 2, "128": 0.3} (overrides --setting)')
    p.add_argument("--scorer", default="entropy", choices=["entropy", "laplacian", "upsample_mse"])
    p.add_argument("--columns", type=positive_int, default=4)
    p.add_argument("--tile", type=int_between(1, MAX_TILE, " (px)"), default=320, help="width of each map in pixels")
    p.add_argument("--output", type=output_path, default=DEFAULT_OUTPUT,
                   help=f"picture of the sheet (.png, .jpg, ...); the CSV gets the same name (default: {DEFAULT_OUTPUT})")
    args = p.parse_args(argv)
    try:
        resolve_host_arguments(args, default_size=1024, default_setting="detection")
        patching(args)
        check_output_file(args.output, suffixes=picture_formats(), what="--output")
        check_output_file(args.output.with_suffix(".csv"), what="--output (its CSV)")
    except ValueError as err:
        p.error(str(err))
    args.count, args.photos = image_source(args.images, args.limit)
    if args.count * args.tile**2 > MAX_SHEET_PIXELS:
        most = max(1, MAX_SHEET_PIXELS // args.tile**2)
        p.error(f"{args.count} maps of {args.tile} px make a sheet over {MAX_SHEET_PIXELS // 10**6} megapixels; "
                f"use --limit {most} or a smaller --tile")
    return args


def patching(args):
    """The planner with the requested patching, on raw 0..255 pixels."""
    return tool_planner(args, args.thresholds or APT_SETTINGS[args.setting])


def write_results(args, maps, rows, title: str) -> None:
    """The sheet and the CSV, each whole or not at all."""
    notes = ["the canvas below or right of an image is padding"]
    sheet = patch_map_sheet(same_size_maps(maps), args.columns, title, notes)
    save_picture(sheet, args.output)
    with atomic_write(args.output.with_suffix(".csv"), "w") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "tokens", "dense_tokens", "kept_fraction"])
        writer.writerows(rows)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    planner = patching(args)
    maps, rows = [], []
    interrupted = False
    try:
        for index, (name, image) in enumerate(args.photos, start=1):
            raw, x = host_image(args.host, image, args.size, planner.size_divisibility)
            layout = planner(raw.unsqueeze(0))
            kept = layout.tokens_per_image_host[0]
            cells = (x.shape[-2] // args.patch_size) * (x.shape[-1] // args.patch_size)  # the dense model's tokens
            drawn = patch_map(raw, layout, 0, planner.schedule.patch_sizes, name, args.tile)
            maps.append(dataclasses.replace(drawn, dense_tokens=cells))
            rows.append((name, kept, cells, round(kept / cells, 4)))
            print(f"[{index}/{args.count}] {name}: {kept}/{cells} tokens ({kept / cells:.1%})", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} images done so far")
    except ValueError as err:  # no readable image in the folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not rows:
        return 130
    setting = "given" if args.thresholds else setting_label(args.setting)
    title = (f"APT patch sizes{f' for {args.host}' if args.host else ''} at {args.size} px, thresholds "
             f"{planner.schedule.threshold_map()} ({setting}), {args.scorer} scorer")
    with ctrl_c_deferred() as ctrl_c:
        try:
            write_results(args, maps, rows, title)
        except OSError as err:
            print(f"error: {write_error(err)}", file=sys.stderr)
            return 1
    mean = sum(r[1] / r[2] for r in rows) / len(rows)
    print(f"mean kept {mean:.1%}; wrote {args.output} and {args.output.with_suffix('.csv')}")
    return 130 if interrupted or ctrl_c.pressed else 0


if __name__ == "__main__":
    sys.exit(main())

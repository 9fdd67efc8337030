#!/usr/bin/env python
"""Patch-size maps over images: a grid PNG (colour per patch size) and tokens kept per image.

    python tools/visualize_patches.py                               # scikit-image's sample photos
    python tools/visualize_patches.py --images val2017 --limit 24 --size 1536 --setting detection
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from apt_dense import APTViT
from apt_dense.presets import APT_SETTINGS, IMAGENET_PIXEL_MEAN
from apt_dense.sample_images import letterbox, load_image_folder, load_sample_photos
from apt_dense.visualize import draw_patch_map, image_grid


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=None, help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--size", type=int, default=1024, help="square canvas (ViTDet-style letterbox)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--setting", default="detection", choices=sorted(APT_SETTINGS))
    p.add_argument("--thresholds", type=str, default=None, help='JSON {"32": 2, "64": 2, "128": 0.3} (overrides --setting)')
    p.add_argument("--scorer", default="entropy", choices=["entropy", "laplacian", "upsample_mse"])
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--tile", type=int, default=320, help="grid cell size in pixels")
    p.add_argument("--output", type=Path, default=Path("outputs/patch_maps.png"))
    return p.parse_args(argv)


def thresholds_from(args) -> dict[int, float]:
    import json

    if args.thresholds:
        return {int(k): float(v) for k, v in json.loads(args.thresholds).items()}
    return APT_SETTINGS[args.setting]


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    photos = load_image_folder(args.images, args.limit) if args.images else load_sample_photos()
    # Layout only: a one-block model with no weights that matter.
    model = APTViT(img_size=args.size, patch_size=args.patch_size, embed_dim=16, depth=1, num_heads=1,
                   thresholds=thresholds_from(args), scorer=args.scorer)
    cells = (args.size // args.patch_size) ** 2
    pictures, captions, rows = [], [], []
    try:
        for index, (name, image) in enumerate(photos.items(), start=1):
            raw, _ = letterbox(image, args.size, IMAGENET_PIXEL_MEAN)
            layout = model.build_layout(raw.unsqueeze(0))
            kept = layout.tokens_per_image_host[0]
            pictures.append(draw_patch_map(raw, layout, 0, args.patch_size))
            captions.append(f"{name}: {kept}/{cells}")
            rows.append((name, kept, cells, kept / cells))
            print(f"[{index}/{len(photos)}] {name}: {kept}/{cells} tokens ({kept / cells:.1%})", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: writing the {len(rows)} images done so far")
    if not rows:
        return 130
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pictures, columns=min(args.columns, len(pictures)), tile=args.tile, captions=captions).save(args.output)
    with args.output.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "tokens", "dense_tokens", "kept_fraction"])
        writer.writerows(rows)
    mean = sum(r[3] for r in rows) / len(rows)
    print(f"mean kept {mean:.1%}; wrote {args.output} and {args.output.with_suffix('.csv')}")
    return 0 if len(rows) == len(photos) else 130


if __name__ == "__main__":
    sys.exit(main())

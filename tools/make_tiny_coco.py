#!/usr/bin/env python
"""Write a tiny COCO-format instance dataset (images + instances JSON with boxes and polygon
masks) for smoke runs: real photo backgrounds (scikit-image's samples), squares and discs as the
two categories, and a flat letterbox band on some images so that APT has something to merge.

    python tools/make_tiny_coco.py OUT_DIR --images 8 --size 256

Images are crops of the sample photos, so ``--size`` is at most the smallest photo's side
(:data:`MAX_SIZE`). The folder is written whole or not at all (a full disk
or Ctrl-C leaves it as it was).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from apt_dense.benchmarking import int_between, non_negative_int, output_path
from apt_dense.outputs import atomic_write, check_output_folder, staged_folder, write_error
from apt_dense.sample_images import load_sample_photos
from apt_dense.visualize import save_picture

MIN_SIZE, MAX_SIZE = 32, 300  # one 32 px patch; the smallest sample photo (chelsea) is 300 px high
MAX_IMAGES = 10_000  # a smoke-run set: more is a typo, not a dataset

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]


def _disc_polygon(cx: float, cy: float, r: float, points: int = 24) -> list[float]:
    return [v for k in range(points) for v in (cx + r * math.cos(2 * math.pi * k / points), cy + r * math.sin(2 * math.pi * k / points))]


def make_tiny_coco(out_dir: str | Path, num_images: int = 8, size: int = 256, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out_dir/images/*.jpg`` and ``out_dir/instances.json``; return (json, image dir)."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    photos = list(load_sample_photos().values())
    images, annotations = [], []
    for i in range(num_images):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - size + 1)
        left = rng.integers(0, photo.shape[1] - size + 1)
        canvas = Image.fromarray(photo[top : top + size, left : left + size].copy())
        draw = ImageDraw.Draw(canvas)
        if i % 2:  # letterbox band: a flat region, as a square canvas's padding
            draw.rectangle([0, size * 3 // 4, size, size], fill=(124, 116, 104))
        for _ in range(rng.integers(1, 4)):
            category = int(rng.integers(1, 3))
            extent = float(rng.uniform(size / 8, size / 4))
            x0 = float(rng.uniform(0, size * 3 / 4 - extent))
            y0 = float(rng.uniform(0, size * 3 / 4 - extent))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if category == 1:
                polygon = [x0, y0, x0 + extent, y0, x0 + extent, y0 + extent, x0, y0 + extent]
                area = extent * extent
            else:
                polygon = _disc_polygon(x0 + extent / 2, y0 + extent / 2, extent / 2)
                area = math.pi * (extent / 2) ** 2
            draw.polygon(polygon, fill=colour)
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1, category_id=category, iscrowd=0, area=area,
                bbox=[x0, y0, extent, extent], segmentation=[polygon],
            ))
        name = f"{i:04d}.jpg"
        save_picture(canvas, image_dir / name, quality=95)
        images.append(dict(id=i + 1, file_name=name, height=size, width=size))
    json_path = out_dir / "instances.json"
    with atomic_write(json_path, "w") as f:
        f.write(json.dumps(dict(images=images, annotations=annotations, categories=CATEGORIES)))
    return json_path, image_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=output_path)
    p.add_argument("--images", type=int_between(1, MAX_IMAGES), default=8, help="images")
    p.add_argument("--size", type=int_between(MIN_SIZE, MAX_SIZE, " (px, crops of the sample photos)"), default=256)
    p.add_argument("--seed", type=non_negative_int, default=0)
    args = p.parse_args(argv)
    try:
        check_output_folder(args.out_dir, what="out_dir")
    except ValueError as err:
        p.error(str(err))
    try:
        with staged_folder(args.out_dir) as stage:
            json_path, image_dir = make_tiny_coco(stage, args.images, args.size, args.seed)
    except OSError as err:
        print(f"error: {write_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.out_dir}", file=sys.stderr)
        return 130
    print(f"wrote {args.out_dir / json_path.name} and {args.out_dir / image_dir.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Write a tiny ADE20K-format folder for smoke runs: ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` (uint8 labels, 0 = ignore, 1..150 = classes as in
ADEChallengeData2016). Real photo backgrounds (scikit-image's samples) carry class 1; drawn
squares and discs carry classes 2 and 3; some images get a flat letterbox band (class 4).

    python tools/make_tiny_ade20k.py OUT_DIR --train 8 --val 4 --size 160

Images are crops of the sample photos, so ``--size`` is at most the smallest photo's side
(:data:`MAX_SIZE`). The folder is written whole or not at all (a full disk
or Ctrl-C leaves it as it was).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from apt_dense.benchmarking import int_between, non_negative_int, output_path
from apt_dense.outputs import check_output_folder, staged_folder, write_error
from apt_dense.sample_images import load_sample_photos
from apt_dense.visualize import save_picture

MIN_SIZE, MAX_SIZE = 32, 300  # one 32 px patch; the smallest sample photo (chelsea) is 300 px high
MAX_IMAGES = 10_000  # a smoke-run set: more is a typo, not a dataset


def _write_split(root: Path, split: str, count: int, size: int, rng: np.random.Generator, photos: list) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - size + 1)
        left = rng.integers(0, photo.shape[1] - size + 1)
        image = Image.fromarray(photo[top : top + size, left : left + size].copy())
        label = Image.new("L", (size, size), 1)
        draw_image, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
        if i % 2:
            band = [0, size * 3 // 4, size, size]
            draw_image.rectangle(band, fill=(124, 116, 104))
            draw_label.rectangle(band, fill=4)
        for _ in range(rng.integers(1, 4)):
            extent = int(rng.integers(size // 8, size // 3))
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4 - extent, 2))
            box = [x0, y0, x0 + extent, y0 + extent]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.integers(0, 2):
                draw_image.rectangle(box, fill=colour)
                draw_label.rectangle(box, fill=2)
            else:
                draw_image.ellipse(box, fill=colour)
                draw_label.ellipse(box, fill=3)
        name = f"ADE_{split}_{i:08d}"
        save_picture(image, root / "images" / split / f"{name}.jpg", quality=95)
        save_picture(label, root / "annotations" / split / f"{name}.png")


def make_tiny_ade20k(out_dir: str | Path, train: int = 8, val: int = 4, size: int = 160, seed: int = 0) -> Path:
    """Write the folder and return its root (the ``data_root`` of mmseg's ADE20KDataset)."""
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    photos = list(load_sample_photos().values())
    _write_split(root, "training", train, size, rng, photos)
    _write_split(root, "validation", val, size, rng, photos)
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=output_path)
    p.add_argument("--train", type=int_between(1, MAX_IMAGES), default=8, help="training images")
    p.add_argument("--val", type=int_between(1, MAX_IMAGES), default=4, help="validation images")
    p.add_argument("--size", type=int_between(MIN_SIZE, MAX_SIZE, " (px, crops of the sample photos)"), default=160)
    p.add_argument("--seed", type=non_negative_int, default=0)
    args = p.parse_args(argv)
    try:
        check_output_folder(args.out_dir, what="out_dir")
    except ValueError as err:
        p.error(str(err))
    try:
        with staged_folder(args.out_dir) as stage:
            make_tiny_ade20k(stage, args.train, args.val, args.size, args.seed)
    except OSError as err:
        print(f"error: {write_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.out_dir}", file=sys.stderr)
        return 130
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

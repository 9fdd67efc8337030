#!/usr/bin/env python
"""Translate APT thresholds to another patch size and canvas: per coarse level, the threshold that
merges the same share of real photos' area.

A threshold's meaning depends on the patch's pixel count (entropy grows with it), so the paper's
16 px thresholds do not carry over to 14 px models (DINOv2, Depth Anything) as they are. Each
photo is resized as transformers' DPT / Depth Anything processor does (toward a square canvas,
keeping the aspect ratio, sides rounded to multiples of the patch) and padded to the largest
patch with the mean colour. Then, from the
coarsest level down, each threshold is found by bisection so that the area in patches of that
level or coarser matches the reference's, over the images' own cells (padding excluded).

APT_SETTINGS["depth"] = {28: 5.43, 56: 5.67} is this tool's translation of the paper's
segmentation threshold 5.75, applied at 32 and 64 px, on scikit-image's five sample photos:

    python tools/translate_thresholds.py --reference '{"32": 5.75, "64": 5.75}' --output outputs/t14.json
    python tools/translate_thresholds.py                                   # 32 px only: {28: 5.445}
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from apt_dense.benchmarking import image_folder, output_path, positive_int, thresholds_json
from apt_dense.outputs import atomic_write, check_output_file, write_error
from apt_dense.planner import TokenPlanner
from apt_dense.presets import APT_SETTINGS, IMAGENET_PIXEL_MEAN
from apt_dense.sample_images import image_source


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=image_folder, default=None,
                   help="folder of photos (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--reference", type=thresholds_json, default=APT_SETTINGS["segmentation"],
                   help="thresholds to translate (default: the paper's segmentation setting)")
    p.add_argument("--reference-patch", type=positive_int, default=16)
    p.add_argument("--reference-size", type=positive_int, default=512, help="canvas side for the reference")
    p.add_argument("--patch", type=positive_int, default=14, help="patch size to translate to")
    p.add_argument("--size", type=positive_int, default=518, help="canvas side at the new patch size")
    p.add_argument("--output", type=output_path, default=None, help="write the result as JSON")
    args = p.parse_args(argv)
    for size in args.reference:
        ratio = size // args.reference_patch
        if size % args.reference_patch or ratio & (ratio - 1) or ratio < 2:
            p.error(f"--reference size {size} px is not {args.reference_patch} px times 2, 4, 8, ...")
    if args.output is not None:
        try:
            check_output_file(args.output, what="--output")
        except ValueError as err:
            p.error(str(err))
    return args


def resize_as_dpt(image: np.ndarray, size: int, patch: int) -> torch.Tensor:
    """``(1, 3, h, w)`` raw 0..255 as transformers' DPT / Depth Anything processor resizes to
    ``size x size`` keeping the aspect ratio: both sides scaled by whichever side's factor is
    closer to 1, then rounded to multiples of ``patch``."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    scale = min((size / side for side in x.shape[-2:]), key=lambda s: abs(1 - s))
    h, w = (max(patch, round(side * scale / patch) * patch) for side in x.shape[-2:])
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).round().clamp(0, 255)


class LevelAreas:
    """The images scored once at one patch size; the merged area of any thresholds from there."""

    def __init__(self, photos: dict[str, np.ndarray], patch: int, size: int, num_levels: int):
        self.patch, self.levels = patch, num_levels
        sizes = [patch << k for k in range(1, num_levels + 1)]
        self.scorer = TokenPlanner(patch_size=patch, thresholds={s: 1.0 for s in sizes})
        unit = patch << num_levels
        fill = torch.tensor(IMAGENET_PIXEL_MEAN).view(1, 3, 1, 1)
        self.scores, self.cells = [], []
        for image in photos.values():
            x = resize_as_dpt(image, size, patch)
            h, w = x.shape[-2:]
            canvas = fill.expand(1, 3, -(-h // unit) * unit, -(-w // unit) * unit).clone()
            canvas[..., :h, :w] = x
            self.scores.append(self.scorer.scores(canvas))
            self.cells.append((h // patch, w // patch))

    def plan(self, thresholds: dict[int, float]) -> list:
        planner = TokenPlanner(patch_size=self.patch, thresholds=thresholds)
        return [planner.plan_scores(s) for s in self.scores]

    def areas(self, thresholds: dict[int, float]) -> np.ndarray:
        """``(K,)`` mean share of the images' own cells in patches of level ``k`` or coarser."""
        shares = []
        for layout, (h, w) in zip(self.plan(thresholds), self.cells):
            level = layout.cell_level[0, :h, :w]
            shares.append([(level >= k).float().mean().item() for k in range(1, self.levels + 1)])
        return np.mean(shares, axis=0)

    def kept(self, thresholds: dict[int, float]) -> list[float]:
        """Tokens (padding's included) per image over its own cells."""
        return [layout.num_tokens / (h * w) for layout, (h, w) in zip(self.plan(thresholds), self.cells)]


def translate(reference: LevelAreas, reference_thresholds: dict[int, float], target: LevelAreas,
              steps: int = 30) -> dict[int, float]:
    """Thresholds at ``target``'s patch size whose per-level areas match ``reference_thresholds``'
    (coarsest level first: a level's area depends on its own threshold and the coarser ones)."""
    goal = reference.areas(reference_thresholds)
    sizes = [target.patch << k for k in range(1, target.levels + 1)]
    found = {s: 0.0 for s in sizes}
    for k in range(target.levels, 0, -1):
        low, high = 0.0, 16.0  # entropy of a 512-bin histogram is at most 9 bits
        for _ in range(steps):
            found[sizes[k - 1]] = mid = (low + high) / 2
            low, high = (mid, high) if target.areas(found)[k - 1] < goal[k - 1] else (low, mid)
        found[sizes[k - 1]] = round((low + high) / 2, 3)
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        photos = dict(image_source(args.images, args.limit)[1])
    except ValueError as err:  # no readable image in the folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    levels = len(args.reference)
    reference = LevelAreas(photos, args.reference_patch, args.reference_size, levels)
    target = LevelAreas(photos, args.patch, args.size, levels)
    thresholds = translate(reference, args.reference, target)
    result = {
        "images": list(photos),
        "reference": {"patch": args.reference_patch, "size": args.reference_size,
                      "thresholds": {str(k): v for k, v in args.reference.items()},
                      "areas": reference.areas(args.reference).round(4).tolist(),
                      "kept": np.round(reference.kept(args.reference), 4).tolist()},
        "translated": {"patch": args.patch, "size": args.size, "thresholds": {str(k): v for k, v in thresholds.items()},
                       "areas": target.areas(thresholds).round(4).tolist(),
                       "kept": np.round(target.kept(thresholds), 4).tolist()},
    }
    for name in ("reference", "translated"):
        r = result[name]
        print(f"{name:>10}: {r['patch']} px at {r['size']}: {r['thresholds']}  area in levels >= 1..K "
              f"{r['areas']}  kept {np.mean(r['kept']):.1%} (per image {r['kept']})")
    if args.output:
        try:
            with atomic_write(args.output, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as err:
            print(f"error: {write_error(err)}", file=sys.stderr)
            return 1
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

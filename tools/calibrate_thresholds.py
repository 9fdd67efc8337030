#!/usr/bin/env python
"""Choose thresholds that keep a target fraction of tokens on your images, or print the
thresholds-vs-tokens curve to pick a speed/accuracy point.

Thresholds move together: ``scale * base`` for a base map (default: the paper's setting), so
their ratios are kept. Each image is scored once; every candidate then costs only the
quadtree selection.

    python tools/calibrate_thresholds.py --target 0.6                    # sample photos, 1024, detection base
    python tools/calibrate_thresholds.py --images ade/val --size 512 --setting segmentation --curve
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from apt_dense.layout import build_layout, select_levels
from apt_dense.presets import APT_SETTINGS, IMAGENET_PIXEL_MEAN
from apt_dense.sample_images import letterbox, load_image_folder, load_sample_photos
from apt_dense.schedule import PatchSchedule
from apt_dense.scoring import build_scorer, to_intensity


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=None, help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--setting", default="detection", choices=sorted(APT_SETTINGS), help="base thresholds")
    p.add_argument("--base", type=str, default=None, help='base thresholds as JSON (overrides --setting)')
    p.add_argument("--scorer", default="entropy", choices=["entropy", "laplacian", "upsample_mse"])
    p.add_argument("--target", type=float, default=None, help="mean fraction of tokens to keep, in (0, 1]")
    p.add_argument("--curve", action="store_true", help="print kept fraction for a range of scales")
    p.add_argument("--output", type=Path, default=None, help="write the result as JSON")
    args = p.parse_args(argv)
    if args.target is None and not args.curve:
        p.error("give --target FRACTION, --curve, or both")
    if args.target is not None and not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")
    return args


def image_scores(args, schedule: PatchSchedule) -> list[list[torch.Tensor]]:
    photos = load_image_folder(args.images, args.limit) if args.images else load_sample_photos()
    scorer = build_scorer(args.scorer)
    scores = []
    for index, image in enumerate(photos.values(), start=1):
        raw, _ = letterbox(image, args.size, IMAGENET_PIXEL_MEAN)
        scores.append(scorer(to_intensity(raw.unsqueeze(0)), args.patch_size, schedule.num_levels))
        print(f"\rscored {index}/{len(photos)} images", end="", flush=True)
    print()
    return scores


def kept_fraction(scores: list[list[torch.Tensor]], thresholds: tuple[float, ...]) -> float:
    fractions = []
    for per_level in scores:
        level = select_levels(per_level, thresholds)
        layout, _ = build_layout(level, batch_size=1, grid_size=tuple(level.shape[1:]), window_size=0, device=level.device)
        fractions.extend(layout.kept_fraction)
    return sum(fractions) / len(fractions)


def calibrate(scores, base: tuple[float, ...], target: float, steps: int = 40) -> tuple[float, float]:
    """Bisection on the scale (kept fraction falls as the scale grows). Returns (scale, kept)."""
    low, high = 0.0, 1.0
    while kept_fraction(scores, tuple(b * high for b in base)) > target and high < 1e4:
        high *= 2
    for _ in range(steps):
        mid = (low + high) / 2
        if kept_fraction(scores, tuple(b * mid for b in base)) > target:
            low = mid
        else:
            high = mid
    return high, kept_fraction(scores, tuple(b * high for b in base))


def main(argv=None) -> int:
    args = parse_args(argv)
    base_map = {int(k): float(v) for k, v in json.loads(args.base).items()} if args.base else APT_SETTINGS[args.setting]
    schedule = PatchSchedule.create(args.patch_size, base_map)
    base = schedule.thresholds
    scores = image_scores(args, schedule)
    result: dict = {"base": schedule.threshold_map(), "images": len(scores), "size": args.size, "scorer": args.scorer}
    if args.curve:
        curve = []
        for scale in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0):
            kept = kept_fraction(scores, tuple(b * scale for b in base))
            curve.append({"scale": scale, "thresholds": {s: t * scale for s, t in schedule.threshold_map().items()}, "kept": kept})
            print(f"scale {scale:5.2f}  thresholds {curve[-1]['thresholds']}  kept {kept:.1%}")
        result["curve"] = curve
    if args.target is not None:
        scale, kept = calibrate(scores, base, args.target)
        thresholds = {s: round(t * scale, 4) for s, t in schedule.threshold_map().items()}
        result.update(target=args.target, scale=scale, thresholds=thresholds, kept=kept)
        print(f"thresholds {thresholds} keep {kept:.1%} of tokens (target {args.target:.1%})")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Choose thresholds that keep a target fraction of tokens on your images, and plot the
thresholds-vs-tokens curve to pick a speed/accuracy point.

Thresholds move together: ``scale * base`` for a base map (default: the paper's setting, scale 1),
so their ratios are kept. Each image is scored once; every candidate then costs only the
quadtree selection. Ctrl-C while scoring calibrates on the images scored so far; Ctrl-C later
writes what was computed. The output paths are checked before any image is read, and each file
is written whole or not at all (Ctrl-C waits for the files being written).

    python tools/calibrate_thresholds.py --target 0.6                    # sample photos, 1024, detection base
    python tools/calibrate_thresholds.py --images ade/val --size 512 --setting segmentation --curve
    python tools/calibrate_thresholds.py --host sam_vit_b --curve             # SAM's letterbox, its setting
    python tools/calibrate_thresholds.py --host depth_anything_v2_b --target 0.6

With ``--host`` images are prepared as the host's own pipeline does (SAM: ``SamPredictor``'s
letterbox at 1024; DINOv2 / Depth Anything: the image processor at 518, padded only to the
largest patch), with its patch size and windows, and tokens kept count against the dense
model's tokens for each image.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from apt_dense.benchmarking import (
    add_patching_arguments,
    host_image, image_folder, output_path, positive_int, resolve_host_arguments, setting_label, thresholds_json,
    tool_planner, unit_fraction,
)
from apt_dense.outputs import atomic_write, check_output_file, ctrl_c_deferred, write_error
from apt_dense.planner import TokenPlanner
from apt_dense.presets import APT_SETTINGS
from apt_dense.sample_images import image_source

DEFAULT_CURVE = Path("outputs/threshold_curve.png")
MAX_SCALE = 1e4  # thresholds beyond 10^4 x the base merge everything any scorer can score


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=image_folder, default=None,
                   help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    add_patching_arguments(p, default_size=1024, default_setting="detection")
    p.add_argument("--base", type=thresholds_json, default=None, help="base thresholds as JSON (overrides --setting)")
    p.add_argument("--scorer", default="entropy", choices=["entropy", "laplacian", "upsample_mse"])
    p.add_argument("--target", type=unit_fraction, default=None, help="mean fraction of tokens to keep, in (0, 1]")
    p.add_argument("--curve", type=output_path, nargs="?", const=DEFAULT_CURVE, default=None, metavar="PNG",
                   help=f"print tokens kept over a range of scales and plot them to PNG (default: {DEFAULT_CURVE})")
    p.add_argument("--output", type=output_path, default=None, help="write the result as JSON")
    args = p.parse_args(argv)
    if args.target is None and args.curve is None:
        p.error("give --target FRACTION, --curve, or both")
    try:
        resolve_host_arguments(args, default_size=1024, default_setting="detection")
        schedule = patching(args).schedule
        check_base(args.base)
        if args.curve is not None:
            check_output_file(args.curve, suffixes=plot_suffixes(), what="--curve")
        if args.output is not None:
            check_output_file(args.output, suffixes=(".json",), what="--output")  # never the --curve picture
    except ValueError as err:
        p.error(str(err))
    floor = 1 / 4**schedule.num_levels  # every region merged into the largest patches
    if args.target is not None and args.target < floor:
        p.error(f"--target {args.target:g} is below what patch sizes {schedule.patch_sizes} can reach: with all of "
                f"an image in {schedule.largest_patch_size} px patches, {floor:.2%} of tokens stay; aim at "
                f"{floor:g} or more, or add larger patch sizes to the base thresholds")
    return args


def check_base(base: dict[int, float] | None) -> None:
    """Base thresholds that a scale can move: none negative, at least one above 0 (a score is
    never below 0, so a threshold of 0 or less merges nothing at any scale)."""
    if base is None:
        return
    for size, threshold in base.items():
        if threshold < 0:
            raise ValueError(f"--base: the threshold {threshold:g} for {size} px is negative, and no score is below it "
                             "at any scale; give thresholds >= 0 (0 keeps that size off)")
    if not any(base.values()):
        raise ValueError("--base: every threshold is 0, which merges nothing at any scale; give at least one "
                         "threshold > 0, e.g. '{\"32\": 2}'")


def plot_suffixes() -> list[str]:
    """The file types matplotlib can write the curve to (``.png``, ``.pdf``, ``.svg``, ...)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ValueError("--curve plots with matplotlib, which is not installed: pip install 'apt-dense[demo]'") from None
    return [f".{kind}" for kind in FigureCanvasBase.get_supported_filetypes()]


def patching(args):
    """The planner with the base thresholds: it validates them and scores images."""
    return tool_planner(args, args.base or APT_SETTINGS[args.setting])


class Scores(NamedTuple):
    """Per image: its per-level scores (:meth:`TokenPlanner.scores`) and the dense model's tokens."""

    levels: list[list[torch.Tensor]]
    dense_tokens: list[int]


def image_scores(args, planner: TokenPlanner) -> tuple[Scores, bool]:
    """Per-level scores of each image, and whether Ctrl-C stopped the scoring early.

    Raises:
        ValueError: no image of the folder could be read.
    """
    total, photos = image_source(args.images, args.limit)
    every = max(1, total // 20)  # about 20 progress lines, each whole so warnings do not break them
    scores = Scores([], [])
    try:
        for index, (_, image) in enumerate(photos, start=1):
            raw, x = host_image(args.host, image, args.size, planner.size_divisibility)
            scores.dense_tokens.append((x.shape[-2] // args.patch_size) * (x.shape[-1] // args.patch_size))
            scores.levels.append(planner.scores(raw.unsqueeze(0)))
            if index % every == 0 or index == total:
                print(f"scored {index}/{total} images", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: going on with the {len(scores.levels)} images scored so far", flush=True)
        return Scores(scores.levels, scores.dense_tokens[: len(scores.levels)]), True
    return scores, False


def kept_fraction(scores: Scores, thresholds: dict[int, float], patch_size: int) -> float:
    """Mean over the scored images of the tokens kept under ``thresholds`` over the dense model's."""
    planner = TokenPlanner(patch_size=patch_size, thresholds=thresholds)
    fractions = [planner.plan_scores(per_level).tokens_per_image_host[0] / dense
                 for per_level, dense in zip(scores.levels, scores.dense_tokens)]
    return sum(fractions) / len(fractions)


def calibrate(scores, base: dict[int, float], patch_size: int, target: float, steps: int = 30) -> float | None:
    """The smallest scale (to 4 decimals) whose thresholds keep at most ``target``: 0 (merging off)
    when that keeps no more, else by bisection (the kept fraction falls as the scale grows). None
    when no scale up to :data:`MAX_SCALE` gets that low."""
    if kept_fraction(scores, scaled(base, 0.0), patch_size) <= target:
        return 0.0  # any scale above 0 merges the flat regions (entropy 0) at once
    low, high = 0.0, 1.0
    while kept_fraction(scores, scaled(base, high), patch_size) > target:
        if high >= MAX_SCALE:
            return None
        high *= 2
    for _ in range(steps):
        mid = (low + high) / 2
        if kept_fraction(scores, scaled(base, mid), patch_size) > target:
            low = mid
        else:
            high = mid
    return math.ceil(high * 1e4) / 1e4


def curve_scales(chosen: float | None) -> list[float]:
    """Scales for the curve: 0 to at least 2 and a quarter past the chosen scale, in at most 16
    round steps, plus 1 (the base setting) and the chosen scale themselves."""
    reach = max(2.0, 1.25 * (chosen or 0))
    step = next(s for s in (0.125, 0.25, 0.5, 1, 2, 2.5, 5, 10, 20, 25, 50, 100, 250, 500, 1000) if reach / s <= 16)
    steps = math.ceil(reach / step - 1e-9)
    scales = {round(i * step, 4) for i in range(steps + 1)} | {1.0}
    if chosen is not None:
        scales.add(chosen)
    return sorted(scales)


def scaled(threshold_map: dict[int, float], scale: float) -> dict[int, float]:
    return {size: round(t * scale, 4) for size, t in threshold_map.items()}


def plot_curve(path: Path, result: dict, setting: str) -> bool:
    """The curve as a picture (PNG, PDF, SVG, ... by the suffix), written whole or not at all:
    tokens kept against the scale, the base setting and the target marked. False when matplotlib
    is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'apt-dense[demo]')")
        return False
    scales = [point["scale"] for point in result["curve"]]
    kept = [100 * point["kept"] for point in result["curve"]]
    first_size, first = next(iter(result["base"].items()))
    base = ", ".join(f"{size} px: {t:g}" for size, t in result["base"].items())
    fig, ax = plt.subplots(figsize=(6.4, 5.2), layout="constrained")
    ax.plot(scales, kept, "o-", ms=4, color="tab:blue", label="tokens kept")
    ax.axvline(1.0, color="tab:green", ls="--", lw=1.2, label=f"scale 1: {setting} ({base})")
    if "target" in result:
        ax.axhline(100 * result["target"], color="tab:red", ls=":", lw=1.2, label=f"target {result['target']:.0%}")
        ax.plot([result["scale"]], [100 * result["kept"]], "D", color="tab:red", ms=8,
                label=f"chosen: scale {result['scale']:g}, {result['kept']:.1%} kept")
    ax.set_xlabel("threshold scale (x base thresholds)")
    ax.set_ylabel("tokens kept (% of dense)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    top = ax.secondary_xaxis("top", functions=(lambda s: s * first, lambda t: t / first))
    top.set_xlabel(f"threshold of {first_size} px patches")
    # Below the axes: the curve can run through any corner.
    fig.legend(fontsize=8, loc="outside lower center", title_fontsize=8,
               title=f"{result['images']} images at {result['size']} px, {result['scorer']} scorer")
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format=path.suffix[1:].lower(), dpi=120)
    finally:
        plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    planner = patching(args)
    base_map = planner.schedule.threshold_map()
    setting = "given" if args.base else setting_label(args.setting)
    try:
        scores, interrupted = image_scores(args, planner)
    except ValueError as err:  # no readable image in the folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not scores.levels:
        return 130
    result: dict = {"base": {str(k): v for k, v in base_map.items()}, "images": len(scores.levels), "size": args.size,
                    "scorer": args.scorer}
    if args.host is not None:
        result["host"] = args.host
    if interrupted:
        result["interrupted"] = "while scoring: results cover the images scored before Ctrl-C"
    try:
        if args.target is not None:
            scale = calibrate(scores, base_map, args.patch_size, args.target)
            if scale is None:
                most = kept_fraction(scores, scaled(base_map, MAX_SCALE), args.patch_size)
                print(f"error: no scale reaches the target {args.target:.1%} on these images: thresholds "
                      f"{scaled(base_map, MAX_SCALE)} (scale {MAX_SCALE:g}) still keep {most:.1%}; aim at "
                      f"{most:.2f} or more, or use base thresholds with larger patch sizes", file=sys.stderr)
                return 1
            thresholds = scaled(base_map, scale)
            kept = kept_fraction(scores, thresholds, args.patch_size)
            result.update(target=args.target, scale=scale, thresholds={str(k): v for k, v in thresholds.items()},
                          kept=round(kept, 4))
            print(f"scale {scale:g}: thresholds {thresholds} keep {kept:.1%} of tokens (target {args.target:.1%})"
                  + (" (merging off)" if scale == 0 else ""))
        if args.curve is not None:
            result["curve"] = []
            print(f"{'scale':>7}  {'kept':>6}  thresholds")
            for s in curve_scales(result.get("scale")):
                kept = kept_fraction(scores, scaled(base_map, s), args.patch_size)
                result["curve"].append({"scale": s, "thresholds": {str(k): v for k, v in scaled(base_map, s).items()},
                                        "kept": round(kept, 4)})
                marks = [m for m, hit in (("base: " + setting, s == 1.0), ("chosen", s == result.get("scale"))) if hit]
                print(f"{s:>7g}  {kept:>6.1%}  {scaled(base_map, s)}" + (f"  <- {', '.join(marks)}" if marks else ""))
    except KeyboardInterrupt:
        interrupted = True
        result["interrupted"] = "while calibrating: results stop at the last value computed"
        print("interrupted: writing what was computed")
    with ctrl_c_deferred() as ctrl_c:
        try:
            if args.output:
                with atomic_write(args.output, "w") as f:
                    f.write(json.dumps(result, indent=1))
                print(f"wrote {args.output}")
            if result.get("curve") and plot_curve(args.curve, result, setting):
                print(f"curve plotted to {args.curve}")
        except OSError as err:
            print(f"error: {write_error(err)}", file=sys.stderr)
            return 1
    return 130 if interrupted or ctrl_c.pressed else 0


if __name__ == "__main__":
    sys.exit(main())

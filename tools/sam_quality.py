#!/usr/bin/env python
"""How close APT's Segment Anything masks are to the dense model's, for users with SAM weights.

Both models get the checkpoint's weights; APT only changes the image encoder. Per image: the
tokens the APT encoder kept, the mask IoU of a grid of single-point prompts through both
SamPredictors (all 3 outputs, and the one the dense model scores highest), and the automatic
mask generator's masks matched one to one (mean IoU, recall at IoU 0.5 / 0.75).

    python tools/sam_quality.py --checkpoint sam_vit_b_01ec64.pth --model-type vit_b
    python tools/sam_quality.py --checkpoint sam_hq_vit_l.pth --images photos/ --thresholds '{"32": 3}' --device cuda

SAM-HQ checkpoints are recognised by their keys. Results go to OUTPUT_DIR/TAG.json and .md,
each written whole or not at all; Ctrl-C writes the images done so far.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from apt_dense.benchmarking import image_folder, non_negative_int, positive_int, thresholds_json
from apt_dense.outputs import atomic_write, check_output_file
from apt_dense.quality_runs import run_comparisons
from apt_dense.presets import APT_SETTINGS
from apt_dense.sam import build_sam_pair, check_image, check_sam_thresholds, read_sam_checkpoint
from apt_dense.sam.quality import compare_image, summarise
from apt_dense.sample_images import image_source

DEFAULT_OUTPUT_DIR = Path("outputs/sam_quality")
MODEL_TYPES = ("auto", "vit_b", "vit_l", "vit_h")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a local SAM or SAM-HQ checkpoint (.pth)")
    p.add_argument("--model-type", default="auto", choices=MODEL_TYPES,
                   help="the checkpoint's encoder; auto reads it from the file (default)")
    p.add_argument("--images", type=image_folder, default=None,
                   help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--thresholds", type=thresholds_json, default=None,
                   help=f'JSON {{"32": threshold}} (default: the SAM setting {APT_SETTINGS["sam"]})')
    p.add_argument("--points-per-side", type=positive_int, default=8,
                   help="point prompts: a grid of N x N single points (default 8)")
    p.add_argument("--amg-points-per-side", type=non_negative_int, default=16,
                   help="mask generator's points per side; 0 skips the generator (default 16)")
    p.add_argument("--amg-crop-layers", type=non_negative_int, default=0, help="mask generator's crop_n_layers")
    p.add_argument("--amg-pred-iou-thresh", type=float, default=0.88, help="mask generator's pred_iou_thresh")
    p.add_argument("--amg-stability-thresh", type=float, default=0.95, help="mask generator's stability_score_thresh")
    p.add_argument("--batch", type=positive_int, default=16, help="point prompts per decoder call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help=f"default: {DEFAULT_OUTPUT_DIR}")
    p.add_argument("--tag", default=None, help="result file name (default: sam_quality_<model>_<thresholds>)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="read a trusted checkpoint that holds pickled Python objects besides tensors")
    args = p.parse_args(argv)
    if not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    try:
        args.device = torch.device(args.device)
        if args.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
        args.thresholds = args.thresholds or APT_SETTINGS["sam"]
        check_sam_thresholds(args.thresholds, 16, 14)  # every SAM encoder: 16 px patches, 14-cell windows
        args.tag = args.tag or f"sam_quality_{args.model_type}_" + "_".join(
            f"{size}-{value:g}" for size, value in sorted(args.thresholds.items()))
        for suffix in (".json", ".md"):
            check_output_file(args.output_dir / f"{args.tag}{suffix}", what="--output-dir/--tag")
    except (ValueError, RuntimeError) as err:
        p.error(str(err))
    args.count, args.photos = image_source(args.images, args.limit)
    return args


def markdown(args, results, overall: dict) -> str:
    def num(value, pattern="{:.4f}"):
        return "-" if value is None else pattern.format(value)

    lines = [
        f"# SAM quality: APT vs dense ({args.checkpoint.name})", "",
        f"Thresholds {args.thresholds}; {args.points_per_side}x{args.points_per_side} point prompts; mask generator "
        + (f"{args.amg_points_per_side} points per side, {args.amg_crop_layers} crop layers." if args.amg_points_per_side
           else "skipped."), "",
        "| image | size | tokens kept | point mIoU | best-mask mIoU | AMG masks dense / APT | AMG matched mIoU "
        "| recall@0.5 | recall@0.75 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        amg = "-" if r.amg_dense_masks is None else f"{r.amg_dense_masks} / {r.amg_apt_masks}"
        lines.append(
            f"| {r.name} | {r.width}x{r.height} | {r.tokens_kept}/{r.tokens_dense} ({r.kept_fraction:.1%}) "
            f"| {num(r.point_miou)} | {num(r.point_best_miou)} | {amg} | {num(r.amg_matched_miou)} "
            f"| {num(r.amg_recall_50, '{:.1%}')} | {num(r.amg_recall_75, '{:.1%}')} |"
        )
    amg = "-" if overall["amg_dense_masks"] is None else f"{overall['amg_dense_masks']} / {overall['amg_apt_masks']}"
    lines.append(
        f"| **overall** ({overall['images']} images) | | {overall['kept_fraction']:.1%} | {num(overall['point_miou'])} "
        f"| {num(overall['point_best_miou'])} | {amg} | {num(overall['amg_matched_miou'])} "
        f"| {num(overall['amg_recall_50'], '{:.1%}')} | {num(overall['amg_recall_75'], '{:.1%}')} |"
    )
    return "\n".join(lines) + "\n"


def write_results(args, results, overall: dict) -> None:
    config = {
        "checkpoint": str(args.checkpoint), "model_type": args.model_type,
        "thresholds": {str(k): v for k, v in args.thresholds.items()}, "points_per_side": args.points_per_side,
        "amg": amg_kwargs(args), "device": str(args.device),
    }
    data = {"config": config, "overall": overall, "images": [r.as_dict() for r in results]}
    with atomic_write(args.output_dir / f"{args.tag}.json", "w") as f:
        json.dump(data, f, indent=2)
    with atomic_write(args.output_dir / f"{args.tag}.md", "w") as f:
        f.write(markdown(args, results, overall))


def amg_kwargs(args) -> dict | None:
    if not args.amg_points_per_side:
        return None
    return dict(points_per_side=args.amg_points_per_side, crop_n_layers=args.amg_crop_layers,
                pred_iou_thresh=args.amg_pred_iou_thresh, stability_score_thresh=args.amg_stability_thresh)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        checkpoint = read_sam_checkpoint(args.checkpoint, allow_pickle=args.unsafe_load)
        dense, apt = build_sam_pair(args.model_type, checkpoint, hq=checkpoint.hq, thresholds=args.thresholds)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dense.to(args.device)
    apt.to(args.device)

    def compare(name, image):
        try:
            check_image(image)
        except (ValueError, TypeError) as err:
            return None, f"skipped, {err}"
        r = compare_image(dense, apt, name, image, points_per_side=args.points_per_side, batch=args.batch,
                          amg=amg_kwargs(args))
        amg = "" if r.amg_matched_miou is None else f", AMG matched mIoU {r.amg_matched_miou:.4f}"
        return r, f"{r.kept_fraction:.1%} tokens kept, point mIoU {r.point_miou:.4f}{amg}"

    def write(results) -> str:
        overall = summarise(results)
        write_results(args, results, overall)
        return (f"overall: {overall['kept_fraction']:.1%} tokens kept, point mIoU {overall['point_miou']:.4f}; "
                f"wrote {args.output_dir / args.tag}.json and .md")

    return run_comparisons(args.photos, args.count, compare, write)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How close APT's depth is to the dense model's, for users with Depth Anything or DPT weights.

The model folder is loaded twice, dense and with an APT backbone (``apt_dense.transformers``);
both get the same pixels from the folder's image processor. Per image and overall: the tokens the
APT backbone kept, and the relative depth error of APT against the dense prediction (AbsRel,
delta < 1.25).

    python tools/depth_quality.py --model Depth-Anything-V2-Base-hf          # a local folder
    python tools/depth_quality.py --model FOLDER --images photos/ --thresholds '{"28": 5.5}' --device cuda

Results go to OUTPUT_DIR/TAG.json and .md, each written whole or not at all; Ctrl-C writes the
images done so far. The folder, the images and the output paths are checked before any model is
loaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from apt_dense.benchmarking import image_folder, positive_int, thresholds_json, torch_device
from apt_dense.outputs import atomic_write, check_output_file
from apt_dense.presets import APT_SETTINGS
from apt_dense.quality_runs import run_comparisons
from apt_dense.sample_images import image_source

DEFAULT_OUTPUT_DIR = Path("outputs/depth_quality")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True,
                   help="local folder of a Depth Anything / DPT (DINOv2 backbone) model: config.json + weights")
    p.add_argument("--images", type=image_folder, default=None,
                   help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--thresholds", type=thresholds_json, default=APT_SETTINGS["depth"],
                   help=f"APT thresholds as JSON (default: the depth setting {APT_SETTINGS['depth']})")
    p.add_argument("--device", type=torch_device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help=f"default: {DEFAULT_OUTPUT_DIR}")
    p.add_argument("--tag", default=None, help="result file name (default: depth_quality_<folder>_<thresholds>)")
    args = p.parse_args(argv)
    args.tag = args.tag or f"depth_quality_{args.model.resolve().name}_" + "_".join(
        f"{size}-{value:g}" for size, value in sorted(args.thresholds.items()))
    try:
        for suffix in (".json", ".md"):
            check_output_file(args.output_dir / f"{args.tag}{suffix}", what="--output-dir/--tag")
    except ValueError as err:
        p.error(str(err))
    try:
        from apt_dense.transformers.quality import depth_folder_config

        depth_folder_config(args.model)
    except ImportError as err:
        p.error(str(err))
    except (OSError, ValueError) as err:
        p.error(f"--model: {err}")
    args.count, args.photos = image_source(args.images, args.limit)
    return args


def markdown(args, results, overall: dict) -> str:
    lines = [
        f"# Depth quality: APT vs dense ({args.model.resolve().name})", "",
        f"Thresholds {args.thresholds}; errors of APT's depth against the dense model's; tokens kept by the "
        "APT backbone against one per 14 px cell.", "",
        "| image | size | tokens kept | AbsRel | delta < 1.25 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.width}x{r.height} | {r.tokens_kept}/{r.tokens_dense} ({r.kept_fraction:.1%}) "
                     f"| {r.abs_rel:.4f} | {r.delta1:.4f} |")
    lines.append(f"| **overall** ({overall['images']} images) | | {overall['kept_fraction']:.1%} "
                 f"| {overall['abs_rel']:.4f} | {overall['delta1']:.4f} |")
    return "\n".join(lines) + "\n"


def write_results(args, results, overall: dict) -> None:
    import transformers

    config = {"model": str(args.model), "thresholds": {str(k): v for k, v in args.thresholds.items()},
              "device": str(args.device), "torch": torch.__version__, "transformers": transformers.__version__}
    data = {"config": config, "overall": overall, "images": [r.as_dict() for r in results]}
    with atomic_write(args.output_dir / f"{args.tag}.json", "w") as f:
        json.dump(data, f, indent=2)
    with atomic_write(args.output_dir / f"{args.tag}.md", "w") as f:
        f.write(markdown(args, results, overall))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from apt_dense.transformers.quality import compare_image, load_depth_pair, summarise

    try:
        dense, apt, processor = load_depth_pair(args.model, args.thresholds, args.device)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    def compare(name, image):
        r = compare_image(dense, apt, processor, name, image)
        return r, f"{r.kept_fraction:.1%} tokens kept, AbsRel {r.abs_rel:.4f}, delta<1.25 {r.delta1:.4f}"

    def write(results) -> str:
        overall = summarise(results)
        write_results(args, results, overall)
        return (f"overall: {overall['kept_fraction']:.1%} tokens kept, AbsRel {overall['abs_rel']:.4f}, delta<1.25 "
                f"{overall['delta1']:.4f}; wrote {args.output_dir / args.tag}.json and .md")

    return run_comparisons(args.photos, args.count, compare, write)


if __name__ == "__main__":
    sys.exit(main())

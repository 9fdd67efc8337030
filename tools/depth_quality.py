#!/usr/bin/env python
"""How much APT changes a depth model's predictions: relative depth error of the APT model against
the dense model's own prediction, per image and overall, with the tokens each image kept.

For a Depth Anything or DPT (DINOv2 backbone) model saved in a local folder (``save_pretrained``,
or a checkpoint downloaded once, e.g. depth-anything/Depth-Anything-V2-Base-hf). Both models get
the same processed pixels; the dense prediction is the reference:

- AbsRel: mean of ``|apt - dense| / dense`` over pixels where the dense depth is positive;
- delta < 1.25: share of those pixels where ``max(apt / dense, dense / apt) < 1.25``.

    python tools/depth_quality.py --model Depth-Anything-V2-Base-hf
    python tools/depth_quality.py --model FOLDER --images photos/ --thresholds '{"28": 5.5}' --output depth.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from apt_dense.benchmarking import existing_folder, positive_int, thresholds_json
from apt_dense.model import TokenStats
from apt_dense.presets import APT_SETTINGS
from apt_dense.sample_images import load_image_folder, load_sample_photos


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=existing_folder, required=True,
                   help="local folder of a Depth Anything / DPT model (config.json + weights)")
    p.add_argument("--images", type=existing_folder, default=None,
                   help="folder of photos (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--thresholds", type=thresholds_json, default=APT_SETTINGS["depth"],
                   help=f"APT thresholds as JSON (default: {json.dumps(APT_SETTINGS['depth'])})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=None, help="write per-image and overall results as JSON")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model} has no config.json: pass the folder save_pretrained wrote")
    if args.output is not None and args.output.is_dir():
        p.error(f"--output {args.output} is a folder; give a file name, e.g. {args.output / 'depth_quality.json'}")
    return args


def depth_errors(apt: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """AbsRel and delta < 1.25 of ``apt`` against ``dense`` (same shape) over pixels with a positive
    dense depth; NaN when there is none."""
    valid = dense > 0
    if not valid.any():
        return {"abs_rel": math.nan, "delta1": math.nan}
    a, d = apt[valid].double(), dense[valid].double()
    ratio = torch.maximum(a / d, d / a)  # a zero APT depth gives inf: outside delta
    return {"abs_rel": float(((a - d).abs() / d).mean()), "delta1": float((ratio < 1.25).double().mean())}


def load_models(folder: Path, thresholds: dict[int, float], device: str):
    """``(dense, apt, processor)``: the folder's model twice (dense, and with APT) and its image
    processor (Depth Anything's settings when the folder has none)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, DPTImageProcessor

    from apt_dense.transformers import from_pretrained

    dense = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True).to(device).eval()
    apt = from_pretrained(folder, apt=dict(thresholds=thresholds)).to(device).eval()
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    else:
        print(f"{folder} has no preprocessor_config.json: using Depth Anything's preprocessing (518, ImageNet stats)")
        processor = DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                      resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                      do_pad=False)
    return dense, apt, processor


@torch.no_grad()
def evaluate(dense, apt, processor, photos: dict, device: str) -> dict:
    rows = []
    patch = apt.backbone.apt.patch_size
    for name, image in photos.items():
        pixels = processor(images=image, return_tensors="pt").pixel_values.to(device)
        reference = dense(pixel_values=pixels).predicted_depth
        apt.backbone.token_stats = TokenStats()
        predicted = apt(pixel_values=pixels).predicted_depth
        h, w = (side // patch for side in pixels.shape[-2:])
        row = {"image": name, "size": list(pixels.shape[-2:]), "tokens": apt.backbone.token_stats.tokens,
               "dense_tokens": h * w}
        row["kept"] = row["tokens"] / row["dense_tokens"]
        row.update(depth_errors(predicted[0].float().cpu(), reference[0].float().cpu()))
        rows.append(row)
        print(f"{name:>28}  {row['size'][0]}x{row['size'][1]}  kept {row['kept']:6.1%}  "
              f"AbsRel {row['abs_rel']:.4f}  delta<1.25 {row['delta1']:.4f}", flush=True)
    overall = {key: sum(r[key] for r in rows) / len(rows) for key in ("kept", "abs_rel", "delta1")}
    return {"images": rows, "overall": overall}


def main(argv=None) -> int:
    args = parse_args(argv)
    photos = load_image_folder(args.images, args.limit) if args.images else load_sample_photos()
    photos = dict(list(photos.items())[: args.limit])
    if not photos:
        print(f"no readable images in {args.images}", file=sys.stderr)
        return 1
    dense, apt, processor = load_models(args.model, args.thresholds, args.device)
    result = evaluate(dense, apt, processor, photos, args.device)
    result.update(model=str(args.model), thresholds={str(k): v for k, v in args.thresholds.items()})
    o = result["overall"]
    print(f"{'overall':>28}  {len(photos)} images  kept {o['kept']:6.1%}  AbsRel {o['abs_rel']:.4f}  "
          f"delta<1.25 {o['delta1']:.4f}  (thresholds {json.dumps(result['thresholds'])})")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

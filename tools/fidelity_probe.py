#!/usr/bin/env python
"""What a threshold costs before any fine-tuning: per-layer cosine similarity between APT's
repeat-upsampled features and the dense model's, same weights, same images.

    python tools/fidelity_probe.py --host eva02_b_det --size 1024 --setting detection
    python tools/fidelity_probe.py --checkpoint eva02_B_coco_det.pth --host eva02_b_det --size 1536

Without --checkpoint the weights are random (the numbers then only show the mechanics). With a
detectron2 checkpoint, keys under ``backbone.net.`` are used; APT layers are new (zero detail).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from apt_dense.benchmarking import build_model_pair
from apt_dense.checkpoints import load_state_dict_checked, read_checkpoint, unwrap_state_dict
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import letterbox, load_image_folder, load_sample_photos, normalise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="eva02_b_det", choices=sorted(HOSTS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--setting", default="detection", choices=sorted(APT_SETTINGS))
    p.add_argument("--thresholds", type=str, default=None, help='JSON like {"32": 2, "64": 2, "128": 0.3}')
    p.add_argument("--checkpoint", type=Path, default=None, help="backbone weights (raw, or detectron2 backbone.net.*)")
    p.add_argument("--images", type=Path, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--output", type=Path, default=None, help="write per-layer numbers as JSON")
    p.add_argument("--unsafe-load", action="store_true", help="unpickle arbitrary objects in --checkpoint (trusted files only)")
    return p.parse_args(argv)


def load_backbone_weights(model, path: Path, allow_pickle: bool = False) -> None:
    """Backbone weights from a raw, mmseg (``backbone.``) or detectron2 (``backbone.net.``)
    checkpoint, read as data; shapes must match and only the APT layers may be missing."""
    state = unwrap_state_dict(read_checkpoint(path, allow_pickle=allow_pickle))
    for prefix in ("backbone.net.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    missing, unexpected = load_state_dict_checked(model, state)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match --host: missing {missing[:8]}, unexpected {unexpected[:8]}")


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    thresholds = ({int(k): float(v) for k, v in json.loads(args.thresholds).items()} if args.thresholds
                  else APT_SETTINGS[args.setting])
    depth = args.depth or HOSTS[args.host]["depth"]
    overrides = dict(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD,
                     out_indices=tuple(range(depth)))
    if args.depth:
        overrides["depth"] = args.depth
    apt, dense = build_model_pair(args.host, thresholds, **overrides)
    if args.checkpoint:
        for model in (apt, dense):
            try:
                load_backbone_weights(model, args.checkpoint, args.unsafe_load)
            except (OSError, ValueError) as err:
                raise SystemExit(f"error: {err}") from None
    photos = load_image_folder(args.images, args.limit) if args.images else load_sample_photos()
    sums, kept = torch.zeros(depth), []
    for index, image in enumerate(photos.values(), start=1):
        raw, _ = letterbox(image, args.size, IMAGENET_PIXEL_MEAN)
        x = normalise(raw.unsqueeze(0), IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)
        out = apt(x)
        kept.extend(out.layout.kept_fraction)
        for layer, (a, d) in enumerate(zip(out.features, dense(x).features)):
            sums[layer] += F.cosine_similarity(a, d, dim=1).mean()
        print(f"\rprobed {index}/{len(photos)} images", end="", flush=True)
    print()
    similarity = (sums / len(photos)).tolist()
    print(f"{args.host} at {args.size}, thresholds {thresholds}, mean tokens kept {sum(kept) / len(kept):.1%}"
          f"{'' if args.checkpoint else ' (random weights)'}")
    for layer, value in enumerate(similarity):
        print(f"block {layer:2d}: cosine similarity {value:.4f}")
    if args.output:
        args.output.write_text(json.dumps(dict(thresholds=thresholds, kept=sum(kept) / len(kept), cosine=similarity), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

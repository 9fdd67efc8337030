#!/usr/bin/env python
"""What a threshold costs before any fine-tuning: per-layer cosine similarity between APT's
repeat-upsampled features and the dense model's, same weights, same images.

    python tools/fidelity_probe.py --host eva02_b_det --size 1024 --setting detection
    python tools/fidelity_probe.py --checkpoint eva02_B_coco_det.pth --host eva02_b_det --size 1536

Without --checkpoint the weights are random (the numbers then only show the mechanics). The
checkpoint may be raw backbone weights, a detectron2 detector (``backbone.net.*``), an mmseg /
mmdet model (``backbone.*``) or a training checkpoint of this project's OpenMMLab tools; the APT
layers are new (zero detail). Arguments and the output path are checked before any model is built.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from apt_dense.benchmarking import (
    build_model_pair, existing_file, host_planner, image_folder, positive_int, thresholds_json,
)
from apt_dense.checkpoints import UnsafeCheckpointError, load_state_dict_checked, read_checkpoint, unwrap_state_dict
from apt_dense.outputs import atomic_write, check_output_file, ctrl_c_deferred, write_error
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import image_source, letterbox, normalise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="eva02_b_det", choices=sorted(HOSTS))
    p.add_argument("--size", type=positive_int, default=1024,
                   help="square canvas (ViTDet-style letterbox), a multiple of the largest patch")
    p.add_argument("--depth", type=positive_int, default=None, help="fewer blocks (quick runs)")
    p.add_argument("--setting", default="detection", choices=sorted(APT_SETTINGS), help="paper thresholds")
    p.add_argument("--thresholds", type=thresholds_json, default=None,
                   help='JSON like {"32": 2, "64": 2, "128": 0.3} (overrides --setting)')
    p.add_argument("--checkpoint", type=existing_file, default=None,
                   help="backbone weights (raw, detectron2 backbone.net.*, mmseg/mmdet backbone.*)")
    p.add_argument("--images", type=image_folder, default=None,
                   help="folder of images (default: scikit-image's sample photos)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many images")
    p.add_argument("--output", type=Path, default=None, help="write per-layer numbers as JSON")
    p.add_argument("--unsafe-load", action="store_true", help="unpickle arbitrary objects in --checkpoint (trusted files only)")
    args = p.parse_args(argv)
    args.thresholds = args.thresholds or APT_SETTINGS[args.setting]
    try:
        host_planner(args.host, args.thresholds, img_size=args.size, depth=args.depth)
        if args.output is not None:
            check_output_file(args.output, what="--output")
    except ValueError as err:
        p.error(str(err))
    return args


def checkpoint_globals() -> tuple:
    """What this project's OpenMMLab training checkpoints hold beyond tensors (mmengine's log
    buffers), as the runner allows them; nothing without mmengine, which such files need."""
    try:
        from apt_dense.openmmlab.runner import MMENGINE_CHECKPOINT_GLOBALS
    except ImportError:
        return ()
    return MMENGINE_CHECKPOINT_GLOBALS


def load_backbone_weights(model, path: Path, allow_pickle: bool = False) -> None:
    """Backbone weights from a raw, mmseg/mmdet (``backbone.``) or detectron2 (``backbone.net.``)
    checkpoint, read as data; shapes must match and only the APT layers may be missing."""
    state = unwrap_state_dict(read_checkpoint(path, allow_pickle=allow_pickle, safe_globals=checkpoint_globals()))
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
    depth = args.depth or HOSTS[args.host]["depth"]
    overrides = dict(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD,
                     out_indices=tuple(range(depth)))
    if args.depth is not None:
        overrides["depth"] = args.depth
    apt, dense = build_model_pair(args.host, args.thresholds, **overrides)
    if args.checkpoint:
        for model in (apt, dense):
            try:
                load_backbone_weights(model, args.checkpoint, args.unsafe_load)
            except (OSError, UnsafeCheckpointError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    count, photos = image_source(args.images, args.limit)
    sums, kept, probed = torch.zeros(depth), [], 0
    try:
        for index, (_, image) in enumerate(photos, start=1):
            raw, _ = letterbox(image, args.size, IMAGENET_PIXEL_MEAN)
            x = normalise(raw.unsqueeze(0), IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)
            out = apt(x)
            kept.extend(out.layout.kept_fraction)
            for layer, (a, d) in enumerate(zip(out.features, dense(x).features)):
                sums[layer] += F.cosine_similarity(a, d, dim=1).mean()
            probed = index
            print(f"\rprobed {index}/{count} images", end="", flush=True)
    except ValueError as err:  # no readable image in the folder
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    print()
    similarity = (sums / probed).tolist()
    print(f"{args.host} at {args.size}, thresholds {args.thresholds}, mean tokens kept {sum(kept) / len(kept):.1%} "
          f"over {probed} images{'' if args.checkpoint else ' (random weights)'}")
    for layer, value in enumerate(similarity):
        print(f"block {layer:2d}: cosine similarity {value:.4f}")
    if args.output:
        result = dict(thresholds=args.thresholds, images=probed, kept=sum(kept) / len(kept), cosine=similarity)
        with ctrl_c_deferred() as ctrl_c:
            try:
                with atomic_write(args.output, "w") as f:
                    f.write(json.dumps(result, indent=1))
            except OSError as err:
                print(f"error: {write_error(err)}", file=sys.stderr)
                return 1
        print(f"wrote {args.output}")
        return 130 if ctrl_c.pressed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

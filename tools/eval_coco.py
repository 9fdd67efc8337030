#!/usr/bin/env python
"""Evaluate a detector checkpoint on a COCO-format folder: AP / AP50 and mean tokens kept.

    python tools/eval_coco.py --config-file projects/apt_vitdet_b.py --checkpoint model.pth \\
        --images coco/val2017 --annotations coco/annotations/instances_val2017.json [key=value ...]

Needs detectron2 (not on PyPI; see the README); --help works without it. The inputs and the
output folder are checked before the model is built.
"""
import argparse
import sys
from pathlib import Path

from apt_dense.benchmarking import existing_file
from apt_dense.outputs import check_output_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_net import detectron2_or_exit  # noqa: E402  (the same install message)

DATASET = "apt_eval_coco"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", type=existing_file, required=True)
    p.add_argument("--checkpoint", default="", help="detector weights (empty: the config's init_checkpoint)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--annotations", type=existing_file, required=True, help="COCO instances JSON")
    p.add_argument("--apt", action="store_true", help="swap the config's ViT backbone for APTViT")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's train.device)")
    p.add_argument("--output-dir", default="./output/eval")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle arbitrary Python objects from the checkpoint (trusted files only)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = p.parse_args(argv)
    if not Path(args.images).is_dir():
        p.error(f"--images {args.images} is not a folder")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    try:
        check_output_folder(args.output_dir, what="--output-dir")
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    detectron2_or_exit("eval_coco")
    from detectron2.config import LazyConfig, instantiate
    from detectron2.evaluation import COCOEvaluator

    from apt_dense.checkpoints import UnsafeCheckpointError
    from apt_dense.detectron2 import APTCheckpointer, swap_to_apt
    from apt_dense.detectron2.engine import evaluate, register_coco_datasets

    register_coco_datasets([(DATASET, str(args.annotations), args.images)])
    cfg = LazyConfig.load(str(args.config_file))
    if args.apt:
        swap_to_apt(cfg)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    cfg.dataloader.test.dataset.names = DATASET
    cfg.dataloader.evaluator = dict(
        _target_=COCOEvaluator, dataset_name=DATASET, output_dir=args.output_dir, use_fast_impl=False
    )
    device = args.device or cfg.train.device
    model = instantiate(cfg.model).to(device).eval()
    checkpoint = args.checkpoint or cfg.train.init_checkpoint
    try:
        APTCheckpointer(model, allow_pickle=args.unsafe_load).load(checkpoint)
    except (OSError, UnsafeCheckpointError, ValueError) as err:
        sys.exit(f"eval_coco: cannot load {checkpoint}: {err}")
    results = evaluate(cfg, model)
    for task in ("bbox", "segm"):
        if task in results:
            print(f"{task}: AP {results[task]['AP']:.2f}  AP50 {results[task]['AP50']:.2f}")
    if "apt" in results:
        print(f"mean tokens kept: {results['apt']['kept_fraction']:.1%} over {results['apt']['images']} images")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

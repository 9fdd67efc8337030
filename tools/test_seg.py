#!/usr/bin/env python
"""Evaluate an mmsegmentation 1.x model with an APT backbone: mIoU / aAcc and mean tokens kept.

    python tools/test_seg.py configs/apt_upernet_eva02_l_512_ade20k.py CHECKPOINT
    python tools/test_seg.py configs/dense_upernet_eva02_b_512_ade20k.py CHECKPOINT   # dense baseline
    python -m torch.distributed.run --nproc_per_node 8 tools/test_seg.py CONFIG CHECKPOINT --launcher pytorch

Metrics, tokens kept included, are computed over the images of all processes.
"""
import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mmengine.config import Config
from mmengine.dist import is_main_process

from apt_dense.openmmlab import APTRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_seg import add_runner_args, closing_process_group, load_config  # noqa: E402  (same handling as training)


def parse_args(argv=None, description: str = __doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("checkpoint", help="weights to evaluate: one trained here, or a released one (see the README's Checkpoints)")
    add_runner_args(p)
    args = p.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None, *, description: str = __doc__, prepare: Callable[[Config, argparse.Namespace], None] | None = None) -> dict:
    """Test; ``prepare(cfg, args)`` adapts the config for a task (tools/test_det.py)."""
    args = parse_args(argv, description)
    with closing_process_group():
        cfg = load_config(args)
        if prepare is not None:
            prepare(cfg, args)
        cfg.load_from = args.checkpoint
        cfg.resume = False
        metrics = APTRunner.from_cfg(cfg).test()
        if is_main_process():
            print(", ".join(f"{k}: {float(v):.4f}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()

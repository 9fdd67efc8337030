#!/usr/bin/env python
"""Evaluate an mmsegmentation 1.x model with an APT backbone: mIoU / aAcc and mean tokens kept.

    python tools/test_seg.py configs/apt_upernet_eva02_l_512_ade20k.py CHECKPOINT
    python tools/test_seg.py configs/dense_upernet_eva02_b_512_ade20k.py CHECKPOINT   # dense baseline
"""
import argparse
import os
import sys
from pathlib import Path

from mmengine.config import DictAction
from mmengine.runner import Runner

from apt_dense.mmseg import load_apt_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_seg import load_config  # noqa: E402  (same config handling as training)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("checkpoint", help="model weights (an EVA-02 UperNet checkpoint or one trained here)")
    p.add_argument("--work-dir")
    p.add_argument("--data-root", help="dataset root for the train/val/test dataloaders (an ADE20K-format folder)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="key=value overrides")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args)
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    load_apt_checkpoint(runner.model, args.checkpoint)
    metrics = runner.test()
    print(", ".join(f"{k}: {float(v):.4f}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()

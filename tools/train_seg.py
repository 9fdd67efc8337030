#!/usr/bin/env python
"""Train an mmsegmentation 1.x model with an APT backbone (mmseg's tools/train.py interface).

    python tools/train_seg.py configs/apt_upernet_eva02_l_512_ade20k.py --cfg-options load_from=eva02_L_upernet.pth
    python -m torch.distributed.run --nproc_per_node 8 tools/train_seg.py CONFIG --launcher pytorch
    python tools/train_seg.py CONFIG --resume          # continue the run in the work dir

Runs on apt_dense's APTRunner: ``load_from`` is loaded after weight initialisation (shapes must
match, the APT layers are the only expected missing keys), checkpoints are read as data, the
APT-only fine-tune freezes before DistributedDataParallel, and a work dir that already holds a
run is resumed (``--resume``) rather than overwritten. Without CUDA, ``--launcher pytorch`` runs
on CPU processes with gloo.
"""
import argparse
import contextlib
import os
import os.path as osp
import sys
from collections.abc import Callable

import torch.distributed as torch_dist
from mmengine.config import Config, DictAction

from apt_dense.openmmlab import APTRunner
from apt_dense.openmmlab.runner import RunError, SampleLoadError
from apt_dense.outputs import check_output_folder


def add_runner_args(p: argparse.ArgumentParser) -> None:
    """Options shared with test_seg.py (mmseg's tools have the same ones)."""
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: ./work_dirs/<config name>)")
    p.add_argument("--data-root", help="dataset root for the train/val/test dataloaders (e.g. an ADE20K- or COCO-format folder)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="key=value overrides")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)
    p.add_argument(
        "--unsafe-load", action="store_true",
        help="unpickle arbitrary Python objects in checkpoint files (only for files you trust)",
    )


def load_config(args) -> Config:
    """The config with ``--data-root``, ``--cfg-options`` and ``--unsafe-load`` applied (shared with test_seg)."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.data_root:
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if cfg.get(loader):
                cfg[loader].dataset.data_root = args.data_root
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.unsafe_load:
        cfg.allow_pickle_checkpoints = True
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    try:
        check_output_folder(cfg.work_dir, what="--work-dir")
    except ValueError as err:
        sys.exit(f"error: {err}")
    return cfg


def parse_args(argv=None, description: str = __doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in the work dir")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision")
    add_runner_args(p)
    args = p.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def build_config(args) -> Config:
    cfg = load_config(args)
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    cfg.resume = bool(args.resume or cfg.get("resume", False))
    return cfg


@contextlib.contextmanager
def closing_process_group():
    """Destroy the distributed process group before the interpreter exits: left to the exit
    handlers, gloo's threads can abort the process ("terminate called without an active
    exception") after a run that succeeded. A run that cannot start as configured (a work dir
    holding an earlier run, an empty split) or a sample that cannot be loaded exits with the
    message, which says what to do or names the files, instead of a traceback."""
    try:
        yield
    except (RunError, SampleLoadError) as err:
        sys.exit(f"error: {err}")
    if torch_dist.is_initialized():
        torch_dist.barrier()  # no rank tears down while another still talks to it
        torch_dist.destroy_process_group()


def main(argv=None, *, description: str = __doc__, prepare: Callable[[Config, argparse.Namespace], None] | None = None) -> None:
    """Train; ``prepare(cfg, args)`` adapts the config for a task (tools/train_det.py)."""
    args = parse_args(argv, description)
    with closing_process_group():
        cfg = build_config(args)
        if prepare is not None:
            prepare(cfg, args)
        APTRunner.from_cfg(cfg).train()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train or evaluate a detectron2 LazyConfig detector with an APT backbone.

Same interface as detectron2's tools/lazyconfig_train_net.py:

    python tools/train_net.py --config-file projects/apt_vitdet_l.py --num-gpus 8
    python tools/train_net.py --config-file projects/apt_vitdet_l.py --num-gpus 8 --resume    # after an interruption
    python tools/train_net.py --config-file projects/apt_vitdet_l.py --eval-only train.init_checkpoint=model.pth
    # any ViTDet config, its ViT swapped for APTViT:
    python tools/train_net.py --config-file .../mask_rcnn_vitdet_b_100ep.py --apt

Extra options: --apt, --coco-dataset NAME JSON IMAGE_DIR (register COCO-format data),
--unsafe-load (unpickle Python objects from trusted checkpoints; by default they are read as data).
On a machine without CUDA (train.device=cpu), --num-gpus N starts N CPU processes (gloo).
A training run refuses an output dir that holds checkpoints of an earlier run: continue it with
--resume (also after the folder was moved), or choose another train.output_dir.
Needs detectron2 (not on PyPI; see the README); --help works without it.
"""
import argparse
import logging
import sys
from pathlib import Path

from apt_dense.outputs import check_output_folder

logger = logging.getLogger("detectron2")


def detectron2_or_exit(tool: str) -> None:
    """Import the detectron2 plugin, or exit with one line saying how to install detectron2."""
    try:
        import apt_dense.detectron2  # noqa: F401
    except ImportError as err:
        sys.exit(f"{tool}: {err}")


def earlier_checkpoints(output_dir: str) -> list[str]:
    """The checkpoints of an earlier run in ``output_dir`` (``last_checkpoint`` and the
    ``model_*.pth`` files detectron2's checkpointer writes)."""
    folder = Path(output_dir)
    return sorted(p.name for p in [folder / "last_checkpoint", *folder.glob("model_*.pth")] if p.is_file())


def do_train(args, cfg):
    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
    from detectron2.utils import comm

    from apt_dense.detectron2 import APTCheckpointer
    from apt_dense.detectron2.engine import create_ddp_model, evaluate, freeze_all_but_apt_layers

    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    if cfg.train.get("apt_layers_only", False):
        logger.info("APT-only fine-tune, trainable: %s", freeze_all_but_apt_layers(model))
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = APTCheckpointer(model, cfg.train.output_dir, allow_pickle=args.unsafe_load, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def load_config(args):
    """The LazyConfig with ``--apt`` and the ``key=value`` overrides applied."""
    from detectron2.config import LazyConfig

    from apt_dense.detectron2 import swap_to_apt

    cfg = LazyConfig.load(args.config_file)
    if args.apt:
        swap_to_apt(cfg)
    return LazyConfig.apply_overrides(cfg, args.opts)


def main(args):
    from detectron2.config import instantiate
    from detectron2.engine import default_setup

    from apt_dense.detectron2 import APTCheckpointer
    from apt_dense.detectron2.engine import create_ddp_model, evaluate, register_coco_datasets

    register_coco_datasets(args.coco_dataset)
    cfg = load_config(args)
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        APTCheckpointer(model, allow_pickle=args.unsafe_load).load(cfg.train.init_checkpoint)
        return evaluate(cfg, model)
    do_train(args, cfg)
    return None


def argument_parser() -> argparse.ArgumentParser:
    """detectron2's lazyconfig_train_net.py options (built here, so that --help works without
    detectron2) and this tool's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.output_dir from its last checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    parser.add_argument("--num-gpus", type=int, default=1, help="number of gpus *per machine* (CPU processes without CUDA)")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)")
    parser.add_argument("--dist-url", default="auto",
                        help="initialization URL for torch.distributed (default: a free local port; "
                             "several machines need tcp://MAIN_HOST:PORT)")
    parser.add_argument("--apt", action="store_true", help="swap the config's ViT backbone for APTViT")
    parser.add_argument(
        "--coco-dataset", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    parser.add_argument(
        "--unsafe-load", action="store_true",
        help="unpickle arbitrary Python objects from checkpoints (trusted files only; "
        "by default only tensors, arrays and containers are read)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help='config overrides at the end of the command: "path.key=value" ...')
    return parser


def check_output_dir(parser: argparse.ArgumentParser, args) -> None:
    """Before any process starts: the output dir can be written, and a training run does not
    overwrite an earlier run's checkpoints."""
    output_dir = str(load_config(args).train.output_dir)
    try:
        check_output_folder(output_dir, what="train.output_dir")
    except ValueError as err:
        parser.error(str(err))
    earlier = earlier_checkpoints(output_dir)
    if earlier and not (args.resume or args.eval_only):
        parser.error(f"train.output_dir {output_dir} holds checkpoints of an earlier run ({', '.join(earlier[:4])}); "
                     "continue it with --resume, or start a new run with another train.output_dir=...")


def invoke_main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.num_machines > 1 and args.dist_url == "auto":
        parser.error(f"--num-machines {args.num_machines} needs --dist-url tcp://MAIN_HOST:PORT (the same on every machine)")
    if not Path(args.config_file).is_file():
        parser.error(f"--config-file {args.config_file!r} is not a file; give a LazyConfig .py file")
    detectron2_or_exit("train_net")
    from detectron2.engine import launch

    check_output_dir(parser, args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()

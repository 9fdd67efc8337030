#!/usr/bin/env python
"""Train or evaluate a detectron2 LazyConfig detector with an APT backbone.

Same interface as detectron2's tools/lazyconfig_train_net.py:

    python tools/train_net.py --config-file projects/apt_vitdet_l.py --num-gpus 8
    python tools/train_net.py --config-file projects/apt_vitdet_l.py --eval-only train.init_checkpoint=model.pth
    # any ViTDet config, its ViT swapped for APTViT:
    python tools/train_net.py --config-file .../mask_rcnn_vitdet_b_100ep.py --apt

Extra options: --apt, --coco-dataset NAME JSON IMAGE_DIR (register COCO-format data),
--unsafe-load (unpickle Python objects from trusted checkpoints; by default they are read as data).
On a machine without CUDA (train.device=cpu), --num-gpus N starts N CPU processes (gloo).
"""
import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_argument_parser, default_setup, default_writers, hooks, launch
from detectron2.utils import comm

from apt_dense.detectron2 import APTCheckpointer, swap_to_apt
from apt_dense.detectron2.engine import create_ddp_model, evaluate, freeze_all_but_apt_layers, register_coco_datasets

logger = logging.getLogger("detectron2")


def do_train(args, cfg):
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


def setup(args):
    cfg = LazyConfig.load(args.config_file)
    if args.apt:
        swap_to_apt(cfg)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    register_coco_datasets(args.coco_dataset)
    cfg = setup(args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        APTCheckpointer(model, allow_pickle=args.unsafe_load).load(cfg.train.init_checkpoint)
        return evaluate(cfg, model)
    do_train(args, cfg)
    return None


def argument_parser():
    parser = default_argument_parser()
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
    return parser


def invoke_main(argv=None):
    args = argument_parser().parse_args(argv)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()

#!/usr/bin/env python
"""Convert an EVA-02 pretraining checkpoint (eva02_*_p14to16.pt) to a detection checkpoint.

    python tools/convert_checkpoint.py eva02_B_pt_in21k_p14to16.pt eva02_B_det_init.pth

The output holds ``backbone.net.*`` keys for ``train.init_checkpoint``; pretraining-only keys
(mask_token, lm_head.*, final norm, cls token, fixed RoPE tables) are listed as dropped. numpy
arrays become tensors; any other value is an error. The target path is checked before the source
is read, and the target is written whole or not at all.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from apt_dense.checkpoints import UnsafeCheckpointError, convert_eva02_pretrain, read_checkpoint
from apt_dense.outputs import atomic_write, check_output_file, ctrl_c_deferred, write_error


def as_tensors(state: dict) -> dict[str, torch.Tensor]:
    """``state`` with numpy arrays as tensors.

    Raises:
        ValueError: naming the keys whose values are neither (a checkpoint holds weights only).
    """
    tensors, others = {}, []
    for key, value in state.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            others.append(f"{key} ({type(value).__name__})")
    if others:
        raise ValueError(f"{len(others)} values are not tensors or numpy arrays: {', '.join(others[:5])}"
                         + (", ..." if len(others) > 5 else "") + "; is this a weights file?")
    return tensors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("target")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle arbitrary Python objects from the source (trusted files only)")
    args = p.parse_args(argv)
    try:
        target = check_output_file(args.target, what="target")
    except ValueError as err:
        p.error(str(err))
    if target.resolve() == args.source.resolve():
        p.error(f"target {target} is the source; write the converted checkpoint to another file")
    try:
        converted, dropped = convert_eva02_pretrain(read_checkpoint(args.source, allow_pickle=args.unsafe_load))
        converted = as_tensors(converted)
    except (OSError, UnsafeCheckpointError, ValueError) as err:
        print(f"convert_checkpoint: cannot convert {args.source}: {err}", file=sys.stderr)
        return 1
    with ctrl_c_deferred() as ctrl_c:
        try:
            with atomic_write(target) as f:
                torch.save({"model": converted}, f)
        except OSError as err:
            print(f"convert_checkpoint: {write_error(err)}", file=sys.stderr)
            return 1
    print(f"wrote {len(converted)} tensors to {target}; dropped {len(dropped)}: {', '.join(dropped)}")
    return 130 if ctrl_c.pressed else 0


if __name__ == "__main__":
    sys.exit(main())

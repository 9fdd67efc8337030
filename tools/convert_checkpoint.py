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

import torch

from apt_dense.benchmarking import output_path
from apt_dense.checkpoints import UnsafeCheckpointError, convert_eva02_pretrain, read_checkpoint, state_dict_tensors
from apt_dense.outputs import atomic_write, check_output_file, ctrl_c_deferred, write_error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("target", type=output_path)
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle arbitrary Python objects from the source (trusted files only)")
    args = p.parse_args(argv)
    try:
        target = check_output_file(args.target, suffixes=(".pth", ".pt"), what="target")
    except ValueError as err:
        p.error(str(err))
    if target.resolve() == args.source.resolve():
        p.error(f"target {target} is the source; write the converted checkpoint to another file")
    try:
        converted, dropped = convert_eva02_pretrain(read_checkpoint(args.source, allow_pickle=args.unsafe_load))
        converted = state_dict_tensors(converted)
    except (OSError, UnsafeCheckpointError, TypeError, ValueError) as err:
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

#!/usr/bin/env python
"""Convert an EVA-02 pretraining checkpoint (eva02_*_p14to16.pt) to a detection checkpoint.

    python tools/convert_checkpoint.py eva02_B_pt_in21k_p14to16.pt eva02_B_det_init.pth

The output holds ``backbone.net.*`` keys for ``train.init_checkpoint``; pretraining-only keys
(mask_token, lm_head.*, final norm, cls token, fixed RoPE tables) are listed as dropped.
"""
import argparse
import sys

import torch

from apt_dense.checkpoints import UnsafeCheckpointError, convert_eva02_pretrain, read_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle arbitrary Python objects from the source (trusted files only)")
    args = p.parse_args(argv)
    try:
        converted, dropped = convert_eva02_pretrain(read_checkpoint(args.source, allow_pickle=args.unsafe_load))
    except (OSError, UnsafeCheckpointError, ValueError) as err:
        print(f"convert_checkpoint: cannot convert {args.source}: {err}", file=sys.stderr)
        return 1
    torch.save({"model": converted}, args.target)
    print(f"wrote {len(converted)} tensors to {args.target}; dropped {len(dropped)}: {', '.join(dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

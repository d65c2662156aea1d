#!/usr/bin/env python
"""Convert an NVlabs/edm network to a jdiffsample checkpoint (PyTorch is not needed).

    python convert/edm.py edm-cifar10-32x32-cond-vp.pkl ckpt/edm-cifar10-cond-vp
    python convert/edm.py state_dict.pt ckpt/net --kwargs config.json

SRC is an EDM snapshot pickle (network-snapshot-*.pkl or a released edm-*.pkl), read without
executing the source code embedded in it, or a torch.save state_dict with a JSON file
{"class_name": ..., "kwargs": {...}}. On error nothing is written to DST.
"""

import argparse
import sys

import _cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="EDM .pkl snapshot, or a state_dict .pt (needs --kwargs)")
    p.add_argument("dst", help="checkpoint directory to create")
    p.add_argument("--kwargs", metavar="JSON_FILE",
                   help='{"class_name": ..., "kwargs": {...}} (required for a state_dict .pt)')
    p.add_argument("--key", help="entry of a wrapped state_dict file (e.g. ema)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    _cli.setup()
    from jdiffsample import nets

    return _cli.run(lambda: nets.convert_edm(args.src, args.dst, args.kwargs, key=args.key,
                                             overwrite=args.overwrite), args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert an openai/guided-diffusion UNetModel checkpoint to a jdiffsample checkpoint.

    python convert/adm.py 256x256_diffusion.pt ckpt/adm-256 --preset 256x256
    python convert/adm.py state_dict.pt ckpt/net --config config.json

PyTorch is not needed: the .pt file is read without executing code from it. --config takes a
JSON file {"kwargs": {...}, "diffusion": {"noise_schedule": ..., "diffusion_steps": ...}}
(diffusion defaults to linear, 1000 steps). On error nothing is written to DST.
"""

import argparse
import sys

import _cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="guided-diffusion .pt state_dict")
    p.add_argument("dst", help="checkpoint directory to create")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a released model, e.g. 64x64, 256x256, 256x256_uncond")
    which.add_argument("--config", metavar="FILE", help="JSON with the UNetModel kwargs")
    p.add_argument("--noise-schedule", choices=("linear", "cosine"), help="override the betas")
    p.add_argument("--diffusion-steps", type=int, help="override the number of training steps")
    p.add_argument("--key", help="entry of a wrapped state_dict file (e.g. state_dict)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    _cli.setup()
    from jdiffsample import nets

    return _cli.run(lambda: nets.convert_adm(
        args.src, args.dst, preset=args.preset, config=args.config, key=args.key,
        noise_schedule=args.noise_schedule, diffusion_steps=args.diffusion_steps,
        overwrite=args.overwrite), args)


if __name__ == "__main__":
    sys.exit(main())

"""``jdiffsample convert FAMILY SRC DST [...]``: original weights -> a jdiffsample checkpoint folder.

One sub-command per network family (:mod:`jdiffsample.nets.family`), with the family's own
options. PyTorch files are read without torch and without executing code from them; on any error
nothing is written to DST.
"""

from __future__ import annotations

import os
import sys

from jdiffsample import nets


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for fam in nets.FAMILIES:
        p = sub.add_parser(fam.name, help=fam.description, description=fam.description)
        p.add_argument("src", help="the original weights (file or folder)")
        p.add_argument("dst", help="checkpoint folder to create")
        fam.conversion.arguments(p)
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing DST (only a jdiffsample checkpoint folder or an empty one)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        own = [a.dest for a in p._actions if a.dest not in ("help", "src", "dst", "debug")]
        p.set_defaults(convert_options=own)  # the keyword options of the family's convert()


def run(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    options = {k: getattr(args, k) for k in args.convert_options}
    try:
        info = nets.convert(args.family, args.src, args.dst, **options)
    except KeyboardInterrupt:
        print("jdiffsample convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; --debug shows the traceback
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jdiffsample convert {args.family}: error: {message}", file=sys.stderr)
        return 2
    print(f"{info['class_name']}: {info['tensors']} tensors, {info['parameters']:,} parameters "
          f"-> {info['dst']} in {info['seconds']:.2f} s")
    return 0

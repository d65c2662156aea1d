"""Shared command-line plumbing of the converter scripts (not a public module)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def setup() -> None:
    """Make the repository importable and keep library logging off the terminal."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def run(convert, args) -> int:
    """Call ``convert()``; print its summary, or one error line on stderr and return 1."""
    try:
        info = convert()
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; --debug shows the traceback
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"{info['class_name']}: {info['tensors']} tensors, {info['parameters']:,} parameters "
          f"-> {info['dst']} in {info['seconds']:.2f} s")
    return 0

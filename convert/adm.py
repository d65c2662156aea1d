#!/usr/bin/env python
"""Convert a guided-diffusion UNetModel: ``jdiffsample convert adm SRC DST --preset NAME | --config JSON``."""

import sys

from jdiffsample.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "adm", *sys.argv[1:]]))

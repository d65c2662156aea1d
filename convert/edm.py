#!/usr/bin/env python
"""Convert an NVlabs/edm network: ``jdiffsample convert edm SRC DST [--kwargs JSON] [--key K]``."""

import sys

from jdiffsample.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "edm", *sys.argv[1:]]))

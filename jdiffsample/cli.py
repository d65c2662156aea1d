"""The ``jdiffsample`` command line: one sub-command per module in ``jdiffsample.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Errors a user can fix are reported as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("sample", "steps", "eval")


def _load(name):
    return importlib.import_module(f"jdiffsample.commands.{name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jdiffsample", description="Fast sampling from diffusion models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as err:
            if err.name != f"jdiffsample.commands.{name}":
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"jdiffsample {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

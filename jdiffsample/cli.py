"""The ``jdiffsample`` command line: one sub-command per module in ``jdiffsample.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Errors a user can fix are reported as one line on stderr with a non-zero exit status.

Every command keeps JAX's compiled programs in a persistent cache, so that a second process with
the same programs skips compilation: ``$XDG_CACHE_HOME/jdiffsample/xla`` (``~/.cache/...``), or the
folder of a ``JAX_COMPILATION_CACHE_DIR`` the user set. ``--no-compilation-cache`` or
``JDIFFSAMPLE_COMPILATION_CACHE=0`` turns it off.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("sample", "steps", "eval", "convert", "learn")
CACHE_ENV = "JDIFFSAMPLE_COMPILATION_CACHE"


def _load(name):
    return importlib.import_module(f"jdiffsample.commands.{name}")


def compilation_cache_dir() -> str:
    """The CLI's default cache folder: ``$XDG_CACHE_HOME/jdiffsample/xla``, else ``~/.cache/jdiffsample/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jdiffsample", "xla")


def configure_compilation_cache(enabled: bool = True):
    """Turn JAX's persistent compilation cache on (or off) for this process; returns its folder or None.

    On: the user's ``JAX_COMPILATION_CACHE_DIR`` if set, else ``compilation_cache_dir()``, with every
    program cached however fast it compiled (JAX's default keeps only those over 1 s; a user's
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is kept). A folder that cannot be created leaves the
    cache off. Off: no persistent cache at all, not even the user's. Call before the first compilation.
    """
    import jax

    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or compilation_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def _cache_wanted(args) -> bool:
    return not args.no_compilation_cache and os.environ.get(CACHE_ENV, "1").strip().lower() not in (
        "0", "false", "no", "off")


def _chosen(argv) -> str | None:
    """The sub-command named on the command line (the first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="jdiffsample", description="Fast sampling from diffusion models in JAX.")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help=f"do not keep compiled programs across runs (also: {CACHE_ENV}=0); by default they "
                             f"are kept in {compilation_cache_dir()} or $JAX_COMPILATION_CACHE_DIR")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = _chosen(argv)
    modules = {}
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as err:
            if err.name != f"jdiffsample.commands.{name}":
                raise
            continue
        modules[name] = module
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        # Only the chosen command's options are built: some commands discover what they offer by
        # importing modules (convert imports every network family, and Flax), which other commands
        # should not pay for at start-up.
        if name == chosen:
            module.add_arguments(command)
    args = parser.parse_args(argv)
    configure_compilation_cache(_cache_wanted(args))
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"jdiffsample {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

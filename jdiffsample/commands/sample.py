"""``jdiffsample sample``: many samples from a network into sharded ``.npz`` files, resumably.

    jdiffsample sample --model digits --solver unipc --nfe 10 --num 50000 --out runs/digits

Its flags are derived from the run's description (:mod:`jdiffsample.pipeline.settings`: one field
per setting, with its help and default) and the solver registry (one flag per solver option,
passed only when given and only to a solver that takes it). Rerunning the same command finishes an
interrupted run, verifying the shards found; ``--export`` then writes PNG files or one merged
``.npz``; ``--dry-run`` prints the plan and exits. On several hosts add ``--distributed`` (see
docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from jdiffsample.commands import _flags, _solver_flags
from jdiffsample.pipeline import Output, Settings, run as run_pipeline


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint folder (jdiffsample convert FAMILY SRC DST) or a bundled model name")
    _flags.add_settings(parser, Output)
    _flags.add_settings(parser, Settings)
    parser.add_argument("--prompt-file", default=None, metavar="FILE",
                        help="prompts, one per line (instead of --prompt)")
    _solver_flags.add(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the plan (models, grid, guidance, shapes) "
                        "and exit without sampling or writing anything")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--deterministic-gpu", action=argparse.BooleanOptionalAction, default=True,
                        help="GPUs: deterministic XLA kernels (XLA_FLAGS=--xla_gpu_deterministic_ops=true), "
                             "so reruns and other batch sizes give the same images (about 3%% slower); "
                             "default on")
    dist = parser.add_argument_group("several hosts (jax.distributed.initialize)")
    dist.add_argument("--distributed", action="store_true",
                      help="initialize jax.distributed; the flags below are auto-detected on TPU, Slurm, Open MPI")
    dist.add_argument("--coordinator", help="coordinator address host:port (process 0)")
    dist.add_argument("--num-processes", type=int, help="number of processes")
    dist.add_argument("--process-id", type=int, help="this process's index")


def read_prompts(prompts, prompt_file):
    """The prompts of ``--prompt`` (repeated) and ``--prompt-file`` (one per line), or None."""
    if prompts is not None and prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return prompts
    try:
        with open(prompt_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompt-file: cannot read {prompt_file}: {getattr(err, 'strerror', None) or err}") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"--prompt-file {prompt_file} holds no prompt")
    return tuple(lines)


def deterministic_gpu_kernels() -> None:
    """Ask XLA for deterministic GPU kernels, unless XLA_FLAGS already says otherwise.

    XLA's GPU autotuner picks among kernels by timing them, so two compilations of the same
    program can round differently (measured on an H200: 1% of the digits model's pixels one level
    apart between two identical runs). Must run before JAX starts its backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def settings_from_args(args) -> tuple[Settings, Output]:
    """The run's description from the parsed flags (every value checked)."""
    given = _flags.values(args, Settings)
    given["options"] = _solver_flags.options(args, given.get("solver", "unipc"))
    prompts = read_prompts(given.get("prompts"), args.prompt_file)
    if prompts is not None:
        given["prompts"] = prompts
    return Settings(**given), Output(**_flags.values(args, Output))


def run(args) -> int:
    if args.deterministic_gpu:
        deterministic_gpu_kernels()
    settings, out = settings_from_args(args)
    if out.out is None:
        raise ValueError("give the output folder: --out DIR")
    if args.distributed:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
    log = None if args.quiet else sys.stderr
    if args.dry_run:
        print(run_pipeline(args.model, settings, out, log=None, dry_run=True).describe())
        return 0
    run_pipeline(args.model, settings, out, log=log)
    return 0

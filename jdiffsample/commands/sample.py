"""``jdiffsample sample``: many samples from a network into sharded ``.npz`` files, resumably.

    jdiffsample sample --model digits --solver unipc --nfe 10 --num 50000 --batch 256 --out runs/digits

Mirrors :func:`jdiffsample.pipeline.generate` (read its module docstring for the output layout,
determinism and resuming). Solver options are passed only when given, and only to the solvers
that take them. Rerunning the same command finishes an interrupted run; ``--export`` then writes
PNG files or one merged ``.npz``. On several hosts add ``--distributed`` (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "generate samples into sharded .npz files (deterministic, resumable, multi-device and multi-host)"

#: CLI flag destination -> solver option name, per solver that accepts it.
_OPTIONS = {
    "order": {"unipc": "order", "dpmpp": "order", "sa_solver": "predictor_order"},
    "corrector_order": {"sa_solver": "corrector_order"},
    "variant": {"unipc": "variant"},
    "exact": {"dpmpp": "exact"},
    "lower_order_final": {"unipc": "lower_order_final", "dpmpp": "lower_order_final",
                          "sa_solver": "lower_order_final"},
    "eta": {"ddim": "eta", "dpmpp": "eta"},
    "tau": {"sa_solver": "tau"},
    "churn": {"euler": "s_churn", "heun": "s_churn"},
    "s_tmin": {"euler": "s_tmin", "heun": "s_tmin"},
    "s_tmax": {"euler": "s_tmax", "heun": "s_tmax"},
    "s_noise": {"euler": "s_noise", "heun": "s_noise"},
}


def add_arguments(parser) -> None:
    from jdiffsample.pipeline import GRIDS

    parser.add_argument("--model", required=True,
                        help="checkpoint directory (convert/edm.py, convert/adm.py) or a bundled model name")
    parser.add_argument("--out", required=True, help="output folder (created; rerun to resume)")
    parser.add_argument("--num", type=int, default=50000, help="number of samples (default 50000)")
    parser.add_argument("--solver", default="unipc",
                        help="ddim, euler, heun, dpmpp, unipc or sa_solver (default unipc)")
    parser.add_argument("--nfe", type=int, default=10, help="model calls per sample (default 10)")
    parser.add_argument("--grid", default="logsnr", choices=GRIDS, help="time grid (default logsnr)")
    parser.add_argument("--skip-tuning", type=float, default=None, metavar="RHO_BOTTOM",
                        help="Skip-Tuning: scale of the deepest skip (rho_top = 1), e.g. 0.8")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--class-labels", default=None, metavar="random|N|N,N,...",
                        help="class-conditional models: random (default), one label, or a list cycled by index")
    parser.add_argument("--guidance", type=float, default=1.0, metavar="W",
                        help="classifier-free guidance weight (default 1 = off)")
    parser.add_argument("--batch", type=int, default=64,
                        help="samples per call over this process's devices (default 64); no effect on images")
    parser.add_argument("--micro-batch", type=int, default=64,
                        help="samples per network call on one device (default 64); the images depend on it, "
                             "not on --batch or the devices; on accelerators use e.g. the per-device batch")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per .npz file (default 1000)")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="afterwards, export all samples: PATH.npz (one file) or a folder of PNGs")
    parser.add_argument("--no-preview", action="store_true", help="do not write grid.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    opts = parser.add_argument_group("solver options (default: the solver's own)")
    opts.add_argument("--order", type=int, help="unipc/dpmpp order; sa_solver predictor order")
    opts.add_argument("--corrector-order", type=int, help="sa_solver corrector order")
    opts.add_argument("--variant", help="unipc: bh1, bh2 or exact")
    opts.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                      help="dpmpp: exact exponential-integrator weights")
    opts.add_argument("--lower-order-final", action=argparse.BooleanOptionalAction, default=None,
                      help="unipc/dpmpp/sa_solver: lower the order on the last steps")
    opts.add_argument("--eta", type=float, help="ddim/dpmpp stochasticity")
    opts.add_argument("--tau", type=float, help="sa_solver constant stochasticity (default: the paper's tau(t))")
    opts.add_argument("--churn", type=float, help="euler/heun S_churn")
    opts.add_argument("--s-tmin", type=float, help="euler/heun S_tmin")
    opts.add_argument("--s-tmax", type=float, help="euler/heun S_tmax")
    opts.add_argument("--s-noise", type=float, help="euler/heun S_noise")

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


def solver_options(args) -> dict:
    """The solver options given on the command line, named as ``args.solver`` takes them."""
    from jdiffsample.solvers import SOLVERS

    if args.solver not in SOLVERS:
        raise ValueError(f"unknown solver {args.solver!r}; choose one of {', '.join(sorted(SOLVERS))}")
    options = {}
    for dest, names in _OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if args.solver not in names:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} does not apply to solver {args.solver} "
                             f"(it applies to {', '.join(sorted(names))})")
        options[names[args.solver]] = value
    return options


def parse_labels(text: str | None):
    """``None``, ``"random"``, ``"7"`` or ``"1,2,3"`` -> None, 'random', 7 or [1, 2, 3]."""
    if text is None or text == "random":
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--class-labels must be 'random', a label or a comma-separated list, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def deterministic_gpu_kernels() -> None:
    """Ask XLA for deterministic GPU kernels, unless XLA_FLAGS already says otherwise.

    XLA's GPU autotuner picks among kernels by timing them, so two compilations of the same
    program can round differently (measured on an H200: 1% of the digits model's pixels one level
    apart between two identical runs). Must run before JAX starts its backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def run(args) -> int:
    if args.deterministic_gpu:
        deterministic_gpu_kernels()
    options = solver_options(args)
    labels = parse_labels(args.class_labels)
    if args.distributed and args.export:
        raise ValueError("--export needs every host's shards: export after all hosts finish, by rerunning "
                         "the same command without --distributed")
    if args.distributed:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")

    from jdiffsample import pipeline

    summary = pipeline.generate(
        args.model, args.out, num=args.num, solver=args.solver, nfe=args.nfe, grid=args.grid, options=options,
        skip_tuning=args.skip_tuning, guidance=args.guidance, class_labels=labels, seed=args.seed,
        batch=args.batch, micro_batch=args.micro_batch, shard_size=args.shard_size, preview=not args.no_preview,
        log=None if args.quiet else sys.stderr,
    )
    if args.export and summary.process_index == 0:
        if args.export.endswith(".npz"):
            path = pipeline.export_npz(args.out, args.export)
            message = f"exported {args.num} samples to {path}"
        else:
            count = pipeline.export_png(args.out, args.export)
            message = f"exported {count} PNG files to {args.export}"
        if not args.quiet:
            print(f"sample: {message}", file=sys.stderr)
    return 0

"""``jdiffsample learn``: learn a learnable solver's parameters for a model and NFE, into a JSON file.

    jdiffsample learn --model digits --solver amed --nfe 5 --out amed5.json
    jdiffsample learn --model digits --solver pas --base ipndm --order 3 --nfe 6 --out pas6.json

Trains with :func:`jdiffsample.learn_solver.learn_solver` on ``--batch`` starting noises (labels
cycling over the classes of a class-conditional model) against Heun on ``--teacher-steps`` Karras
steps, and writes the parameters with what they were trained for (:mod:`jdiffsample.solver_params`:
model digest, solver and options, NFE, schedule, base, grid). The errors before and after, on the
training noises and on ``--holdout`` others, go to stderr. An odd NFE for AMED or EPD takes the
analytic first step (``--afs``) unless ``--no-afs`` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jdiffsample.commands import _solver_flags

_GRIDS = ("logsnr", "karras", "uniform", "quadratic", "optimized")


def _learnable() -> list[str]:
    from jdiffsample.solvers import registry

    return [name for name in registry.names() if registry.get(name).learnable]


def add_arguments(parser) -> None:
    from jdiffsample.learn_solver import LOSSES, TEACHERS

    parser.add_argument("--model", required=True,
                        help="checkpoint folder (jdiffsample convert FAMILY SRC DST) or a bundled model name")
    parser.add_argument("--solver", required=True, help=f"a learnable solver: {', '.join(_learnable())}")
    parser.add_argument("--nfe", type=int, required=True, help="model calls per sample the parameters are for")
    parser.add_argument("--out", required=True, help="the JSON file to write (refused if it exists, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--grid", default="logsnr", choices=_GRIDS, help="the time grid (default logsnr)")
    parser.add_argument("--teacher", default="heun", choices=TEACHERS,
                        help="heun: EDM's Heun on a fine Karras grid (default); same: the base solver, fine logSNR")
    parser.add_argument("--teacher-steps", type=int, default=100, help="teacher steps (default 100)")
    parser.add_argument("--loss", default="mse", choices=LOSSES, help="training loss on the final sample (default mse)")
    parser.add_argument("--iters", type=int, default=100, help="training iterations (default 100)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the solver's)")
    parser.add_argument("--batch", type=int, default=64, help="training noises (default 64)")
    parser.add_argument("--holdout", type=int, default=64, help="held-out noises for the error report (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noises (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    _solver_flags.add(parser)


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from jdiffsample import grids, nets, solver_params
    from jdiffsample.learn_solver import learn_solver
    from jdiffsample.solvers import registry

    info = registry.get(args.solver)
    if not info.learnable:
        raise ValueError(f"solver {args.solver} has no learned parameters; choose one of {', '.join(_learnable())}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    for name in ("batch", "iters", "teacher_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {args.holdout}")
    options = _solver_flags.options(args, args.solver)
    if "afs" in info.option_names and "afs" not in options and args.nfe % info.calls_per_step:
        options["afs"] = True  # an odd NFE: the analytic first step saves the call
    options = info.resolve(options)
    model = nets.load_model(nets.resolve(args.model))
    schedule = model.schedule
    n_steps, final_zero = info.steps_for_nfe(args.nfe, zero_end=schedule.zero_end, options=options)
    if final_zero:
        raise ValueError(f"--nfe {args.nfe} needs a last step into sigma = 0 for {args.solver}; learning needs a "
                         f"grid ending above it (pick an NFE of {info.calls_per_step} per step)")
    ts = grids.make(args.grid, schedule, n_steps, solver=args.solver, options=options)
    classes = model.num_classes
    total = args.batch + args.holdout
    labels = jnp.arange(args.batch) % classes if classes else None
    held_labels = jnp.arange(args.holdout) % classes if classes else None
    shape = (total, *model.sample_shape)
    noise = jax.random.normal(jax.random.key(args.seed), shape) * float(schedule.prior_std(ts[0]))
    denoise = model.denoiser(labels=labels)

    def progress(it, params, train, held):
        if not args.quiet:
            print(f"learn: iter {it:4d}  train {args.loss} {train:.4e}  held-out mse {held:.4e}", file=sys.stderr,
                  flush=True)

    result = learn_solver(denoise, schedule, args.solver, noise[: args.batch], ts,
                          holdout=noise[args.batch:] if args.holdout else None,
                          holdout_denoise=model.denoiser(labels=held_labels), teacher=args.teacher,
                          teacher_steps=args.teacher_steps, loss=args.loss, iterations=args.iters,
                          learning_rate=args.lr, callback=progress, **options)
    solver_params.save(out, result, model=model, schedule=schedule,
                       training=dict(batch=args.batch, holdout=args.holdout, seed=args.seed, grid=args.grid,
                                     model_path=str(args.model)))
    if not args.quiet:
        print(f"learn: {info.label(options)} at NFE {args.nfe}: held-out mse {result.init_holdout_error:.4e} -> "
              f"{result.holdout_error:.4e} in {result.seconds:.1f} s ({result.model_calls['total']} model calls per "
              f"training sample); wrote {out}", file=sys.stderr)
    return 0

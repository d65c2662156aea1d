"""``jdiffsample steps``: an optimized time grid, printed as JSON.

By default the grid minimizes the model-free error bound of Xue et al. (2024)
(``jdiffsample.optimize.optimize_timesteps``). With ``--learned`` it is instead learned through the
solver on a random Gaussian mixture (a stand-in for a model, with an exact denoiser) against a
fine-grid teacher, with progress lines on stderr.
"""

from __future__ import annotations

import json
import sys

from jdiffsample.commands import _solver_flags

_SCHEDULES = ("vp-linear", "vp-cosine", "vp-discrete", "ve", "flow")


def add_arguments(parser) -> None:
    parser.add_argument("--schedule", choices=_SCHEDULES, default="vp-linear", help="noise schedule")
    parser.add_argument("--nfe", type=int, default=10, help="number of model calls = steps (default 10)")
    parser.add_argument("--solver", default="unipc",
                        help=f"the solver the grid is for (default unipc): {_solver_flags.solver_help()}; the bound "
                             f"models it as an Adams method of its order (1-3) with lower-order final steps, "
                             f"--learned runs it")
    parser.add_argument("--init", default="logsnr", choices=("logsnr", "uniform", "quadratic", "karras"),
                        help="initial grid (default logsnr)")
    parser.add_argument("--p", type=float, default=1.0,
                        help="error weight sigma^p / alpha: 1 for pixel, 2 for latent models (default 1)")
    parser.add_argument("--trunc", type=int, default=None,
                        help="steps combined as a root-sum-of-squares (default: 3 for NFE <= 6, else 0)")
    parser.add_argument("--paper", action="store_true", help="the paper's equation instead of the authors' code")
    parser.add_argument("--optimizer", default="pg", choices=("pg", "jaxopt"),
                        help="projected gradient as a small lax loop (pg, default) or jaxopt.ProjectedGradient "
                             "itself (the same iterates; slower to compile)")
    parser.add_argument("--t-start", type=float, default=None, help="first (noisiest) time; default the schedule's")
    parser.add_argument("--t-end", type=float, default=None, help="last time; default the schedule's")
    learned = parser.add_argument_group("learned grid (--learned): on a random Gaussian mixture")
    learned.add_argument("--learned", action="store_true", help="learn the grid through the solver instead")
    learned.add_argument("--dim", type=int, default=64, help="data dimension (default 64)")
    learned.add_argument("--components", type=int, default=8, help="mixture components (default 8)")
    learned.add_argument("--batch", type=int, default=128, help="training noises; as many held out (default 128)")
    learned.add_argument("--maxiter", type=int, default=None,
                         help="iterations: of the bound's optimizer (default 300) or of learning (default 100)")
    learned.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _solver_flags.add(parser)


def _learned(args, schedule, settings, options, n_steps, maxiter: int):
    # imported here, not at the top: 'jdiffsample steps' starts in a fraction of a second without them
    import jax
    import jax.numpy as jnp

    from jdiffsample import learn, timesteps
    from jdiffsample.testing import GaussianMixture

    keys = jax.random.split(jax.random.key(args.seed), 3)
    mixture = GaussianMixture.random(keys[0], args.dim, args.components)
    ts_init = timesteps.get(args.init, schedule, n_steps, t_start=args.t_start, t_end=args.t_end)
    noise, held = (mixture.sample_marginal(k, args.batch, ts_init[0], schedule, dtype=jnp.float32) for k in keys[1:])

    def progress(it, ts, train, holdout):
        print(f"steps: iter {it:4d}  train mse {train:.4e}  held-out mse {holdout:.4e}", file=sys.stderr, flush=True)

    result = learn.learn_timesteps(
        mixture.denoiser(schedule), schedule, args.solver, noise, ts_init, holdout=held, maxiter=maxiter,
        callback=progress, **options,
    )
    settings.update(dim=args.dim, components=args.components, batch=args.batch, seed=args.seed, maxiter=maxiter)
    return dict(
        times=result.ts.tolist(), lambdas=result.lams.tolist(), train_mse=result.train_error,
        holdout_mse=result.holdout_error, init_train_mse=result.init_train_error,
        init_holdout_mse=result.init_holdout_error, iterations=result.iterations, settings=settings,
    )


def _check(args) -> None:
    """Every flag, before any work."""
    for flag, value in (("--nfe", args.nfe), ("--maxiter", 1 if args.maxiter is None else args.maxiter), ("--dim", args.dim),
                        ("--components", args.components), ("--batch", args.batch)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if not args.p > 0:
        raise ValueError(f"--p is the exponent of the error weight sigma^p / alpha and must be positive, got {args.p}")
    if args.trunc is not None and args.trunc < 0:
        raise ValueError(f"--trunc must be a non-negative integer, got {args.trunc}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")


def run(args) -> int:
    # imported here, not at the top: 'jdiffsample steps' starts in a fraction of a second without them
    from jdiffsample import optimize, schedules
    from jdiffsample.solvers import registry

    _check(args)
    maxiter = args.maxiter if args.maxiter is not None else (100 if args.learned else 300)
    solver = registry.get(args.solver)
    options = _solver_flags.options(args, args.solver)
    order = solver.bound_order(options)
    schedule = schedules.get(args.schedule)
    n_steps, final_zero = solver.steps_for_nfe(args.nfe, zero_end=schedule.zero_end, options=options)
    if final_zero:
        raise ValueError(f"--nfe {args.nfe} needs a last step into sigma = 0 for {args.solver}; pick an NFE that is "
                         f"a multiple of its {solver.calls_per_step} model calls per step")
    settings = dict(
        schedule=args.schedule, nfe=args.nfe, solver=args.solver, options=options, order=order, init=args.init,
        t_start=args.t_start, t_end=args.t_end,
    )
    if args.learned:
        settings["method"] = "learned"
        out = _learned(args, schedule, settings, options, n_steps, maxiter)
    else:
        result = optimize.optimize_timesteps(
            schedule, n_steps, args.t_start, args.t_end, order=order, p=args.p, init=args.init,
            trunc=args.trunc, paper=args.paper, method=args.optimizer,
            maxiter=maxiter,
        )
        trunc = None if args.paper else (optimize.default_trunc(n_steps) if args.trunc is None else args.trunc)
        settings.update(method="surrogate", p=args.p, trunc=trunc, paper=args.paper, optimizer=args.optimizer)
        out = dict(
            times=result.ts.tolist(), lambdas=result.lams.tolist(), objective=result.objective,
            init_objective=result.init_objective, iterations=result.iterations, settings=settings,
        )
    settings["t_start"], settings["t_end"] = out["times"][0], out["times"][-1]
    print(json.dumps(out, indent=2))
    return 0

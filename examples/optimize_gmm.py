"""Optimized and learned time grids on a Gaussian mixture: the error-vs-NFE table (and figure).

The mixture has an exact denoiser, so the error of a few-step sampler can be measured exactly against
a fine-grid reference solution from the same starting noise. For each NFE and solver it compares four
grids between the same endpoints (VP-linear, t from 1 to 1e-3):

* ``logsnr``: uniform in half-log-SNR (the usual default for pixel models);
* ``karras``: EDM's rho = 7 grid;
* ``bound``: ``optimize_timesteps``, the error bound of Xue et al. (2024), from the logSNR grid;
* ``learned``: ``learn_timesteps`` through the solver on training noises, from the logSNR grid.

The error is the root-mean-square distance to the reference on held-out noises (never used for
learning). Run::

    python examples/optimize_gmm.py                       # UniPC-3 and DPM-Solver++(3M), NFE 5-15
    python examples/optimize_gmm.py --plot error_vs_nfe.png
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jdiffsample import learn, optimize, sample, schedules, testing, timesteps

SOLVERS = {"unipc": ("UniPC-3", dict(order=3)), "dpmpp": ("DPM-Solver++(3M)", dict(order=3))}
GRIDS = ("logsnr", "karras", "bound", "learned")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="training noises for the learned grids")
    parser.add_argument("--eval-batch", type=int, default=512, help="held-out noises the errors are measured on")
    parser.add_argument("--nfe", default="5,6,7,8,10,15", help="comma-separated NFEs")
    parser.add_argument("--solvers", default="unipc,dpmpp", help=f"comma-separated, from {sorted(SOLVERS)}")
    parser.add_argument("--learn-iters", type=int, default=60)
    parser.add_argument("--reference-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="save the figure here (needs matplotlib)")
    args = parser.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    solvers = args.solvers.split(",")

    jax.config.update("jax_enable_x64", True)  # exact errors: float64 everywhere in this script
    schedule = schedules.VPLinear()
    k_mix, k_train, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    mixture = testing.GaussianMixture.random(k_mix, args.dim, args.components)
    denoise = mixture.denoiser(schedule)
    t_start = schedule.t_max
    train = mixture.sample_marginal(k_train, args.batch, t_start, schedule, dtype=jnp.float64)
    held = mixture.sample_marginal(k_eval, args.eval_batch, t_start, schedule, dtype=jnp.float64)
    reference = sample(denoise, held, timesteps.logsnr(schedule, args.reference_steps), schedule, "unipc", order=3)

    def rmse(ts, solver):
        out = sample(denoise, held, jnp.asarray(ts), schedule, solver, **SOLVERS[solver][1])
        return float(jnp.sqrt(jnp.mean(jnp.square(out - reference))))

    errors = {}  # (solver, grid, nfe) -> rmse
    for n in nfes:
        start = time.perf_counter()
        bound = optimize.optimize_timesteps(schedule, n, order=3, p=1, init="logsnr").ts
        grids = {"logsnr": timesteps.logsnr(schedule, n), "karras": timesteps.karras(schedule, n), "bound": bound}
        for solver in solvers:
            learned = learn.learn_timesteps(
                denoise, schedule, solver, train, grids["logsnr"], maxiter=args.learn_iters, **SOLVERS[solver][1]
            ).ts
            for name, ts in dict(grids, learned=learned).items():
                errors[solver, name, n] = rmse(ts, solver)
        print(f"NFE {n:2d} done in {time.perf_counter() - start:.0f} s", flush=True)

    print("\nRMS error against the reference on held-out noises (VP-linear, Gaussian mixture "
          f"dim {args.dim}, {args.components} components)")
    for solver in solvers:
        print(f"\n{SOLVERS[solver][0]}\n{'NFE':>4}" + "".join(f"{g:>11}" for g in GRIDS))
        for n in nfes:
            print(f"{n:>4}" + "".join(f"{errors[solver, g, n]:>11.3e}" for g in GRIDS))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(solvers), figsize=(5 * len(solvers), 4), squeeze=False)
        for ax, solver in zip(axes[0], solvers):
            for g in GRIDS:
                ax.semilogy(nfes, [errors[solver, g, n] for n in nfes], marker="o", label=g)
            ax.set(title=SOLVERS[solver][0], xlabel="NFE", ylabel="RMS error vs reference")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nfigure saved to {args.plot}")
    return errors


if __name__ == "__main__":
    main()

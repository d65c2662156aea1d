"""Error vs NFE of every solver on the analytic Gaussian mixture (uniform-logSNR grid).

The error is the RMS distance of the final sample to a reference solution of the probability-flow
ODE from the same starting noise (SA-Solver(4, 4) with tau = 0 on 1000 steps, float64). Heun spends
two model calls per step, so it runs NFE // 2 steps; its actual NFE is printed.

    python benchmarks/solver_error_table.py [--dim 64] [--batch 64] [--schedule vp-linear]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jdiffsample
from jdiffsample import schedules, solvers, testing, timesteps

CONFIGS = [
    ("DDIM", "ddim", {}),
    ("Euler", "euler", {}),
    ("Heun (EDM)", "heun", {}),
    ("DPM-Solver++(2M)", "dpmpp", dict(order=2)),
    ("DPM-Solver++(3M)", "dpmpp", dict(order=3)),
    ("UniPC-2 bh1", "unipc", dict(order=2, variant="bh1")),
    ("UniPC-3 bh1", "unipc", dict(order=3, variant="bh1")),
    ("UniPC-3 bh2", "unipc", dict(order=3, variant="bh2")),
    ("SA-Solver(3,4) tau=0", "sa_solver", dict(tau=0.0)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--schedule", default="vp-linear")
    parser.add_argument("--nfe", default="5,6,8,10,20")
    args = parser.parse_args()
    nfes = [int(n) for n in args.nfe.split(",")]

    with schedules.float64():
        sch = schedules.get(args.schedule)
        gmm = testing.GaussianMixture.random(jax.random.key(0), args.dim, args.components)
        den = gmm.denoiser(sch)
        x = gmm.sample_marginal(jax.random.key(1), args.batch, sch.t_max, sch, dtype=jnp.float64)
        ref = jdiffsample.sample(den, x, timesteps.logsnr(sch, 1000), sch, solver="sa_solver", tau=0.0,
                                 predictor_order=4, corrector_order=4, lower_order_final=False)
        print(f"RMS error vs the ODE solution, {args.schedule}, mixture of {args.components} in "
              f"dimension {args.dim}, batch {args.batch}, uniform-logSNR grid\n")
        print("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        print("|---|" + "---|" * len(nfes))
        for label, name, options in CONFIGS:
            cells = []
            for nfe in nfes:
                steps = nfe // 2 if name == "heun" else nfe
                out = jdiffsample.sample(den, x, timesteps.logsnr(sch, steps), sch, solver=name, **options)
                err = float(jnp.sqrt(jnp.mean((out - ref) ** 2)))
                used = solvers.nfe(name, steps)
                cells.append(f"{err:.2e}" + ("" if used == nfe else f" ({used})"))
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Wall time of ``optimize_timesteps`` against the reference SciPy method, and the bound each reaches.

The reference is the method of the authors' ``step_optim.py`` (Xue et al., 2024): the bound computed
in NumPy with a Python loop over the steps (as there, without its torch calls), minimized by
``scipy.optimize.minimize(method='trust-constr')`` with SciPy's defaults (2-point finite differences,
BFGS Hessian), a linear monotonicity constraint on the interior lambdas, from the same initial grid.

``optimize_timesteps`` is timed on its first call for each N (including the JAX compile) and as the
median of ``--repeats`` calls after that. Both objectives are evaluated with the same formula. Run::

    python benchmarks/step_optim.py                 # VP-linear, logSNR start, N = 5, 10, 15, 20
    python benchmarks/step_optim.py --schedule ve --init karras
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax.numpy as jnp
import numpy as np
from scipy.optimize import LinearConstraint, minimize

from jdiffsample import optimize, schedules, timesteps


def reference_bound(lams, p=1.0, trunc=0, ve=False):
    """The bound as ``step_optim.py`` computes it: one loop over the steps, orders 1, 2, 3, ..., 2, 1."""
    n = len(lams) - 1
    h = np.diff(lams)
    e = np.exp(lams)
    if ve:
        err = np.exp(-p * lams)
    else:
        err = (1.0 + np.exp(2 * lams)) ** (-p / 2) * np.sqrt(1.0 + np.exp(-2 * lams))

    def moments(x):  # H_m(x) = int_0^x u^m e^u du, m = 0, 1, 2
        h0 = np.exp(x) - 1
        h1 = x * np.exp(x) - h0
        return h0, h1, x * x * np.exp(x) - 2 * h1

    result, totals = 0.0, np.zeros(n)
    for s in range(n):
        if s in (0, n - 1):
            result += abs((e[s + 1] - e[s]) * err[s])
            continue
        h0, h1, h2 = moments(h[s])
        if s in (1, n - 2):
            b = h[s - 1]
            nodes = [s - 1, s]
            w = [-e[s] * h1 / b, e[s] * (h1 + b * h0) / b]
        else:
            a, b = h[s - 2], h[s - 1]
            nodes = [s - 2, s - 1, s]
            w = [
                e[s] * (h2 + b * h1) / (a * (a + b)),
                -e[s] * (h2 + (a + b) * h1) / (a * b),
                e[s] * (h2 + (2 * b + a) * h1 + b * (a + b) * h0) / (b * (a + b)),
            ]
        if s < trunc:
            result += np.sqrt(sum((err[i] * wi) ** 2 for i, wi in zip(nodes, w)))
        else:
            for i, wi in zip(nodes, w):
                totals[i] += err[i] * wi
    return result + np.sum(np.abs(totals))


def scipy_reference(lams0, p, trunc, ve):
    """trust-constr from ``lams0`` with the endpoints fixed; returns the optimized lambdas."""
    n = len(lams0) - 1
    diff = np.zeros((n, n - 1))
    diff[np.arange(n - 1), np.arange(n - 1)] = 1.0
    diff[np.arange(1, n), np.arange(n - 1)] = -1.0
    lower = np.zeros(n)
    lower[0], lower[-1] = lams0[0], -lams0[-1]

    def fun(inner):
        return reference_bound(np.concatenate([lams0[:1], inner, lams0[-1:]]), p, trunc, ve)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "delta_grad == 0.0" from the quasi-Newton update
        out = minimize(fun, lams0[1:-1], method="trust-constr",
                       constraints=[LinearConstraint(diff, lower, np.full(n, np.inf))])
    return np.concatenate([lams0[:1], out.x, lams0[-1:]]), out.nit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="vp-linear", choices=("vp-linear", "vp-cosine", "vp-discrete", "ve"))
    parser.add_argument("--init", default="logsnr", choices=sorted(timesteps.GRIDS))
    parser.add_argument("--n", default="5,10,15,20", help="comma-separated numbers of steps")
    parser.add_argument("--p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    schedule = schedules.get(args.schedule)

    rows = []
    for n in [int(v) for v in args.n.split(",")]:
        trunc = optimize.default_trunc(n)
        start = time.perf_counter()
        first = optimize.optimize_timesteps(schedule, n, init=args.init, p=args.p)
        with_compile = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = optimize.optimize_timesteps(schedule, n, init=args.init, p=args.p)
            times.append(time.perf_counter() - start)
        after_compile = float(np.median(times))
        assert np.array_equal(ours.lams, first.lams)

        with schedules.float64():
            lams0 = np.asarray(schedule.lam(jnp.asarray(timesteps.get(args.init, schedule, n))), np.float64)
        start = time.perf_counter()
        ref_lams, ref_iters = scipy_reference(lams0, args.p, trunc, schedule.is_ve)
        ref_time = time.perf_counter() - start
        ref_obj = reference_bound(ref_lams, args.p, trunc, schedule.is_ve)
        ours_obj = reference_bound(ours.lams, args.p, trunc, schedule.is_ve)
        rows.append((n, trunc, ref_time, ref_iters, with_compile, after_compile, ours.iterations,
                     reference_bound(lams0, args.p, trunc, schedule.is_ve), ref_obj, ours_obj))

    print(f"\n{args.schedule}, init {args.init}, p {args.p:g}, order 3; times in seconds; "
          "speed-up = SciPy time / ours")
    print("| N | trunc | SciPy trust-constr (iters) | ours incl. compile | ours after compile (iters) "
          "| speed-up incl. compile | speed-up after compile | bound at init | SciPy bound | our bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, trunc, ref_t, ref_it, t_c, t_a, it, init_obj, ref_obj, ours_obj in rows:
        print(f"| {n} | {trunc} | {ref_t:.2f} ({ref_it}) | {t_c:.2f} | {t_a:.4f} ({it}) | {ref_t / t_c:.2f}x "
              f"| {ref_t / t_a:.0f}x | {init_obj:.4f} | {ref_obj:.4f} | {ours_obj:.4f} |")
    return rows


if __name__ == "__main__":
    main()

"""Wall time of one sampling call: jdiffsample (jitted JAX) vs diffusers' schedulers (PyTorch).

Both sides sample a batch of 64 x 32 x 32 x 3 in float32 with NFE 10, on the sigma grid diffusers
builds for DDPM's linear betas, with the same analytic denoiser written once in JAX and once in torch:

* ``mixture``: the posterior mean of a 4-component Gaussian mixture in dimension 3072 (a few
  elementwise passes over [batch, components, 3072]);
* ``trivial``: D(x, s) = x / (1 + s^2) (data ~ N(0, I)), so that the time measured is almost all
  solver overhead.

diffusers runs the usual pipeline loop (``set_timesteps``, then one model call and one ``step()``
per timestep, under ``torch.inference_mode``) in VP coordinates with ``prediction_type='sample'``:
the model returns D(x_vp / alpha, s). jdiffsample runs ``jdiffsample.sample`` on ``schedules.VE()``
with the same sigmas, after one compiling call, and waits with ``block_until_ready``.
Solvers: UniPC order 3 (bh2), DPM-Solver++(2M) (midpoint) and SA-Solver (predictor 3, corrector 4,
tau = 0), with each scheduler's default final sigma. The repetitions alternate between the two
libraries; the table gives medians and the speed-up diffusers / jdiffsample. The last column checks
that both sides computed the same thing: max |difference| / max |diffusers|, in float32 (the sharp
mixture amplifies rounding; both sides stay within about 2e-4 of a float64 run). A second table
times the denoiser alone (NFE calls), to show how much of each total it accounts for.

PyTorch runs with one intra-op thread by default (``--torch-threads``): on a busy machine its
thread pool makes small tensor operations one to two orders of magnitude slower, which would
measure contention rather than the schedulers. JAX keeps its defaults.

    python benchmarks/solver_overhead.py [--repeats 10] [--steps 10] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, SASolverScheduler, UniPCMultistepScheduler

import jdiffsample
from jdiffsample import models, schedules

SHAPE = (64, 32, 32, 3)
N_COMPONENTS = 4

# name -> (diffusers scheduler factory, jdiffsample solver, its options)
SOLVERS = {
    "UniPC-3 (bh2)": (
        lambda: UniPCMultistepScheduler(solver_order=3, solver_type="bh2", prediction_type="sample"),
        "unipc", dict(order=3, variant="bh2"),
    ),
    "DPM-Solver++(2M)": (
        lambda: DPMSolverMultistepScheduler(
            solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", prediction_type="sample"
        ),
        "dpmpp", dict(order=2),
    ),
    "SA-Solver (3, 4), tau 0": (
        lambda: SASolverScheduler(
            predictor_order=3, corrector_order=4, tau_func=lambda t: 0, prediction_type="sample"
        ),
        "sa_solver", dict(predictor_order=3, corrector_order=4, tau=0.0),
    ),
}


def torch_mixture_denoiser(mixture: models.GaussianMixture):
    """The torch twin of ``GaussianMixture.denoiser(VE())``: E[x0 | x0 + s eps = x], float32."""
    mu = torch.from_numpy(mixture.means.astype(np.float32))
    var = torch.from_numpy(mixture.variances.astype(np.float32))
    log_w = torch.from_numpy(np.log(mixture.weights).astype(np.float32))

    def denoise(x, s):
        flat = x.reshape(x.shape[0], -1)
        var_t = var + s**2
        diff = flat[:, None, :] - mu[None]
        log_p = -0.5 * torch.sum(diff**2 / var_t + torch.log(var_t), dim=-1) + log_w
        resp = torch.softmax(log_p, dim=-1)
        post = mu[None] + var / var_t * diff
        return torch.einsum("bk,bkd->bd", resp, post).reshape(x.shape)

    return denoise


def denoisers():
    """name -> (JAX denoiser in VE coordinates, torch denoiser D(x_ve, s))."""
    mixture = models.GaussianMixture.random(jax.random.key(0), int(np.prod(SHAPE[1:])), N_COMPONENTS)
    return {
        "mixture": (mixture.denoiser(schedules.VE()), torch_mixture_denoiser(mixture)),
        "trivial": (lambda x, s: x / (1.0 + s**2), lambda x, s: x / (1.0 + s**2)),
    }


def run_diffusers(scheduler, denoise, x_ve, n_steps: int):
    """One pipeline-style sampling loop; returns the final state in VE coordinates."""
    with torch.inference_mode():
        scheduler.set_timesteps(n_steps)
        sigmas = scheduler.sigmas
        alpha = 1.0 / torch.sqrt(1.0 + sigmas**2)
        sample = x_ve * alpha[0]
        for i, timestep in enumerate(scheduler.timesteps):
            x0 = denoise(sample / alpha[i], sigmas[i])
            sample = scheduler.step(x0, timestep, sample).prev_sample
        return sample / alpha[-1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_pair(make_scheduler, solver, options, jax_denoise, torch_denoise, n_steps, repeats):
    """Median seconds of (jdiffsample, diffusers) and the relative difference of their outputs."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(n_steps)
    ts = jnp.asarray(scheduler.sigmas.numpy())
    x_np = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * float(ts[0])
    x_jax, x_torch = jnp.asarray(x_np), torch.from_numpy(x_np)

    def ours():
        return jdiffsample.sample(jax_denoise, x_jax, ts, schedules.VE(), solver=solver, **options).block_until_ready()

    def theirs():
        return run_diffusers(scheduler, torch_denoise, x_torch, n_steps)

    ours(), theirs()  # compile; warm up torch
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        dt, out_ours = timed(ours)
        t_ours.append(dt)
        dt, out_theirs = timed(theirs)
        t_theirs.append(dt)
    ref = out_theirs.numpy()
    rel = float(np.max(np.abs(np.asarray(out_ours) - ref)) / np.max(np.abs(ref)))
    return statistics.median(t_ours), statistics.median(t_theirs), rel


def bench_denoiser(jax_denoise, torch_denoise, n_calls, repeats):
    """Median seconds of ``n_calls`` denoiser calls alone: (JAX jitted, torch)."""
    x_np = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_jax, x_torch = jnp.asarray(x_np), torch.from_numpy(x_np)
    jitted = jax.jit(jax_denoise)
    sigma = torch.tensor(1.0)

    def calls_jax():
        for _ in range(n_calls):
            out = jitted(x_jax, 1.0)
        return out.block_until_ready()

    def calls_torch():
        with torch.inference_mode():
            for _ in range(n_calls):
                out = torch_denoise(x_torch, sigma)
        return out

    calls_jax(), calls_torch()
    t_jax = statistics.median(timed(calls_jax)[0] for _ in range(repeats))
    t_torch = statistics.median(timed(calls_torch)[0] for _ in range(repeats))
    return t_jax, t_torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per measurement (median)")
    parser.add_argument("--steps", type=int, default=10, help="number of steps = NFE")
    parser.add_argument("--torch-threads", type=int, default=1, help="PyTorch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    print(
        f"batch {'x'.join(map(str, SHAPE))}, float32, NFE {args.steps}, median of {args.repeats}; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print("| solver | denoiser | jdiffsample (ms) | diffusers (ms) | speed-up | rel. diff. |")
    print("|---|---|---:|---:|---:|---:|")
    pairs = denoisers()
    for den_name, (jax_denoise, torch_denoise) in pairs.items():
        for name, (make_scheduler, solver, options) in SOLVERS.items():
            t_ours, t_theirs, rel = bench_pair(
                make_scheduler, solver, options, jax_denoise, torch_denoise, args.steps, args.repeats
            )
            print(
                f"| {name} | {den_name} | {1e3 * t_ours:.1f} | {1e3 * t_theirs:.1f} | "
                f"{t_theirs / t_ours:.1f}x | {rel:.1e} |",
                flush=True,
            )

    print(f"\nThe denoiser alone, {args.steps} calls:\n")
    print("| denoiser | JAX jitted (ms) | torch (ms) |")
    print("|---|---:|---:|")
    for den_name, (jax_denoise, torch_denoise) in pairs.items():
        t_jax, t_torch = bench_denoiser(jax_denoise, torch_denoise, args.steps, args.repeats)
        print(f"| {den_name} | {1e3 * t_jax:.1f} | {1e3 * t_torch:.1f} |", flush=True)


if __name__ == "__main__":
    main()

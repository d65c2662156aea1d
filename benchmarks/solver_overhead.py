"""Wall time of one sampling call: jdiffsample (jitted JAX) vs the stepping of diffusers and k-diffusion (PyTorch).

Every side samples a batch of B x 32 x 32 x 3 (B = ``--batch``, default 1, 16 and 64) in float32 with
NFE 10 for DDPM's linear betas, on the sigma grid the diffusers scheduler of the row builds (for
k-diffusion: the one of diffusers' DPM-Solver++, ending at sigma = 0), with the same analytic
denoiser written once in JAX and once in torch:

* ``gaussian``: D(x, s) = x / (1 + s^2), the exact denoiser of data ~ N(0, I), so that the time
  measured is almost all solver: the loop, its coefficients and its memory traffic;
* ``mixture``: the posterior mean of a 4-component Gaussian mixture in dimension 3072 (a few
  elementwise passes over [batch, components, 3072]).

diffusers runs the usual pipeline loop (``set_timesteps``, then one model call and one ``step()``
per timestep, under ``torch.inference_mode``) in VP coordinates with ``prediction_type='sample'``:
the model returns D(x_vp / alpha, s). k-diffusion runs its sampler function on the sigmas, in its
own (VE) coordinates, as ComfyUI and other front ends call it. jdiffsample runs
``jdiffsample.sample`` on ``schedules.VE()`` with the same sigmas, after one compiling call, and
waits with ``block_until_ready``. Each row pairs a jdiffsample solver with the reference that
computes the same method (the last column checks it: max |difference| / max |reference|, float32).

The repetitions alternate between the two sides; the table gives the median times and the speed-up
= the median over the repetitions of reference / jdiffsample (paired, so that it holds while the
machine's speed drifts). Threads: JAX keeps its defaults and PyTorch runs one intra-op thread (on a
busy machine its pool makes small tensor operations one to two orders of magnitude slower, which
would measure contention); ``--cores N`` instead pins the process to N cores and gives PyTorch N
threads, so that both compute on the same cores.

k-diffusion is only a benchmark reference (``pip install --no-deps k-diffusion torchdiffeq torchsde
trampoline``); its sampler module is loaded on its own, without the package's ``__init__`` (which
imports its training code and their dependencies), with a one-line ``append_dims`` for the helper it
takes from ``k_diffusion.utils``.

    python benchmarks/solver_overhead.py [--batch 1,16,64] [--repeats 20] [--steps 10] [--cores N]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes (default 1,16,64)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement (median)")
    parser.add_argument("--steps", type=int, default=10, help="number of steps = NFE")
    parser.add_argument("--cores", type=int, default=None,
                        help="pin the process to this many CPU cores and give PyTorch as many threads (default: "
                             "no pinning, JAX's default threads, PyTorch 1 thread)")
    parser.add_argument("--denoisers", default="gaussian,mixture", help="comma-separated: gaussian, mixture")
    return parser.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if __name__ == "__main__" and ARGS.cores:  # before JAX and PyTorch start their thread pools
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.cores])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, SASolverScheduler, UniPCMultistepScheduler  # noqa: E402

import jdiffsample  # noqa: E402
from jdiffsample import schedules, testing  # noqa: E402

IMAGE = (32, 32, 3)
N_COMPONENTS = 4


def k_diffusion_sampling():
    """k-diffusion's ``sampling`` module, or None where k-diffusion is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    folder = Path(spec.origin).parent
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda a, ndim: a.reshape(a.shape + (1,) * (ndim - a.ndim))
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", folder / "sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def dpm_scheduler(order, **kw):
    return lambda: DPMSolverMultistepScheduler(solver_order=order, algorithm_type="dpmsolver++",
                                               solver_type="midpoint", prediction_type="sample", **kw)


def kdiff_2m(sampling):
    return lambda model, x, sigmas: sampling.sample_dpmpp_2m(model, x, sigmas, disable=True)


def kdiff_3m(sampling):  # eta = 0: the ODE; no Brownian tree (never drawn from)
    return lambda model, x, sigmas: sampling.sample_dpmpp_3m_sde(model, x, sigmas, disable=True, eta=0.0,
                                                                 noise_sampler=lambda *a: None)


def rows(sampling):
    """(name, reference library, reference factory, jdiffsample solver, its options)."""
    out = [
        ("UniPC-3 (bh2)", "diffusers",
         lambda: UniPCMultistepScheduler(solver_order=3, solver_type="bh2", prediction_type="sample"),
         "unipc", dict(order=3, variant="bh2")),
        ("DPM-Solver++(2M)", "diffusers", dpm_scheduler(2), "dpmpp", dict(order=2)),
        ("SA-Solver(3,4), tau 0", "diffusers",
         lambda: SASolverScheduler(predictor_order=3, corrector_order=4, tau_func=lambda t: 0,
                                   prediction_type="sample"),
         # diffusers always uses the rescaled order-2 coefficients of the few-step variant
         "sa_solver", dict(predictor_order=3, corrector_order=4, tau=0.0, few_steps=True)),
    ]
    if sampling is not None:
        out += [
            ("DPM-Solver++(2M)", "k-diffusion", lambda: kdiff_2m(sampling), "dpmpp", dict(order=2)),
            ("DPM-Solver++(3M)", "k-diffusion", lambda: kdiff_3m(sampling), "dpmpp",
             dict(order=3, lower_order_final=False)),
        ]
    return out


def torch_mixture_denoiser(mixture: testing.GaussianMixture):
    """The torch twin of ``GaussianMixture.denoiser(VE())``: E[x0 | x0 + s eps = x], float32."""
    mu = torch.from_numpy(mixture.means.astype(np.float32))
    var = torch.from_numpy(mixture.variances.astype(np.float32))
    log_w = torch.from_numpy(np.log(mixture.weights).astype(np.float32))

    def denoise(x, s):
        flat = x.reshape(x.shape[0], -1)
        s = s.reshape(-1, 1, 1) if torch.is_tensor(s) and s.ndim else s
        var_t = var + s**2
        diff = flat[:, None, :] - mu[None]
        log_p = -0.5 * torch.sum(diff**2 / var_t + torch.log(var_t), dim=-1) + log_w
        resp = torch.softmax(log_p, dim=-1)
        post = mu[None] + var / var_t * diff
        return torch.einsum("bk,bkd->bd", resp, post).reshape(x.shape)

    return denoise


def torch_gaussian(x, s):
    if torch.is_tensor(s) and s.ndim:  # k-diffusion passes one sigma per sample
        s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    return x / (1.0 + s**2)


def denoisers(names):
    """name -> (JAX denoiser in VE coordinates, torch denoiser D(x_ve, s))."""
    out = {}
    if "gaussian" in names:
        out["gaussian"] = (lambda x, s: x / (1.0 + s**2), torch_gaussian)
    if "mixture" in names:
        mixture = testing.GaussianMixture.random(jax.random.key(0), int(np.prod(IMAGE)), N_COMPONENTS)
        out["mixture"] = (mixture.denoiser(schedules.VE()), torch_mixture_denoiser(mixture))
    return out


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


def bench_row(library, make_reference, solver, options, jax_denoise, torch_denoise, batch, n_steps, repeats):
    """Median seconds of (jdiffsample, reference) and the relative difference of their outputs."""
    grid = (make_reference if library == "diffusers" else dpm_scheduler(2))()  # the reference's own grid
    grid.set_timesteps(n_steps)
    sigmas = grid.sigmas.clone()
    ts = jnp.asarray(sigmas.numpy())
    x_np = np.random.default_rng(0).standard_normal((batch, *IMAGE)).astype(np.float32) * float(ts[0])
    x_jax, x_torch = jnp.asarray(x_np), torch.from_numpy(x_np)

    def ours():
        return jdiffsample.sample(jax_denoise, x_jax, ts, schedules.VE(), solver=solver, **options).block_until_ready()

    if library == "diffusers":
        scheduler = make_reference()

        def theirs():
            return run_diffusers(scheduler, torch_denoise, x_torch, n_steps)
    else:
        sampler = make_reference()

        def theirs():
            with torch.inference_mode():
                return sampler(torch_denoise, x_torch, sigmas)

    ours(), theirs()  # compile; warm up torch
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        dt, out_ours = timed(ours)
        t_ours.append(dt)
        dt, out_theirs = timed(theirs)
        t_theirs.append(dt)
    ref = out_theirs.numpy()
    rel = float(np.max(np.abs(np.asarray(out_ours) - ref)) / np.max(np.abs(ref)))
    speed_up = statistics.median(b / a for a, b in zip(t_ours, t_theirs))
    return statistics.median(t_ours), statistics.median(t_theirs), speed_up, rel


def main(args=ARGS):
    torch.set_num_threads(args.cores or 1)
    sampling = k_diffusion_sampling()
    batches = [int(b) for b in args.batch.split(",")]
    print(
        f"batch B x {'x'.join(map(str, IMAGE))}, float32, NFE {args.steps}, median of {args.repeats}; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"k-diffusion {'loaded' if sampling else 'not installed'}\n"
    )
    print("| solver | reference | denoiser | B | jdiffsample (ms) | reference (ms) | speed-up | rel. diff. |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for den_name, (jax_denoise, torch_denoise) in denoisers(args.denoisers.split(",")).items():
        for name, library, make_reference, solver, options in rows(sampling):
            for batch in batches:
                t_ours, t_theirs, speed_up, rel = bench_row(library, make_reference, solver, options, jax_denoise,
                                                  torch_denoise, batch, args.steps, args.repeats)
                print(f"| {name} | {library} | {den_name} | {batch} | {1e3 * t_ours:.2f} | {1e3 * t_theirs:.2f} | "
                      f"{speed_up:.1f}x | {rel:.1e} |", flush=True)


if __name__ == "__main__":
    main()

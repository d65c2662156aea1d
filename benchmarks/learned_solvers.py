"""AMED, EPD and PAS learned and evaluated side by side on noise they were not trained on::

    python benchmarks/learned_solvers.py [--nfe 3,4,5,6,8] [--samples 1000] [--train 32] [--iters 60]
                                         [--part digits,flow] [--teacher-steps 100]

``digits``: the bundled class-conditional digits model (VE, sigma 80 -> 0.002). Each learned solver
is trained per NFE with :func:`jdiffsample.learn_solver.learn_solver` (Adam, ``--iters``
iterations, MSE of the final sample against Heun on ``--teacher-steps`` Karras steps) on
``--train`` noises (seed 1, labels cycling 0-9) on the logSNR grid, and evaluated on ``--samples``
other noises (seed 0, labels cycling 0-9): the RMS error against the ODE reference (Heun, 100
Karras steps to sigma = 0, NFE 199, on the same noises), digits FD and the classifier's accuracy
(on the images quantized to 8 bits as the pipeline writes them), beside untrained baselines on the
same noises. Odd NFE for AMED and EPD use the analytic first step (AFS), as the authors' NFE 3, 5.
Also the teacher MSE on the training noises and on ``--train`` held-out ones (seed 2), before and
after training: overfitting shows as a gap. ``flow``: the same on a 64-dimensional, 8-component
Gaussian mixture as a flow model (``RectifiedFlow(shift=3)``, ``models.from_velocity``), RMS error
only, with learned grids (``learn.learn_timesteps``) beside.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdiffsample
from jdiffsample import learn, metrics, models, nets, schedules, testing, timesteps
from jdiffsample.learn_solver import learn_solver
from jdiffsample.solvers import registry
from jdiffsample.solvers.amed import per_sample_times

LEARNED = {
    "AMED": ("amed", {}),
    "EPD-2": ("epd", dict(points=2)),
    "PAS-4 (iPNDM-3)": ("pas", dict(base="ipndm", order=3, pca=4, relative=True)),
}
BASELINES = {"DDIM": ("ddim", {}), "iPNDM-4": ("ipndm", dict(order=4)), "DPM-Solver++(3M)": ("dpmpp", dict(order=3))}


def options_for(solver, options, nfe):
    info = registry.get(solver)
    if "afs" in info.option_names:
        options = dict(options, afs=nfe % info.calls_per_step == 1)
    steps, _ = info.steps_for_nfe(nfe, zero_end=False, options=options)
    return options, steps


def quantized(x):
    """The pipeline's 8-bit pixels, back in [-1, 1] (level centres)."""
    pixels = np.clip(np.floor(np.asarray(x, np.float64) * 127.5 + 128.0), 0, 255)
    return ((pixels - 127.5) / 127.5).astype(np.float32)


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def table(title, rows, nfes, fmt):
    print(f"\n### {title}\n\n| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(fmt(cells[n]) if n in cells else "-" for n in nfes) + " |")


def digits(args, nfes):
    model = nets.load_model("digits")
    schedule = model.schedule
    shape = (8, 8, 1)
    n_eval, n_train = args.samples, args.train

    def denoiser(n):
        return model.denoiser(labels=jnp.arange(n) % 10)

    start = time.perf_counter()
    noise = jax.random.normal(jax.random.key(0), (n_eval, *shape)) * schedule.t_max
    reference = jdiffsample.sample(denoiser(n_eval), noise, timesteps.karras(schedule, 100, final_zero=True),
                                   schedule, "heun")
    print(f"digits: reference (Heun, NFE 199) on {n_eval} samples in {time.perf_counter() - start:.1f} s", flush=True)
    labels = np.arange(n_eval) % 10
    ref_img = quantized(reference)
    print(f"digits: reference FD {metrics.digits_fd(ref_img):.3f}, accuracy {metrics.digits_accuracy(ref_img, labels):.3f}")
    train = jax.random.normal(jax.random.key(1), (n_train, *shape)) * schedule.t_max
    held = jax.random.normal(jax.random.key(2), (n_train, *shape)) * schedule.t_max
    results = {k: {} for k in ("error", "fd", "accuracy", "seconds", "calls", "fit", "evals")}

    def score(name, nfe, out):
        img = quantized(out)
        results["error"].setdefault(name, {})[nfe] = rms(img, ref_img)
        results["fd"].setdefault(name, {})[nfe] = metrics.digits_fd(img)
        results["accuracy"].setdefault(name, {})[nfe] = metrics.digits_accuracy(img, labels)

    for nfe in nfes:
        ts = timesteps.logsnr(schedule, nfe)
        for name, (solver, options) in BASELINES.items():
            score(f"{name}, logsnr (untrained)", nfe, jdiffsample.sample(denoiser(n_eval), noise, ts, schedule, solver,
                                                                          **options))
        for name, (solver, options) in LEARNED.items():
            options, steps = options_for(solver, options, nfe)
            ts = timesteps.logsnr(schedule, steps)
            result = learn_solver(denoiser(n_train), schedule, solver, train, ts, holdout=held,
                                  teacher_steps=args.teacher_steps, iterations=args.iters, **options)
            out = jdiffsample.sample(denoiser(n_eval), noise, ts, schedule, solver, params=result.params, **options)
            score(name, nfe, out)
            info = registry.get(solver)
            start_params = info.learned.init(steps, info.resolve(options))  # the trained ones' program
            untrained = jdiffsample.sample(denoiser(n_eval), noise, ts, schedule, solver, params=start_params,
                                           **options)
            score(f"{name}, untrained", nfe, untrained)
            results["seconds"].setdefault(name, {})[nfe] = result.seconds
            results["calls"].setdefault(name, {})[nfe] = result.model_calls["total"]
            results["fit"].setdefault(name, {})[nfe] = (result.init_train_error, result.train_error,
                                                       result.init_holdout_error, result.holdout_error)
            results["evals"].setdefault(name, {})[nfe] = (steps, info.evaluations(steps, options=options))
            print(f"digits: {name} NFE {nfe}: {steps} steps, trained in {result.seconds:.1f} s; error "
                  f"{results['error'][name][nfe]:.4f} (untrained {results['error'][name + ', untrained'][nfe]:.4f})",
                  flush=True)
    print(f"\n## digits ({n_eval} evaluation samples, {n_train} training noises, {args.iters} iterations)")
    table("RMS error against the ODE reference (held-out noises)", results["error"], nfes, lambda v: f"{v:.4f}")
    table("Digits FD", results["fd"], nfes, lambda v: f"{v:.2f}")
    table("Classifier accuracy", results["accuracy"], nfes, lambda v: f"{v:.3f}")
    table("Training: seconds", results["seconds"], nfes, lambda v: f"{v:.0f}")
    table("Training: model calls per training sample (teacher + student forward passes)", results["calls"], nfes,
          lambda v: f"{v}")
    table("Teacher MSE, training noises before -> after / held-out noises before -> after", results["fit"], nfes,
          lambda v: f"{v[0]:.3g} -> {v[1]:.3g} / {v[2]:.3g} -> {v[3]:.3g}")
    table("Steps and network evaluations (sequential NFE in the column)", results["evals"], nfes,
          lambda v: f"{v[0]} steps, {v[1]} evals")


def flow(args, nfes):
    schedule = schedules.RectifiedFlow(shift=3.0)
    mixture = testing.GaussianMixture.random(jax.random.key(11), 64, 8)
    denoise = models.from_velocity(mixture.velocity(schedule), schedule)
    noise, train, held = (mixture.sample_marginal(jax.random.key(k), n, schedule.t_max, schedule)
                          for k, n in ((0, args.samples), (1, args.train), (2, args.train)))
    reference = jdiffsample.sample(denoise, noise, timesteps.logsnr(schedule, 400), schedule, "unipc", order=3)
    errors, seconds, fit = {}, {}, {}
    for nfe in nfes:
        ts = timesteps.logsnr(schedule, nfe)
        for name, (solver, options) in {**BASELINES, "UniPC-3": ("unipc", dict(order=3))}.items():
            errors.setdefault(f"{name}, logsnr", {})[nfe] = rms(jdiffsample.sample(denoise, noise, ts, schedule, solver,
                                                                                   **options), reference)
        for name, (solver, options) in {"iPNDM-4": ("ipndm", dict(order=4)), "UniPC-3": ("unipc", dict(order=3))}.items():
            start = time.perf_counter()
            grid = learn.learn_timesteps(denoise, schedule, solver, train, ts, teacher="heun", teacher_steps=args.teacher_steps,
                                            maxiter=20, **options).ts
            seconds.setdefault(f"{name}, learned grid", {})[nfe] = time.perf_counter() - start
            errors.setdefault(f"{name}, learned grid", {})[nfe] = rms(jdiffsample.sample(
                denoise, noise, grid, schedule, solver, **options), reference)
        for name, (solver, options) in {**LEARNED, "AMED-net": ("amed", dict(form="network"))}.items():
            options, steps = options_for(solver, options, nfe)
            ts = timesteps.logsnr(schedule, steps)
            den = per_sample_times(denoise) if options.get("form") == "network" else denoise
            result = learn_solver(den, schedule, solver, train, ts, holdout=held, teacher_steps=args.teacher_steps,
                                  iterations=args.iters, **options)
            seconds.setdefault(name, {})[nfe] = result.seconds
            fit.setdefault(name, {})[nfe] = (result.train_error, result.holdout_error)
            errors.setdefault(name, {})[nfe] = rms(jdiffsample.sample(den, noise, ts, schedule, solver,
                                                                      params=result.params, **options), reference)
            print(f"flow: {name} NFE {nfe}: error {errors[name][nfe]:.4f} ({result.seconds:.1f} s)", flush=True)
    print(f"\n## Gaussian-mixture flow (RectifiedFlow(shift=3), 64-d, {args.samples} evaluation samples)")
    table("RMS error against the ODE reference (UniPC-3, 400 logSNR steps)", errors, nfes, lambda v: f"{v:.4f}")
    table("Training / grid learning: seconds", seconds, nfes, lambda v: f"{v:.1f}")
    table("Teacher MSE after training: training noises / held-out noises", fit, nfes,
          lambda v: f"{v[0]:.3g} / {v[1]:.3g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="3,4,5,6,8")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--part", default="digits,flow")
    args = parser.parse_args()
    nfes = [int(v) for v in args.nfe.split(",")]
    parts = args.part.split(",")
    if "flow" in parts:
        flow(args, nfes)
    if "digits" in parts:
        digits(args, nfes)


if __name__ == "__main__":
    main()

"""Time grids on flow-matching models: the optimized (bound) grid against the shifted uniform grid
the diffusers flow pipelines sample on, at NFE 5-10, by the error against a fine-grid solution from
the same noise.

Two flow models that run here: a Gaussian mixture under ``RectifiedFlow(shift=3)`` (the exact
denoiser: the reference is the true ODE solution up to the fine grid's error), and a converted
Stable Diffusion 3 pipeline folder (``--sd3 DIR``, e.g. the ``sd3_tiny`` fixture converted with
``jdiffsample convert sd3``: its MMDiT with random weights, CFG 4 with a negative prompt)::

    python benchmarks/flow_grids.py --sd3 ckpt/sd3-tiny --samples 64

For each solver (UniPC-2 bh2, DPM-Solver++ 2M) and NFE it prints the RMS error against the
reference for the grids ``shifted`` (the folder scheduler's: uniform in sigma from 1, shift 3),
``optimized`` (the model-free bound of Xue et al. 2024 at the solver's order) and ``logsnr``.
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jdiffsample
from jdiffsample import optimize, pipeline, schedules, testing, timesteps

SOLVERS = (("unipc", dict(order=2, variant="bh2")), ("dpmpp", dict(order=2)))
SD3_SCHEDULER = dict(shift=3.0, num_train_timesteps=1000)


def grids_for(schedule, n: int, order: int) -> dict:
    """The grids of ``--grid diffusers``, ``optimized`` and ``logsnr`` at n steps, as the pipeline
    makes them: the first from t = 1 to 0, the others over the schedule's [t_max, t_min] (lambda is
    infinite at t = 1 and 0)."""
    return dict(shifted=timesteps.flow_match(schedule, n, SD3_SCHEDULER, pipeline="sd3"),
                optimized=optimize.optimize_timesteps(schedule, n, order=order).ts,
                logsnr=timesteps.logsnr(schedule, n))


def mixture_errors(nfes, samples: int) -> dict:
    """``{(solver, nfe, grid): RMS error}`` on a 64-dimensional mixture under RectifiedFlow(shift=3)."""
    schedule = schedules.RectifiedFlow(shift=3.0)  # t_max 0.999, t_min 0.001, as converted SD3 folders
    mixture = testing.GaussianMixture.random(jax.random.key(0), 64, 8, var_range=(0.05, 0.3))
    denoise = mixture.denoiser(schedule)
    x = jax.random.normal(jax.random.key(1), (samples, 64))
    reference = np.asarray(jdiffsample.sample(denoise, x, timesteps.flow_match(schedule, 400, SD3_SCHEDULER,
                                                                               pipeline="sd3"), schedule, "heun"))
    out = {}
    for solver, options in SOLVERS:
        for n in nfes:
            for name, ts in grids_for(schedule, n, 2).items():
                start = x * schedule.prior_std(jnp.float32(ts[0]))  # as the pipeline starts
                y = np.asarray(jdiffsample.sample(denoise, start, jnp.asarray(ts), schedule, solver, **options))
                out[(solver, n, name)] = float(np.sqrt(np.mean((y - reference) ** 2)))
    return out


def sd3_errors(folder, nfes, samples: int) -> dict:
    """The same on a converted SD3 folder's final latents (16 x 16 images, CFG 4, a negative prompt)."""
    base = dict(prompts=("a red cat on a mat", "an astronaut"), negative_prompts=("blurry",), guidance=4.0,
                height=16, width=16, max_sequence_length=8, latents_only=True)

    def latents(**settings):
        plan = pipeline.plan(folder, pipeline.Settings.create(**base, **settings), num=samples)
        return pipeline.Runner(plan, num=samples)(np.arange(samples))[0]

    reference = latents(solver="heun", nfe=399, grid="diffusers")
    schedule = jdiffsample.nets.load_model(folder).schedule
    out = {}
    for solver, options in SOLVERS:
        for n in nfes:
            for name, ts in grids_for(schedule, n, 2).items():
                y = latents(solver=solver, options=options, nfe=n, grid=tuple(ts))
                out[(solver, n, name)] = float(np.sqrt(np.mean((y - reference) ** 2)))
    return out


def table(title: str, errors: dict, nfes) -> str:
    lines = [f"### {title}", "", "| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    for solver, _ in SOLVERS:
        for grid in ("shifted", "optimized", "logsnr"):
            cells = " | ".join(f"{errors[(solver, n, grid)]:.4f}" for n in nfes)
            lines.append(f"| {solver} | {grid} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd3", default=None, help="a converted SD3 folder (optional)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*truncated.*")
    print(table("Gaussian mixture, RectifiedFlow(shift=3), RMS error of x0", mixture_errors(args.nfe, 512),
                args.nfe), flush=True)
    if args.sd3:
        print()
        print(table(f"SD3 ({args.sd3}), RMS error of the final latents", sd3_errors(args.sd3, args.nfe,
                                                                                    args.samples), args.nfe))


if __name__ == "__main__":
    main()

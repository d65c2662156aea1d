"""Every time-grid method by name, for the sampling pipeline and the eval suite.

=============  ================================================================================
``logsnr``     uniform in half-log-SNR (DPM-Solver, UniPC)
``karras``     EDM's sigma^(1/7) ramp
``uniform``    uniform in t
``quadratic``  uniform in sqrt(t)
``optimized``  the model-free error bound of Xue et al. (2024) at the solver's order
``ays``        Align Your Steps' published grid of the model whose noise range this is (n >= 10)
``gits``       GITS (Chen et al. 2024): dynamic programming over a fine grid, costs from warm-up
               trajectories of the model
``learned``    learned through the solver against a fine-grid Heun teacher (mean squared error)
``ld3``        the same with LD3's soft teacher loss (Tong et al. 2025)
=============  ================================================================================

The last three need the model (a denoiser and warm-up noises) and cost model calls: tens for
GITS, hundreds to thousands for learning.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jdiffsample import learn, optimize, timesteps
from jdiffsample.solvers import registry

__all__ = ["NAMES", "NEEDS_MODEL", "make", "ays_model"]

MODEL_FREE = ("logsnr", "karras", "uniform", "quadratic", "optimized", "ays")
NEEDS_MODEL = ("gits", "learned", "ld3")
NAMES = MODEL_FREE + NEEDS_MODEL


def ays_model(schedule) -> str:
    """The published Align Your Steps schedule whose noise range is ``schedule``'s; ``ValueError``."""
    for name in timesteps.AYS_SIGMAS:
        try:
            timesteps.ays(schedule, len(timesteps.AYS_SIGMAS[name]) - 1, model=name)
            return name
        except ValueError:
            continue
    raise ValueError(f"no published Align Your Steps schedule spans {schedule!r}'s noise range (they are for "
                     f"Stable Diffusion 1.5, SDXL and Stable Video Diffusion)")


def make(name: str, schedule, n_steps: int, *, solver: str, options: dict | None = None, denoise=None,
         noise=None, learn_iters: int = 30, teacher_steps: int = 100, log: Callable[[str], None] | None = None
         ) -> np.ndarray:
    """The ``n_steps + 1`` times of grid ``name`` for ``solver`` with ``options``.

    ``denoise`` and ``noise`` (warm-up starting states ``[B, ...]`` at ``schedule.t_max``) are
    needed by :data:`NEEDS_MODEL`; learned grids train ``learn_iters`` iterations against Heun on
    ``teacher_steps`` Karras steps, with the solver's deterministic options.
    """
    info = registry.get(solver)
    options = dict(options or {})
    if name not in NAMES:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(NAMES)}")
    if name in timesteps.GRIDS:
        return np.asarray(timesteps.get(name, schedule, n_steps), np.float64)
    if name == "optimized":
        return np.asarray(optimize.optimize_timesteps(schedule, n_steps, order=info.bound_order(options)).ts, np.float64)
    if name == "ays":
        return timesteps.ays(schedule, n_steps, model=ays_model(schedule))
    if denoise is None or noise is None:
        raise ValueError(f"the {name} grid is found on the model's own trajectories: it needs the model "
                         f"(a denoiser and warm-up noises)")
    if name == "gits":
        return np.asarray(optimize.gits(denoise, schedule, n_steps, noise).ts, np.float64)
    result = learn.learn_timesteps(denoise, schedule, solver, noise, timesteps.logsnr(schedule, n_steps),
                                      teacher="heun", teacher_steps=teacher_steps, maxiter=learn_iters,
                                      loss="mse" if name == "learned" else "ld3", **info.deterministic(options))
    if log is not None:
        log(f"learned a {n_steps}-step grid ({name}) for {info.label(options)}: mse {result.init_train_error:.3g} "
            f"-> {result.train_error:.3g}")
    return np.asarray(result.ts, np.float64)

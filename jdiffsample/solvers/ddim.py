"""DDIM (Song et al., 2021): the first-order exponential integrator, with optional noise eta.

NFE = N for a grid of N steps. eta = 0 is the probability-flow ODE step (identical to Euler on the
EDM ODE); eta = 1 is DDPM's ancestral sampler. DDIM(eta) is the order-1 step of the shared core with
the per-step stochasticity tau^2 chosen so that e^{-2 tau^2 h} = 1 - eta^2 (1 - e^{-2h}), which gives
exactly DDIM's mean and noise.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Option, register


@register("ddim", label="DDIM", order=1, needs_key=lambda o: o["eta"] > 0, ode_options=dict(eta=0.0),
          options=[Option("eta", float, "noise: 0 the ODE, 1 DDPM's ancestral sampler", low=0.0, high=1.0)])
def ddim(denoise, x, ts, schedule, *, eta: float = 0.0, key=None, return_trajectory: bool = False):
    """Sample with DDIM. ``eta`` in [0, 1]; ``eta > 0`` needs ``key``."""
    core.validate(x, ts, schedule, key=key, needs_key=eta > 0)
    n_steps = len(ts) - 1
    plan = core.Plan(pred_order=(1,) * n_steps, corr_order=(0,) * n_steps)
    tau_sq = first_decay = None
    if eta > 0:
        lams = core.grid_values(ts, schedule, x.dtype).lam
        h = lams[1:] - lams[:-1]
        tau_sq = -jnp.log1p(eta**2 * jnp.expm1(-2.0 * h)) / (2.0 * h)
        first_decay = (1.0 - eta**2) ** 0.5  # e^{-tau^2 h} of a first step from alpha = 0 (h = inf)
    return core.multistep(denoise, x, ts, schedule, plan, tau_sq, key=key, return_trajectory=return_trajectory,
                          first_decay=first_decay)

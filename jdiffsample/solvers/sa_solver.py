"""SA-Solver (Xue et al., NeurIPS 2023): stochastic Adams predictor-corrector. NFE = N.

The SA-Predictor of order p (1-4) and SA-Corrector of order c (1-4) are the exponential Adams
methods of the core applied to the variance-controlled reverse SDE: tau = 0 is the probability-flow
ODE, tau = 1 the reverse SDE. One model call per step, at the predicted point (PEC); the corrector
reuses the predictor's Gaussian draw. Orders warm up and fall off as in the official code and
diffusers (``lower_order_final``); the last step is a predictor step with no corrector.

``few_steps=True`` is the official few-step mode: at order 2 both the predictor and the corrector
use the paper's rescaled coefficients (UniPC's bh1 shortcut, generalised to tau > 0, as diffusers
always does), and tau is 0 on the last step.

``tau`` is a constant or a function of t evaluated at each step's target time. The default is the
paper's: 1 in the middle of the trajectory and 0 elsewhere, the middle being 0.2 <= t <= 0.8 for VP
schedules on [0, 1] and EDM's window 0.05 <= sigma <= 50 for ``VE``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Option, register


def default_tau(schedule):
    """The paper's default tau(t) for ``schedule`` (see the module docstring)."""
    lo, hi = (0.05, 50.0) if schedule.is_ve else (0.2, 0.8)
    return lambda t: jnp.where((t >= lo) & (t <= hi), 1.0, 0.0)


def _deterministic(options) -> bool:
    tau = options["tau"]
    return tau is not None and not callable(tau) and float(tau) == 0.0


@register(
    "sa_solver", label=lambda o: f"SA-Solver({o['predictor_order']},{o['corrector_order']})",
    order=lambda o: o["predictor_order"], needs_key=lambda o: not _deterministic(o), ode_options=dict(tau=0.0),
    options=[
        Option("predictor_order", int, "SA-Predictor order", choices=(1, 2, 3, 4), flag="order"),
        Option("corrector_order", int, "SA-Corrector order", choices=(1, 2, 3, 4)),
        Option("tau", float, "stochasticity, constant (default: the paper's tau(t))", low=0.0, function_ok=True),
        Option("few_steps", bool, "the official few-step coefficients and tau = 0 on the last step"),
        Option("lower_order_final", bool, "lower orders on the last steps"),
    ])
def sa_solver(
    denoise, x, ts, schedule, *, predictor_order: int = 3, corrector_order: int = 4, tau=None,
    few_steps: bool = True, lower_order_final: bool = True, key=None, return_trajectory: bool = False,
):
    """Sample with SA-Solver. Needs ``key`` unless ``tau`` is the constant 0."""
    p_max, c_max = predictor_order, corrector_order
    deterministic = _deterministic(dict(tau=tau))
    tau = default_tau(schedule) if tau is None else tau
    core.validate(x, ts, schedule, key=key, needs_key=not deterministic)
    n_steps = len(ts) - 1
    preds = core.lower_order_schedule(p_max, n_steps, lower_order_final)
    corrs = core.lower_order_schedule(c_max, n_steps, lower_order_final, warmup_extra=1)
    corrs = tuple(c if k < n_steps - 1 else 0 for k, c in enumerate(corrs))
    shortcut = "bh1" if few_steps else "exact"
    plan = core.Plan(tuple(preds), corrs, pred_shortcut=shortcut, corr_shortcut=shortcut)
    tau_sq = None
    if not deterministic:
        tau_sq = core.resolve_tau(tau, ts, x.dtype)
        if few_steps:
            tau_sq = tau_sq.at[-1].set(0.0)
    return core.multistep(denoise, x, ts, schedule, plan, tau_sq, key=key, return_trajectory=return_trajectory)

"""iPNDM (Zhang & Chen, 2023): Adams-Bashforth in rho = sigma / alpha with lower-order warm-up. NFE = N.

A linear multistep method on the probability-flow ODE in the EDM coordinates, d(x / alpha) / d rho =
eps: x_t / alpha_t = x_s / alpha_s + (rho_t - rho_s) sum_j c_j E_j with the classical fixed
coefficients c of equal steps (order 1: [1]; 2: [3, -1] / 2; 3: [23, -16, 5] / 12; 4: [55, -59, 37,
-9] / 24) and orders min(k + 1, ``order``) (the "improved" warm-up that replaces PNDM's Runge-Kutta
start). This is diffusers' ``IPNDMScheduler`` (order 4) and the DEIS / diff-sampler ``ipndm``; in
the EDM variables x_hat = x / alpha, s = rho it reads x_hat' = x_hat + (s' - s) sum_j c_j d_j with
d = (x_hat - D) / s. Two differences of definition from diffusers' scheduler, whose own grid runs
from alpha = 0 to sigma = 0: every time here has alpha > 0 (rho finite), and a last step into
sigma = 0 returns the data prediction, as every solver of this package does (and ComfyUI's
``sample_ipndm``), where diffusers takes a full-order step to rho = 0. On any grid that ends at
sigma > 0 the two agree.

The fixed coefficients are exact on grids uniform in rho only; on other grids the method is
second-order accurate at best. ``variable_step=True`` uses the Adams coefficients of the actual steps
(iPNDM_v, = DEIS rhoAB without lower final orders).
"""

from __future__ import annotations

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Option, register


@register(
    "ipndm", label=lambda o: f"iPNDM{'_v' if o['variable_step'] else ''}-{o['order']}", order=lambda o: o["order"],
    options=[
        Option("order", int, "maximum Adams-Bashforth order", choices=(1, 2, 3, 4)),
        Option("variable_step", bool, "coefficients of the actual unequal steps (iPNDM_v)"),
    ])
def ipndm(
    denoise, x, ts, schedule, *, order: int = 4, variable_step: bool = False, key=None,
    return_trajectory: bool = False,
):
    """Sample with iPNDM of maximum order ``order`` (1-4)."""
    core.validate(x, ts, schedule, key=key)
    n_steps = len(ts) - 1
    preds = core.lower_order_schedule(order, n_steps, False)
    plan = core.Plan(tuple(preds), (0,) * n_steps, prediction="noise", variable="rho", equal_steps=not variable_step)
    return core.multistep(denoise, x, ts, schedule, plan, key=key, return_trajectory=return_trajectory)

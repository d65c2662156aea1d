"""DEIS (Zhang & Chen, ICLR 2023): the exponential integrator on noise predictions. NFE = N.

DEIS integrates the probability-flow ODE exactly in its linear part, x_t / alpha_t = x_s / alpha_s +
int eps d rho (rho = sigma / alpha), and extrapolates the noise predictions E_j = (x_j - alpha_j X_j) /
sigma_j of the last ``order`` steps by a polynomial (Adams-Bashforth). The variants differ in the
variable of that polynomial (see the core for the weights):

* ``'tab'`` (the paper's tAB): a polynomial in the schedule's time t, integrated against the exact
  kernel by quadrature (32 Gauss-Legendre points in lambda; DEIS's code sums 10,000). On ``VE``
  (t = sigma = rho) it is rhoAB; diff-sampler maps EDM sigmas to VP-linear times first, as sampling
  the same grid on ``VPLinear`` here does.
* ``'rhoab'``: a polynomial in rho itself, a plain variable-step Adams method in rho (= iPNDM_v,
  ``ipndm(variable_step=True)``, up to the order cap and the final steps).
* ``'logrho'``: a polynomial in log rho = -lambda, the exact noise-prediction exponential Adams
  method. This is diffusers' ``DEISMultistepScheduler`` (``algorithm_type='deis'``,
  ``solver_type='logrho'``, its only kind), whose closed-form orders 2 and 3 equal these weights.

All are of order ``order`` (the paper's eps-form); order 1 is DDIM. The data-prediction counterpart
of 'logrho', the exact exponential Adams method on X, is ``dpmpp(exact=True)``. Orders warm up as
1, 2, ... and, with ``lower_order_final`` and fewer than 15 steps, drop to 2 and 1 on the last two
steps, as diffusers does. A last step into sigma = 0 returns the data prediction.
"""

from __future__ import annotations

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Option, register

VARIANTS = {"tab": "t", "rhoab": "rho", "logrho": "lambda"}


@register(
    "deis", label=lambda o: f"DEIS-{o['variant']}{o['order']}", order=lambda o: o["order"],
    options=[
        Option("order", int, "Adams-Bashforth order", choices=(1, 2, 3)),
        Option("variant", str, "polynomial in t (tab), rho (rhoab) or log rho (logrho, diffusers)",
               choices=tuple(VARIANTS)),
        Option("lower_order_final", bool, "lower orders on the last steps when N < 15"),
    ])
def deis(
    denoise, x, ts, schedule, *, order: int = 3, variant: str = "tab", lower_order_final: bool = True,
    key=None, return_trajectory: bool = False,
):
    """Sample with DEIS-``variant`` of order ``order`` (1-3)."""
    core.validate(x, ts, schedule, key=key)
    n_steps = len(ts) - 1
    preds = core.lower_order_schedule(order, n_steps, lower_order_final and n_steps < 15)
    plan = core.Plan(tuple(preds), (0,) * n_steps, prediction="noise", variable=VARIANTS[variant])
    return core.multistep(denoise, x, ts, schedule, plan, key=key, return_trajectory=return_trajectory)

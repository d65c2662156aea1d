"""DPM-Solver++ multistep (Lu et al., 2022): 2M and 3M, data prediction. NFE = N.

Order 2 is the "midpoint" 2M of diffusers and k-diffusion (UniPC's bh2 shortcut); order 3 is the
3M those libraries and the original code compute, whose second-difference term carries half the
exact weight (so it is second order; see the core). ``exact=True`` uses the exact exponential
Adams-Bashforth weights instead (2M "heun" and a true AB3).

Orders warm up as 1, 2, ... and, with ``lower_order_final`` and fewer than 15 steps, drop back to
2 and 1 on the last steps, as diffusers does. ``eta > 0`` gives the SDE variant (k-diffusion's
``dpmpp_2m_sde`` / ``dpmpp_3m_sde`` convention: tau^2 = eta) and needs ``key``.
"""

from __future__ import annotations

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Option, register


@register(
    "dpmpp", label=lambda o: f"DPM-Solver++({o['order']}M)" if o["order"] > 1 else "DPM-Solver++(1)",
    order=lambda o: o["order"], needs_key=lambda o: o["eta"] > 0,
    ode_options=dict(eta=0.0),
    options=[
        Option("order", int, "2 (2M) or 3 (3M); 1 is DDIM", choices=(1, 2, 3)),
        Option("exact", bool, "exact exponential Adams weights instead of the usual 2M/3M"),
        Option("lower_order_final", bool, "lower orders on the last steps when N < 15"),
        Option("eta", float, "SDE noise (k-diffusion's dpmpp_2m_sde convention)", low=0.0),
    ])
def dpmpp(
    denoise, x, ts, schedule, *, order: int = 2, exact: bool = False, lower_order_final: bool = True,
    eta: float = 0.0, key=None, return_trajectory: bool = False,
):
    """Sample with DPM-Solver++(2M) (``order=2``) or (3M) (``order=3``); ``order=1`` is DDIM."""
    core.validate(x, ts, schedule, key=key, needs_key=eta > 0)
    n_steps = len(ts) - 1
    preds = core.lower_order_schedule(order, n_steps, lower_order_final and n_steps < 15)
    plan = core.Plan(
        pred_order=tuple(preds), corr_order=(0,) * n_steps,
        pred_shortcut="exact" if exact else "bh2", halve_g2=not exact,
    )
    tau_sq = core.resolve_tau(eta**0.5, ts, x.dtype) if eta > 0 else None
    return core.multistep(denoise, x, ts, schedule, plan, tau_sq, key=key, return_trajectory=return_trajectory)

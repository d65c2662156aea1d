"""UniPC (Zhao et al., 2023): unified predictor-corrector, data prediction. NFE = N.

UniP-p predicts with p nodes; UniC-p then corrects with the model output at the predicted point plus
those nodes, raising the order to p + 1 at no extra model call (the output is reused as history).
Whenever the linear system is solved in full, UniPC is the exact exponential Adams method; the
variants differ only through the rho = 1/2 shortcut of UniP-2 and UniC-1, with B(h) = h (``'bh1'``,
the paper's code default) or B(h) = e^h - 1 (``'bh2'``, diffusers' default).

Orders warm up as 1, 2, ..., and with ``lower_order_final`` fall to N - k on the last steps. The
last step has no corrector (it would need one more model call).
"""

from __future__ import annotations

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Option, register

VARIANTS = ("bh1", "bh2")


@register(
    "unipc", label=lambda o: f"UniPC-{o['order']}", order=lambda o: o["order"],
    options=[
        Option("order", int, "predictor order (the corrector adds one)", choices=(1, 2, 3)),
        Option("variant", str, "B(h) of the order-2 shortcut: bh1 (B = h) or bh2 (B = e^h - 1)", choices=VARIANTS),
        Option("lower_order_final", bool, "lower orders on the last steps"),
        Option("corrector", bool, "apply the corrector (UniC)"),
        Option("disable_corrector", tuple, "step indices whose corrector is skipped"),
    ])
def unipc(
    denoise, x, ts, schedule, *, order: int = 3, variant: str = "bh1", lower_order_final: bool = True,
    corrector: bool = True, disable_corrector=(), key=None, return_trajectory: bool = False,
):
    """Sample with UniPC-``order`` (1-3). ``disable_corrector``: step indices whose corrector is skipped."""
    core.validate(x, ts, schedule, key=key)
    n_steps = len(ts) - 1
    preds = core.lower_order_schedule(order, n_steps, lower_order_final)
    skip = set(disable_corrector)
    corrs = tuple(
        p + 1 if corrector and k < n_steps - 1 and k not in skip else 0 for k, p in enumerate(preds)
    )
    plan = core.Plan(tuple(preds), corrs, pred_shortcut=variant, corr_shortcut=variant)
    return core.multistep(denoise, x, ts, schedule, plan, None, key=key, return_trajectory=return_trajectory)

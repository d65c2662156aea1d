"""Optimized time steps: the model-free error bound of Xue et al. (CVPR 2024), and GITS.

Three ways to choose the N + 1 times of a few-step sampler (the second lives in :mod:`jdiffsample.learn`):

* ``optimize_timesteps`` minimizes ``surrogate_objective``, the bound of "Accelerating Diffusion
  Sampling with Optimized Time Steps" (Xue et al., 2024) on the discretization error of an explicit
  multistep data-prediction solver. It depends only on the grid's half-log-SNR values lambda, the
  solver order and the error weights sigma^p / alpha, never on a network: tens of milliseconds
  on a CPU once compiled.
* ``learn_timesteps`` minimizes the measured distance between a few-step solver and a teacher
  solution over a batch of starting noises, by differentiating through the solver's ``lax.scan``
  (``loss='ld3'``: LD3's soft teacher loss, Tong et al., ICLR 2025).
* ``gits`` (Chen et al., ICML 2024) picks a subset of a fine grid by dynamic programming on the
  local errors of Euler steps along the model's own trajectories (forward passes only).

The first two optimize over the lambda gaps of the grid with the endpoints fixed: the gaps minus a minimum
gap live on a scaled simplex, and a projected-gradient method (``pg_run``: the method of
``jaxopt.ProjectedGradient`` without acceleration, in a few lines of ``lax``) keeps every iterate a
valid, strictly monotone grid.

The bound. Between nodes lambda_s < lambda_{s+1} a multistep solver of order k replaces the data
prediction f by its Lagrange interpolant through the k latest nodes and integrates it exactly
against e^lambda, so the final state is a weighted sum of the network outputs,
sum_s sum_j w_{s,j} f(lambda_{s-k+1+j}), with sum_j w_{s,j} = e^{lambda_{s+1}} - e^{lambda_s}. Writing
each output as the data plus an error of size err_i = sigma_i^p / alpha_i, the data part telescopes
and the error part is bounded by sum_i err_i |C_i|, C_i the total weight node i receives (the
paper's objective, ``paper=True``). The authors' code (``step_optim.py``, the "reference") departs
from that: the first and last steps (order 1) are separate absolute terms, and the steps
s < ``trunc`` are combined as a root-sum-of-squares of their per-node terms instead of entering
C_i. That is the default here.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import timesteps, xla_options
from jdiffsample.schedules import RectifiedFlow, Schedule, float64
from jdiffsample.solvers import combine, core, partition, registry, sample

__all__ = [
    "default_trunc",
    "error_weights",
    "surrogate_objective",
    "StepOptimResult",
    "optimize_timesteps",
    "project_simplex",
    "pg_start",
    "pg_run",
    "grid_lams",
    "grid_ts",
    "check_min_gap",
    "GitsResult",
    "gits",
    "gits_costs",
    "gits_dp",
]


# --------------------------------------------------------------------------------------------
# The bound


def default_trunc(n_steps: int) -> int:
    """The authors' advice for ``trunc``: 3 for NFE <= 6, else 0.

    From the author's answer in DM-NonUniform issue #3 ("truncnum = 3 for NFEs = 5, 6; truncnum = 0
    for NFEs >= 7"). The comment in ``step_optim.py`` and LD3's port use NFE <= 7 instead; pass
    ``trunc`` explicitly for that.
    """
    return 3 if n_steps <= 6 else 0


def _family(schedule: Optional[Schedule]) -> str:
    """'vp', 've' or 'flow': the family that fixes alpha as a function of lambda."""
    if schedule is None:
        return "vp"
    if schedule.is_ve:
        return "ve"
    return "flow" if isinstance(schedule, RectifiedFlow) else "vp"


def _error_weights(lams, p, family: str):
    if family == "ve":
        return jnp.exp(-p * lams)
    if family == "flow":
        log_alpha = -jnp.logaddexp(0.0, -lams)
    else:
        log_alpha = -0.5 * jnp.logaddexp(0.0, -2.0 * lams)
    return jnp.exp((p - 1.0) * log_alpha - p * lams)


def error_weights(lams, p: float = 1, schedule: Optional[Schedule] = None):
    """The per-node error sizes sigma^p / alpha as a function of lambda.

    sigma = alpha e^{-lambda} always; alpha(lambda) depends only on the schedule's family.
    ``schedule=None`` or any VP schedule: alpha^2 = sigmoid(2 lambda) (the same for every VP
    schedule). A VE schedule: alpha = 1, so the weight is e^{-p lambda}. A flow
    (``RectifiedFlow``, any shift): alpha + sigma = 1, alpha = sigmoid(lambda). For p = 1 all three
    are e^{-lambda} (the reference code uses the VP form for EDM too); for p = 2 the weight is
    alpha e^{-2 lambda}, with the same limits e^{-lambda} (noise end) and e^{-2 lambda} (data end)
    for VP and flows, the flow's a little lower in between (sigmoid(lambda)^2 < sigmoid(2 lambda)).
    """
    return _error_weights(jnp.asarray(lams), p, _family(schedule))


def _step_plan(n_steps: int, order: int, trunc: int, paper: bool):
    """Static per-step masks: orders k_s, and how each step's terms enter the bound.

    Returns (orders [N], separate [N], rss [N]); steps that are neither accumulate into C.
    """
    orders = np.asarray(core.lower_order_schedule(order, n_steps, True))
    steps = np.arange(n_steps)
    if paper:
        separate = np.zeros(n_steps, bool)
        rss = np.zeros(n_steps, bool)
    else:
        separate = (steps == 0) | (steps == n_steps - 1)
        rss = ~separate & (steps < trunc)
    return orders, separate, rss


def _lagrange_weights(lams, orders):
    """w[s, j]: weight of node s - 2 + j in step s (j = 0, 1, 2; right-aligned, zero if unused).

    Exact integrals of e^lambda times the Lagrange basis over [lambda_s, lambda_{s+1}], in terms of
    H_m(h) = int_0^h u^m e^u du, with a, b, c the gaps h_{s-2}, h_{s-1}, h_s.
    """
    n = lams.shape[0] - 1
    h = jnp.diff(lams)
    pad = jnp.ones((2,), h.dtype)  # stand-in gaps before the first node (masked out below)
    hp = jnp.concatenate([pad, h])
    a, b, c = hp[:n], hp[1 : n + 1], hp[2:]
    e = jnp.exp(lams[:-1])
    h0 = jnp.expm1(c)
    h1 = c * jnp.exp(c) - h0
    h2 = c * c * jnp.exp(c) - 2.0 * h1
    zero = jnp.zeros_like(c)
    w1 = jnp.stack([zero, zero, e * h0], axis=1)
    w2 = jnp.stack([zero, -e * h1 / b, e * (h1 + b * h0) / b], axis=1)
    w3 = jnp.stack(
        [
            e * (h2 + b * h1) / (a * (a + b)),
            -e * (h2 + (a + b) * h1) / (a * b),
            e * (h2 + (2.0 * b + a) * h1 + b * (a + b) * h0) / (b * (a + b)),
        ],
        axis=1,
    )
    k = jnp.asarray(orders)[:, None]
    return jnp.where(k == 1, w1, jnp.where(k == 2, w2, w3))


def _objective(lams, order, p, trunc, paper, family, delta):
    """The bound with |x| replaced by sqrt(x^2 + delta^2) (exact for ``delta = 0``); static config."""
    n = lams.shape[0] - 1
    orders, separate, rss = _step_plan(n, order, trunc, paper)
    w = _lagrange_weights(lams, orders)
    node = np.clip(np.arange(n)[:, None] - 2 + np.arange(3)[None, :], 0, None)
    used = np.arange(3)[None, :] >= 3 - orders[:, None]  # [N, 3]: the nodes each step uses
    terms = _error_weights(lams[:-1], p, family)[node] * w  # [N, 3]
    accumulate = ~separate & ~rss

    def smooth_abs(x, mask):  # masked first, so unused entries give no NaN gradient at delta = 0
        return jnp.where(mask, jnp.sqrt(jnp.square(jnp.where(mask, x, 1.0)) + delta**2), 0.0)

    totals = jnp.zeros((n,), terms.dtype).at[node].add(jnp.where(accumulate[:, None] & used, terms, 0.0))
    in_totals = np.zeros(n, bool)
    in_totals[node[accumulate[:, None] & used]] = True
    sep = jnp.sum(smooth_abs(terms, separate[:, None] & used))
    rss_sq = jnp.sum(jnp.square(jnp.where(rss[:, None], terms, 1.0)), axis=1)
    rss_sum = jnp.sum(jnp.where(rss, jnp.sqrt(rss_sq), 0.0))
    return sep + rss_sum + jnp.sum(smooth_abs(totals, in_totals))


def _check_trunc(n_steps, trunc, paper):
    if paper and trunc is not None:
        raise ValueError("trunc applies to the reference formulation only, not to paper=True")
    trunc = default_trunc(n_steps) if trunc is None else trunc
    if int(trunc) != trunc or trunc < 0:
        raise ValueError(f"trunc must be a non-negative integer, got {trunc!r}")
    return int(trunc)


def surrogate_objective(
    lams, *, order: int = 3, p: float = 1, trunc: Optional[int] = None, paper: bool = False,
    schedule: Optional[Schedule] = None,
):
    """The time-step-dependent part of the error bound of Xue et al. (2024), in ``jnp`` (differentiable).

    ``lams``: the N + 1 half-log-SNR values of the grid, increasing (from noise to data). ``order``:
    the solver order (1, 2 or 3), run with warm-up and ``lower_order_final`` (orders 1, 2, 3, ..., 3,
    2, 1). ``p``: the error weight sigma^p / alpha (1 for pixel, 2 for latent models; computed for
    ``schedule``, VP when None, see ``error_weights``).

    Default: the authors' code. The first and last steps are separate |w err| terms; the middle steps
    s < ``trunc`` (default ``default_trunc(N)``) add sqrt(sum_j (w_j err_j)^2); the other steps add
    w err into per-node totals C_i, and sum_i |C_i| is added. ``paper=True`` is the paper's equation:
    every step goes into C (``trunc`` must then be None).
    """
    order = core.check_order("order", order, 1, 3)
    lams = jnp.asarray(lams)
    if lams.ndim != 1 or lams.shape[0] < 2:
        raise ValueError(f"lams must be a 1-D array of at least 2 values, got shape {lams.shape}")
    trunc = _check_trunc(lams.shape[0] - 1, trunc, paper)
    return _objective(lams, order, p, trunc, paper, _family(schedule), 0.0)


# --------------------------------------------------------------------------------------------
# Projected gradient with backtracking (jaxopt.ProjectedGradient's method, acceleration off)
#
# Written out here rather than taken from jaxopt, for a small compiled program: jaxopt with
# implicit_diff=False unrolls its loops into scans of maxiter and maxls steps of lax.cond (every
# step runs, as a no-op after convergence), traces its first update twice and evaluates the loss
# apart from its gradient in the line search. Compiling that for the bound took seconds, most of
# a cold ``jdiffsample steps``, and importing jaxopt (with the SciPy it pulls in) 0.4 s more.
# Here the loss and its gradient are evaluated at one place in the program, once per trial point:
# an accepted trial point's loss and gradient are those the next iteration needs.

_MAX_HALVINGS = 15  # backtracking steps per iteration at most (jaxopt's maxls)


def project_simplex(v, total):
    """Euclidean projection of a vector onto {x >= 0, sum(x) = total} (sort and threshold)."""
    u = jnp.sort(v)[::-1]
    excess = jnp.cumsum(u) - total
    k = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
    n_pos = jnp.count_nonzero(u - excess / k > 0)  # the support size of the projection
    return jnp.maximum(v - excess[n_pos - 1] / n_pos, 0.0)


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


class PGState(NamedTuple):
    """x: the iterate, f and g the loss and gradient there; y: the trial point, tried with stepsize s
    after k halvings; fresh: y = x is to be evaluated (a start, no step); it: accepted iterations;
    error: ||x - x_previous|| / (the next stepsize), the stopping criterion."""

    x: Any
    f: jax.Array
    g: Any
    y: Any
    s: jax.Array
    k: jax.Array
    fresh: jax.Array
    it: jax.Array
    error: jax.Array


def pg_start(x, dtype) -> PGState:
    """A state that evaluates the loss at ``x`` and then steps from stepsize 1."""
    one = jnp.ones((), dtype)
    return PGState(x, jnp.inf * one, x, x, one, jnp.asarray(0), jnp.asarray(True), jnp.asarray(0), jnp.inf * one)


def pg_run(value_and_grad, project, state: PGState, stop_at, tol) -> PGState:
    """Projected-gradient iterations until ``state.it`` reaches ``stop_at`` or the criterion is <= ``tol``.

    Each iteration: x' = project(x - s g), with s halved from the stepsize (at most ``_MAX_HALVINGS``
    times) until the sufficient decrease s (f(x') - f) <= s <g, x' - x> + ||x' - x||^2 / 2 (+ the
    dtype's epsilon) holds; the next one tries 2 s (1 after s fell to 1e-6). One loop step evaluates
    ``value_and_grad`` at one trial point. ``x`` may be a pytree; ``project`` maps onto the feasible set.
    """
    tree_map = jax.tree_util.tree_map

    def pick(c, a, b):
        return tree_map(lambda u, v: jnp.where(c, u, v), a, b)

    def running(st):
        return st.fresh | ((st.it < stop_at) & (st.error > tol))

    def step(st):
        fy, gy = value_and_grad(st.y)
        d = tree_map(jnp.subtract, st.y, st.x)
        eps = jnp.finfo(fy.dtype).eps
        decrease = st.s * (fy - st.f) <= st.s * _tree_dot(d, st.g) + 0.5 * _tree_dot(d, d) + eps
        accept = ~st.fresh & (decrease | (st.k >= _MAX_HALVINGS))
        halve = ~st.fresh & ~accept
        s = jnp.where(accept, jnp.where(st.s <= 1e-6, jnp.ones_like(st.s), 2.0 * st.s), st.s)
        s = jnp.where(halve, 0.5 * st.s, s)
        x, f, g = pick(halve, (st.x, st.f, st.g), (st.y, fy, gy))
        return PGState(
            x=x, f=f, g=g, y=project(tree_map(lambda a, b: a - s * b, x, g)), s=s,
            k=jnp.where(halve, st.k + 1, 0), fresh=jnp.asarray(False), it=st.it + accept,
            error=jnp.where(accept, jnp.sqrt(_tree_dot(d, d)) / s, st.error),
        )

    return jax.lax.while_loop(running, step, state)


# --------------------------------------------------------------------------------------------
# Minimizing the bound


# Continuation in the smoothing delta, relative to the mean term of the bound at the initial grid;
# the last stage is exact.
_SMOOTHING = (10.0, 1.0, 1e-1, 1e-2, 1e-4, 0.0)


@dataclasses.dataclass(frozen=True)
class StepOptimResult:
    """An optimized grid: ``ts`` (N + 1 decreasing times, endpoints exact), its ``lams`` (increasing),
    the bound at the optimum and at the initial grid, and the iterations used."""

    ts: np.ndarray
    lams: np.ndarray
    objective: float
    init_objective: float
    iterations: int


# The bound's programs work on N + 1 scalars but have about a hundred small kernels, and XLA's CPU
# backend spent most of a cold ``jdiffsample steps`` compiling them (about 1.5 s of CPU; evaluated
# op by op, the grid conversions compiled each operation apart, about 0.5 s more). Without LLVM
# optimization and with XLA's elemental emitters instead of its fusion emitters they compile 4-5x
# faster and run in tens of milliseconds instead of about 20: the right trade for programs run once
# per process. The options change only how kernels are generated, not the operations (IEEE float64
# either way); the optimum moves by rounding only. They run on the CPU whatever the default device:
# on a GPU each of the ~1500 loop steps would be kernel launches and a host sync.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@functools.lru_cache(maxsize=None)
def _jit(fun, static_argnames, fast: bool):
    return jax.jit(fun, static_argnames=static_argnames, compiler_options=_FAST_COMPILE if fast else None)


def _on_cpu(fun, static_argnames: tuple, args: tuple, **static):
    """``fun(*args, **static)`` compiled with ``_FAST_COMPILE`` (as usual where XLA lacks those
    options) on the CPU, in float64."""
    with float64():
        args = jax.device_put(tuple(np.asarray(a, np.float64) for a in args), jax.local_devices(backend="cpu")[0])
        return _jit(fun, static_argnames, xla_options.accepted(_FAST_COMPILE))(*args, **static)


def _schedule_map(values, *, schedule, method):
    return getattr(schedule, method)(values)


def grid_lams(schedule, ts):
    return np.asarray(_on_cpu(_schedule_map, ("schedule", "method"), (ts,), schedule=schedule, method="lam"),
                      np.float64)


def check_min_gap(min_gap, lams) -> None:
    """``min_gap`` must leave room for ``len(lams) - 1`` gaps within the grid's lambda span."""
    n = len(lams) - 1
    span = lams[-1] - lams[0]
    if not 0 < min_gap < span / n:
        raise ValueError(f"min_gap must lie in (0, {span / n:.4g}) (the lambda span over the steps), "
                         f"got {min_gap}")


def grid_ts(schedule, lams, t_start, t_end):
    ts = np.array(_on_cpu(_schedule_map, ("schedule", "method"), (lams,), schedule=schedule, method="t_from_lam"),
                  np.float64)
    ts[0], ts[-1] = t_start, t_end
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"the optimized grid is not strictly decreasing in t: {ts}; increase min_gap")
    return ts


def _jaxopt_run(loss, project, free, maxiter, tol):
    """``(x, iterations)`` of ``jaxopt.ProjectedGradient`` (acceleration off) from ``free``."""
    with warnings.catch_warnings():  # jaxopt is unmaintained and says so on import
        warnings.simplefilter("ignore")
        import jaxopt

    solver = jaxopt.ProjectedGradient(fun=loss, projection=lambda x, _: project(x), maxiter=maxiter, tol=tol,
                                      acceleration=False, implicit_diff=False)
    out = solver.run(free, None)
    return out.params, out.state.iter_num


def _minimize_bound(lams0, min_gap, tol, *, order, p, trunc, paper, family, maxiter, method="pg"):
    """Projected gradient on the gaps: lams = lams0[0] + cumsum(min_gap + free), free on a simplex.

    Minimizes the log of the bound (scale-free step sizes), smoothed with delta = ``_SMOOTHING``
    times the bound at ``lams0`` over N, stage by stage, each warm-started from the last. Returns
    the optimized lambdas (endpoints exact), the bound there and at ``lams0``, and the iterations.
    """
    n = lams0.shape[0] - 1
    bound = functools.partial(_objective, order=order, p=p, trunc=trunc, paper=paper, family=family)
    budget = lams0[-1] - lams0[0] - n * min_gap

    def lams_of(free):
        inner = lams0[0] + jnp.cumsum(min_gap + free[:-1])
        return jnp.concatenate([lams0[:1], inner, lams0[-1:]])

    def project(free):
        return project_simplex(free, budget)

    init_bound = bound(lams0, delta=0.0)
    deltas = jnp.asarray(_SMOOTHING) * init_bound / n

    def stage(i, carry):
        free, iters = carry
        loss = lambda free: jnp.log(bound(lams_of(free), delta=deltas[i]))  # noqa: E731
        if method == "jaxopt":
            x, it = _jaxopt_run(loss, project, free, maxiter, tol)
            return x, iters + it
        out = pg_run(jax.value_and_grad(loss), project, pg_start(free, free.dtype), maxiter, tol)
        return out.x, iters + out.it

    # Start from the initial gaps, moved onto the feasible set (all gaps >= min_gap).
    free, iters = jax.lax.fori_loop(0, len(_SMOOTHING), stage, (project(jnp.diff(lams0) - min_gap), jnp.asarray(0)))
    lams = lams_of(free)
    return lams, bound(lams, delta=0.0), init_bound, iters


def optimize_timesteps(
    schedule: Schedule,
    n_steps: int,
    t_start=None,
    t_end=None,
    *,
    order: int = 3,
    p: float = 1,
    init: str = "logsnr",
    trunc: Optional[int] = None,
    paper: bool = False,
    min_gap: float = 1e-3,
    maxiter: int = 300,
    tol: float = 1e-6,
    method: str = "pg",
) -> StepOptimResult:
    """Minimize ``surrogate_objective`` over the interior times of an ``n_steps`` grid (endpoints fixed).

    ``init``: the starting grid, one of ``timesteps.GRIDS`` ('logsnr', 'uniform', 'quadratic',
    'karras'). The lambda gaps are kept >= ``min_gap`` and summing to the span, so every iterate is a
    strictly monotone grid; projected gradient (projection onto the simplex, backtracking line
    search, exact gradients; ``pg_run``) minimizes the log of the bound, first with |x| smoothed to
    sqrt(x^2 + delta^2) for decreasing delta (the bound has kinks where a node total C_i vanishes),
    then exactly. ``maxiter`` and ``tol`` apply to each of those stages. Runs in float64.

    ``method``: 'pg' (default) runs that method as a small ``lax`` loop; 'jaxopt' runs
    ``jaxopt.ProjectedGradient`` itself (the same iterates, a larger program: slower to compile).
    """
    if method not in ("pg", "jaxopt"):
        raise ValueError(f"unknown method {method!r}; choose 'pg' or 'jaxopt'")
    if init not in timesteps.GRIDS:
        raise ValueError(f"unknown init {init!r}; choose one of {sorted(timesteps.GRIDS)}")
    order = core.check_order("order", order, 1, 3)
    ts0 = timesteps.get(init, schedule, n_steps, t_start=t_start, t_end=t_end)
    n = len(ts0) - 1
    trunc = _check_trunc(n, trunc, paper)
    t_start, t_end = float(ts0[0]), float(ts0[-1])
    lams0 = grid_lams(schedule, ts0)
    check_min_gap(min_gap, lams0)
    config = dict(order=order, p=float(p), trunc=trunc, paper=bool(paper), family=_family(schedule))
    lams, objective, init_objective, iters = _on_cpu(
        _minimize_bound, tuple(config) + ("maxiter", "method"), (lams0, min_gap, tol), maxiter=int(maxiter),
        method=method, **config
    )
    lams = np.asarray(lams, np.float64)
    return StepOptimResult(
        ts=grid_ts(schedule, lams, t_start, t_end), lams=lams, objective=float(objective),
        init_objective=float(init_objective), iterations=int(iters),
    )


# --------------------------------------------------------------------------------------------
# GITS


@dataclasses.dataclass(frozen=True)
class GitsResult:
    """A GITS grid: ``ts`` (N + 1 times, a subset of ``fine_ts``), their ``indices`` in the fine grid,
    the cost matrix the dynamic programme minimized over and the minimum ``value``."""

    ts: np.ndarray
    indices: tuple
    fine_ts: np.ndarray
    cost: np.ndarray
    value: float


_GITS_METRICS = ("dev", "l2", "l1")


def gits_dp(cost, n_steps: int, coeff: float = 1.15) -> tuple[tuple, float]:
    """GITS's dynamic programme: the path 0 = i_0 < i_1 < ... < i_N = M - 1 through the M fine points
    minimizing sum_k coeff^k cost[i_k, i_{k+1}] (later steps weigh more for ``coeff`` > 1).

    V[j, 1] = cost[j, M-1] and V[j, k] = min over j < i < M - 1 of cost[j, i] + coeff V[i, k-1], as in
    the authors' ``gits_utils.dp``; ties go to the smallest index. Returns (indices, V[0, N]).
    """
    cost = np.asarray(cost, np.float64)
    m = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != m or m < 2:
        raise ValueError(f"cost must be a square matrix over at least 2 fine points, got shape {cost.shape}")
    if isinstance(n_steps, bool) or int(n_steps) != n_steps or not 1 <= n_steps <= m - 1:
        raise ValueError(f"n_steps must be an integer in [1, {m - 1}] (the fine grid has {m} points), got {n_steps!r}")
    n_steps = int(n_steps)
    value = np.full((m, n_steps + 1), np.inf)
    choice = np.zeros((m, n_steps + 1), int)
    value[:, 1] = cost[:, m - 1]
    allowed = np.triu(np.ones((m, m), bool), 1)
    allowed[:, m - 1] = False  # only the last step reaches the end
    for k in range(2, n_steps + 1):
        total = np.where(allowed, cost + coeff * value[None, :, k - 1], np.inf)
        choice[:, k] = np.argmin(total, axis=1)
        value[:, k] = total[np.arange(m), choice[:, k]]
    path, j = [0], 0
    for k in range(n_steps, 1, -1):
        j = int(choice[j, k])
        path.append(j)
    path.append(m - 1)
    return tuple(path), float(value[0, n_steps])


def _deviation(points, start, end):
    """Distance of each point [..., B, D] from the line through start and end [B, D] (per sample)."""
    chord = end - start
    unit = chord / np.linalg.norm(chord, axis=-1, keepdims=True)
    rel = end - points
    perp = rel - np.sum(rel * unit, axis=-1, keepdims=True) * unit
    return np.linalg.norm(perp, axis=-1)


def gits_costs(denoise, schedule: Schedule, fine_ts, x_init, *, solver: str = "ipndm", metric: str = "dev",
               **solver_options) -> np.ndarray:
    """GITS's cost matrix over the fine grid: c[i, j] (i < j) is the error of one Euler (= DDIM) step
    from the teacher's state at fine time i to fine time j, in EDM coordinates x / alpha.

    The teacher is ``solver`` on ``fine_ts`` from ``x_init`` (the warm-up noises). ``metric``:
    'l2' / 'l1', the mean over samples of the norm of the difference to the teacher's state at j;
    'dev' (the authors' default), the mean distance of the step's end from the chord joining the
    teacher trajectory's first and last states, minus the teacher state's own. Costs are float64.
    """
    if metric not in _GITS_METRICS:
        raise ValueError(f"metric must be one of {_GITS_METRICS}, got {metric!r}")
    fine_ts = np.asarray(fine_ts, np.float64)
    x_init = jnp.asarray(x_init)
    traj = sample(denoise, x_init, fine_ts, schedule, solver, return_trajectory=True, **solver_options)
    arrays, static = partition(denoise)
    predict = jax.jit(lambda arrays, xs, ts: jax.lax.map(lambda a: combine(arrays, static)(*a), (xs, ts)),
                      compiler_options=xla_options.compile_options())
    data = predict(arrays, traj[:-1], jnp.asarray(fine_ts[:-1], x_init.dtype))
    with float64():
        alpha = np.asarray(schedule.alpha(jnp.asarray(fine_ts)), np.float64)
        level = np.asarray(schedule.edm_sigma(jnp.asarray(fine_ts)), np.float64)
    m, batch = len(fine_ts), x_init.shape[0]
    flat = lambda a: np.asarray(a, np.float64).reshape(a.shape[0], batch, -1)  # noqa: E731
    states = flat(traj) / alpha[:, None, None]  # [M, B, D] teacher states in x / alpha
    data = flat(data)
    if metric == "dev":
        teacher_dev = _deviation(states, states[0], states[-1]).mean(axis=1)
    cost = np.zeros((m, m))
    for i in range(m - 1):
        ratio = (level[i + 1 :] / level[i])[:, None, None]
        jumped = ratio * states[i] + (1.0 - ratio) * data[i]  # [M - i - 1, B, D]: Euler to every j > i
        if metric == "dev":
            cost[i, i + 1 :] = _deviation(jumped, states[0], states[-1]).mean(axis=1) - teacher_dev[i + 1 :]
        else:
            order = 2 if metric == "l2" else 1
            cost[i, i + 1 :] = np.linalg.norm(jumped - states[i + 1 :], ord=order, axis=-1).mean(axis=1)
    return cost


def gits(
    denoise, schedule: Schedule, n_steps: int, x_init, *, fine_steps: int = 60, fine_grid: str = "karras",
    solver: str = "ipndm", metric: str = "dev", coeff: float = 1.15, t_start=None, t_end=None, **solver_options,
) -> GitsResult:
    """GITS (Chen et al., ICML 2024): the ``n_steps``-step subset of a fine grid chosen by dynamic
    programming on the local errors of the model's own warm-up trajectories.

    The fine grid is ``timesteps.get(fine_grid, schedule, fine_steps, t_start=..., t_end=...)`` (the
    authors: 60 Karras steps with rho = 7, iPNDM as teacher, metric 'dev', coeff 1.15); ``x_init``
    [B, ...] are warm-up noises at its first time, run through the teacher ``solver`` (with
    ``solver_options``). ``gits_costs`` builds the cost matrix and ``gits_dp`` picks the path; the
    whole costs fine_steps model calls for the teacher and as many for the data predictions along it.
    """
    if denoise is None or not callable(denoise):
        raise ValueError("gits needs the model: denoise must be a callable denoise(x, t) (it searches the "
                         "grid on the model's own trajectories)")
    registry.get(solver).resolve(solver_options)
    fine_ts = timesteps.get(fine_grid, schedule, fine_steps, t_start=t_start, t_end=t_end)
    if isinstance(n_steps, bool) or int(n_steps) != n_steps or not 1 <= n_steps <= len(fine_ts) - 1:
        raise ValueError(f"n_steps must be an integer in [1, {len(fine_ts) - 1}] (fine_steps), got {n_steps!r}")
    core.validate(jnp.asarray(x_init), fine_ts, schedule)
    cost = gits_costs(denoise, schedule, fine_ts, x_init, solver=solver, metric=metric, **solver_options)
    indices, value = gits_dp(cost, int(n_steps), coeff)
    return GitsResult(ts=fine_ts[list(indices)], indices=indices, fine_ts=fine_ts, cost=cost, value=value)

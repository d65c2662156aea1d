"""Optimized time steps: the model-free error bound of Xue et al. (CVPR 2024) and grids learned through a solver.

Two ways to choose the N + 1 times of a few-step sampler:

* ``optimize_timesteps`` minimizes ``surrogate_objective``, the bound of "Accelerating Diffusion
  Sampling with Optimized Time Steps" (Xue et al., 2024) on the discretization error of an explicit
  multistep data-prediction solver. It depends only on the grid's half-log-SNR values lambda, the
  solver order and the error weights sigma^p / alpha, never on a network: tens of milliseconds
  on a CPU once compiled.
* ``learn_timesteps`` minimizes the measured distance between a few-step solver and a teacher
  solution over a batch of starting noises, by differentiating through the solver's ``lax.scan``.

Both optimize over the lambda gaps of the grid with the endpoints fixed: the gaps minus a minimum
gap live on a scaled simplex, and ``jaxopt.ProjectedGradient`` with ``projection_simplex`` keeps
every iterate a valid, strictly monotone grid.

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
import math
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import timesteps
from jdiffsample.schedules import Schedule, float64
from jdiffsample.solvers import SOLVERS, core, sample

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "JAXopt is no longer maintained."
    import jaxopt

__all__ = [
    "default_trunc",
    "error_weights",
    "surrogate_objective",
    "StepOptimResult",
    "optimize_timesteps",
    "LearnResult",
    "learn_timesteps",
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


def _error_weights(lams, p, ve: bool):
    if ve:
        return jnp.exp(-p * lams)
    log_alpha = -0.5 * jnp.logaddexp(0.0, -2.0 * lams)
    return jnp.exp((p - 1.0) * log_alpha - p * lams)


def error_weights(lams, p: float = 1, schedule: Optional[Schedule] = None):
    """The per-node error sizes sigma^p / alpha as a function of lambda.

    ``schedule=None`` or any VP schedule: alpha^2 = sigmoid(2 lambda), sigma = alpha e^{-lambda} (the
    same for every VP schedule). A VE schedule: alpha = 1 and sigma = e^{-lambda}, so the weight is
    e^{-p lambda}. (For p = 1 both are e^{-lambda}; the reference code uses the VP form for EDM too.)
    """
    return _error_weights(jnp.asarray(lams), p, schedule is not None and schedule.is_ve)


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


def _objective(lams, order, p, trunc, paper, ve, delta):
    """The bound with |x| replaced by sqrt(x^2 + delta^2) (exact for ``delta = 0``); static config."""
    n = lams.shape[0] - 1
    orders, separate, rss = _step_plan(n, order, trunc, paper)
    w = _lagrange_weights(lams, orders)
    node = np.clip(np.arange(n)[:, None] - 2 + np.arange(3)[None, :], 0, None)
    used = np.arange(3)[None, :] >= 3 - orders[:, None]  # [N, 3]: the nodes each step uses
    terms = _error_weights(lams[:-1], p, ve)[node] * w  # [N, 3]
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
    ve = schedule is not None and schedule.is_ve
    return _objective(lams, order, p, trunc, paper, ve, 0.0)


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


def _grid_lams(schedule, ts):
    with float64():
        return np.asarray(schedule.lam(jnp.asarray(ts, jnp.float64)), np.float64)


def _check_min_gap(min_gap, lams) -> None:
    """``min_gap`` must leave room for ``len(lams) - 1`` gaps within the grid's lambda span."""
    n = len(lams) - 1
    span = lams[-1] - lams[0]
    if not 0 < min_gap < span / n:
        raise ValueError(f"min_gap must lie in (0, {span / n:.4g}) (the lambda span over the steps), "
                         f"got {min_gap}")


def _grid_ts(schedule, lams, t_start, t_end):
    with float64():
        ts = np.array(schedule.t_from_lam(jnp.asarray(lams, jnp.float64)), np.float64)
    ts[0], ts[-1] = t_start, t_end
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"the optimized grid is not strictly decreasing in t: {ts}; increase min_gap")
    return ts


@functools.partial(jax.jit, static_argnames=("order", "p", "trunc", "paper", "ve", "maxiter"))
def _minimize_bound(lams0, min_gap, tol, *, order, p, trunc, paper, ve, maxiter):
    """Projected gradient on the gaps: lams = lams0[0] + cumsum(min_gap + free), free on a simplex.

    Minimizes the log of the bound (scale-free step sizes), smoothed with delta = ``_SMOOTHING``
    times the bound at ``lams0`` over N, stage by stage, each warm-started from the last. Returns
    the optimized lambdas (endpoints exact), the bound there and at ``lams0``, and the iterations.
    """
    n = lams0.shape[0] - 1
    bound = functools.partial(_objective, order=order, p=p, trunc=trunc, paper=paper, ve=ve)

    def lams_of(free):
        inner = lams0[0] + jnp.cumsum(min_gap + free[:-1])
        return jnp.concatenate([lams0[:1], inner, lams0[-1:]])

    def loss(free, delta):
        return jnp.log(bound(lams_of(free), delta=delta))

    solver = jaxopt.ProjectedGradient(
        fun=loss, projection=jaxopt.projection.projection_simplex, maxiter=maxiter, tol=tol,
        acceleration=False, implicit_diff=False,
    )
    budget = lams0[-1] - lams0[0] - n * min_gap

    init_bound = bound(lams0, delta=0.0)
    deltas = jnp.asarray(_SMOOTHING) * init_bound / n

    def stage(i, carry):
        free, iters = carry
        out = solver.run(free, budget, deltas[i])
        return out.params, iters + out.state.iter_num

    # Start from the initial gaps, moved onto the feasible set (all gaps >= min_gap).
    free0 = jaxopt.projection.projection_simplex(jnp.diff(lams0) - min_gap, budget)
    free, iters = jax.lax.fori_loop(0, len(_SMOOTHING), stage, (free0, jnp.asarray(0)))
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
) -> StepOptimResult:
    """Minimize ``surrogate_objective`` over the interior times of an ``n_steps`` grid (endpoints fixed).

    ``init``: the starting grid, one of ``timesteps.GRIDS`` ('logsnr', 'uniform', 'quadratic',
    'karras'). The lambda gaps are kept >= ``min_gap`` and summing to the span, so every iterate is a
    strictly monotone grid; ``jaxopt.ProjectedGradient`` (projection onto the simplex, backtracking
    line search, exact gradients) minimizes the log of the bound, first with |x| smoothed to
    sqrt(x^2 + delta^2) for decreasing delta (the bound has kinks where a node total C_i vanishes),
    then exactly. ``maxiter`` and ``tol`` apply to each of those stages. Runs in float64.
    """
    if init not in timesteps.GRIDS:
        raise ValueError(f"unknown init {init!r}; choose one of {sorted(timesteps.GRIDS)}")
    order = core.check_order("order", order, 1, 3)
    ts0 = timesteps.get(init, schedule, n_steps, t_start=t_start, t_end=t_end)
    n = len(ts0) - 1
    trunc = _check_trunc(n, trunc, paper)
    t_start, t_end = float(ts0[0]), float(ts0[-1])
    lams0 = _grid_lams(schedule, ts0)
    _check_min_gap(min_gap, lams0)
    config = dict(order=order, p=float(p), trunc=trunc, paper=bool(paper), ve=schedule.is_ve)
    with float64():
        lams, objective, init_objective, iters = _minimize_bound(
            jnp.asarray(lams0), jnp.float64(min_gap), jnp.float64(tol), maxiter=int(maxiter), **config
        )
    lams = np.asarray(lams, np.float64)
    return StepOptimResult(
        ts=_grid_ts(schedule, lams, t_start, t_end), lams=lams, objective=float(objective),
        init_objective=float(init_objective), iterations=int(iters),
    )


# --------------------------------------------------------------------------------------------
# Learning a grid through the solver


def _solver_fn(solver):
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[solver]


def learned_loss(ts, denoise, schedule: Schedule, solver: str, noise, target, **solver_options):
    """Mean squared distance between ``solver`` run on the grid ``ts`` from ``noise`` and ``target``.

    Differentiable in ``ts`` (the loss ``learn_timesteps`` minimizes, through the solver's ``lax.scan``).
    """
    out = _solver_fn(solver)(denoise, noise, ts, schedule, **solver_options)
    return jnp.mean(jnp.square(out - target))


@dataclasses.dataclass(frozen=True)
class LearnResult:
    """A learned grid (``ts``, ``lams``) and its mean squared errors against the teacher, before
    (``init_*``) and after learning, on the training noises and on the held-out ones (NaN without
    ``holdout``); ``history`` holds (iteration, train error, held-out error) per progress line."""

    ts: np.ndarray
    lams: np.ndarray
    train_error: float
    holdout_error: float
    init_train_error: float
    init_holdout_error: float
    iterations: int
    history: tuple


def _teacher(denoise, schedule, solver, noise, t_start, t_end, teacher, teacher_steps, solver_options):
    """The reference solution from ``noise``: the same solver on a fine logSNR grid, or EDM's Heun on
    a fine Karras grid (``teacher='heun'``)."""
    if teacher in (None, "same"):
        ts = timesteps.logsnr(schedule, teacher_steps, t_start, t_end)
        return sample(denoise, noise, ts, schedule, solver, **solver_options)
    if teacher == "heun":
        return sample(denoise, noise, timesteps.karras(schedule, teacher_steps, t_start, t_end), schedule, "heun")
    raise ValueError(f"teacher must be None, 'same' or 'heun', got {teacher!r}")


def learn_timesteps(
    denoise,
    schedule: Schedule,
    solver: str,
    noise,
    ts_init,
    *,
    teacher: Optional[str] = None,
    teacher_steps: int = 200,
    holdout=None,
    maxiter: int = 100,
    tol: float = 1e-5,
    min_gap: float = 1e-3,
    log_every: int = 10,
    verbose: bool = False,
    callback: Optional[Callable] = None,
    **solver_options,
) -> LearnResult:
    """Learn the interior times of ``ts_init`` by minimizing ``learned_loss`` against a teacher.

    ``noise`` [B, ...]: starting states at ``ts_init[0]``; ``holdout``: more starting states, never
    trained on, whose error shows overfitting. The teacher (``_teacher``: the same solver on
    ``teacher_steps`` logSNR steps, or ``teacher='heun'``) is computed once for both batches.

    The grid is parameterized by its lambda gaps, kept >= ``min_gap`` and summing to the span
    (endpoints fixed) on a scaled simplex, and ``jaxopt.ProjectedGradient`` (backtracking line
    search) minimizes the log of the loss with gradients through the solver's ``lax.scan``. Every
    ``log_every`` iterations the errors are recorded, printed with ``verbose`` and passed to
    ``callback(iteration, ts, train_error, holdout_error)``. Stops after ``maxiter`` iterations or when
    the projected-gradient residual falls below ``tol``. Runs in the dtype of ``noise``.
    """
    _solver_fn(solver)  # validate the name early
    noise = jnp.asarray(noise)
    dtype = noise.dtype
    ts_init = np.asarray(ts_init, np.float64)
    core.validate(noise, ts_init, schedule)
    if schedule.is_ve and ts_init[-1] == 0:
        raise ValueError("learn_timesteps needs a final time > 0 (lambda is infinite at sigma = 0)")
    n = len(ts_init) - 1
    t_start, t_end = float(ts_init[0]), float(ts_init[-1])
    lams0 = _grid_lams(schedule, ts_init)
    _check_min_gap(min_gap, lams0)
    teach = functools.partial(
        _teacher, denoise, schedule, solver, t_start=t_start, t_end=t_end, teacher=teacher,
        teacher_steps=teacher_steps, solver_options=solver_options,
    )
    target = teach(noise)
    if holdout is not None:
        holdout = jnp.asarray(holdout, dtype)
        holdout_target = teach(holdout)

    lam_start = jnp.asarray(lams0[0], dtype)
    budget = jnp.asarray(lams0[-1] - lams0[0] - n * min_gap, dtype)

    def ts_of(free):
        inner = lam_start + jnp.cumsum(min_gap + free[:-1])
        ts = schedule.t_from_lam(inner).astype(dtype)
        return jnp.concatenate([jnp.asarray([t_start], dtype), ts, jnp.asarray([t_end], dtype)])

    def mse(free, x, y):
        return learned_loss(ts_of(free), denoise, schedule, solver, x, y, **solver_options)

    pg = jaxopt.ProjectedGradient(
        fun=lambda free: jnp.log(mse(free, noise, target)),
        projection=jaxopt.projection.projection_simplex, maxiter=maxiter, tol=tol,
        acceleration=False, implicit_diff=False,
    )
    update = jax.jit(lambda free, state: pg.update(free, state, budget))
    evaluate = jax.jit(mse)

    def errors(free):
        train = float(evaluate(free, noise, target))
        held = float(evaluate(free, holdout, holdout_target)) if holdout is not None else math.nan
        return train, held

    history = []

    def report(it, free):
        train, held = errors(free)
        history.append((it, train, held))
        if verbose:
            print(f"learn_timesteps: iter {it:4d}  train mse {train:.4e}  held-out mse {held:.4e}", flush=True)
        if callback is not None:
            callback(it, np.asarray(ts_of(free), np.float64), train, held)
        return train, held

    free = jaxopt.projection.projection_simplex(jnp.asarray(np.diff(lams0) - min_gap, dtype), budget)
    state = pg.init_state(free, budget)
    init_train, init_held = train, held = report(0, free)
    it = 0
    while it < maxiter:
        free, state = update(free, state)
        it += 1
        done = not float(state.error) > tol  # converged (or NaN)
        if it % log_every == 0 or done or it == maxiter:
            train, held = report(it, free)
        if done:
            break
    inner = lams0[0] + np.cumsum(min_gap + np.asarray(free[:-1], np.float64))
    lams = np.concatenate([lams0[:1], inner, lams0[-1:]])
    return LearnResult(
        ts=_grid_ts(schedule, lams, t_start, t_end), lams=lams, train_error=train, holdout_error=held,
        init_train_error=init_train, init_holdout_error=init_held, iterations=it, history=tuple(history),
    )

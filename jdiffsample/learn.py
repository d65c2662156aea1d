"""Grids learned through a solver: the measured distance between a few-step solver and a teacher
solution over a batch of starting noises, minimized by differentiating through the solver's
``lax.scan`` (``loss='ld3'``: LD3's soft teacher loss, Tong et al., ICLR 2025).

The grid's lambda gaps minus a minimum gap live on a scaled simplex with the endpoints fixed, as for
the bound of :mod:`jdiffsample.optimize`, whose projected-gradient method keeps every iterate a
valid, strictly monotone grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import timesteps, xla_options
from jdiffsample.optimize import check_min_gap, grid_lams, grid_ts, pg_run, pg_start, project_simplex
from jdiffsample.schedules import Schedule, float64
from jdiffsample.solvers import combine, core, partition, registry, sample

__all__ = ["LearnResult", "learn_timesteps", "learned_loss", "ld3_loss", "ld3_radius", "teacher_solution", "unit_balls"]


def learned_loss(ts, denoise, schedule: Schedule, solver: str, noise, target, **solver_options):
    """Mean squared distance between ``solver`` run on the grid ``ts`` from ``noise`` and ``target``.

    Differentiable in ``ts`` (the loss ``learn_timesteps`` minimizes, through the solver's ``lax.scan``).
    """
    out = registry.get(solver).fn(denoise, noise, ts, schedule, **solver_options)
    return jnp.mean(jnp.square(out - target))


def unit_balls(u):
    """Each sample of ``u`` (leading axis) projected onto the unit L2 ball."""
    norm = core.safe_sqrt(jnp.sum(jnp.square(u), axis=tuple(range(1, u.ndim)), keepdims=True))
    return u / jnp.maximum(norm, 1.0)


def ld3_radius(schedule: Schedule, noise, t_start, nfe: int) -> float:
    """LD3's ball radius r sigma(t_start), r = 0.001 d / NFE^2 (d the dimension of one sample), as
    the authors' code sets ``prior_bound`` (``utils.adjust_hyper``) on the unit-variance latent."""
    d = int(np.prod(jnp.shape(noise)[1:]))
    with float64():
        sigma = float(schedule.sigma(jnp.float64(t_start)))
    return 0.001 * d / nfe**2 * sigma


def ld3_loss(ts, slack, denoise, schedule: Schedule, solver: str, noise, target, radius, **solver_options):
    """LD3's soft teacher loss (Tong et al., ICLR 2025) for given slack: ``learned_loss`` with the
    student started from noise + ``radius`` P(slack) instead of the teacher's noise, P the projection
    of each sample onto the unit L2 ball.

    Minimized over the slack as well (``learn_timesteps(loss='ld3')``), this is LD3's relaxed
    objective E[min over x' in B(x_T, radius) of d(student(x'), teacher(x_T))]: the student need only
    reach the teacher's sample from some start near the teacher's (the paper's rationale: a few-step
    student cannot represent the teacher's map exactly, and the looser target generalizes better).
    The distance is the squared L2 one (the paper's image experiments use LPIPS). Differentiable in
    ``ts`` and ``slack``.
    """
    start = noise + radius * unit_balls(slack).astype(noise.dtype)
    return learned_loss(ts, denoise, schedule, solver, start, target, **solver_options)


@dataclasses.dataclass(frozen=True)
class LearnResult:
    """A learned grid (``ts``, ``lams``) and its errors against the teacher, before (``init_*``) and
    after learning: the training loss (the mean squared error, or LD3's soft loss) and the held-out
    mean squared error (NaN without ``holdout``); ``history`` holds (iteration, train error, held-out
    error) per progress line."""

    ts: np.ndarray
    lams: np.ndarray
    train_error: float
    holdout_error: float
    init_train_error: float
    init_holdout_error: float
    iterations: int
    history: tuple


def teacher_solution(denoise, schedule, solver, noise, t_start, t_end, teacher, teacher_steps, solver_options):
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
    loss: str = "mse",
    radius: Optional[float] = None,
    **solver_options,
) -> LearnResult:
    """Learn the interior times of ``ts_init`` by minimizing ``learned_loss`` against a teacher.

    ``noise`` [B, ...]: starting states at ``ts_init[0]``; ``holdout``: more starting states, never
    trained on, whose error shows overfitting. The teacher (``teacher_solution``: the same solver on
    ``teacher_steps`` logSNR steps, or ``teacher='heun'``) is computed once for both batches.

    The grid is parameterized by its lambda gaps, kept >= ``min_gap`` and summing to the span
    (endpoints fixed) on a scaled simplex, and projected gradient (``pg_run``, backtracking line
    search) minimizes the log of the loss with gradients through the solver's ``lax.scan``. Every
    ``log_every`` iterations the errors are recorded, printed with ``verbose`` and passed to
    ``callback(iteration, ts, train_error, holdout_error)``. Stops after ``maxiter`` iterations or when
    the projected-gradient residual falls below ``tol``. Runs in the dtype of ``noise``.

    ``loss='ld3'``: LD3's soft teacher loss (``ld3_loss``), minimized jointly over the grid and one
    slack per training sample in a ball of ``radius`` (default ``ld3_radius``: LD3's 0.001 d / NFE^2
    times sigma at ``ts_init[0]``), projected like the gaps. The train error is then that loss; the
    held-out error is always the plain mean squared error from the held-out noises.
    """
    if loss not in ("mse", "ld3"):
        raise ValueError(f"loss must be 'mse' or 'ld3', got {loss!r}")
    registry.get(solver).resolve(solver_options)  # validate the name and options early
    noise = jnp.asarray(noise)
    dtype = noise.dtype
    ts_init = np.asarray(ts_init, np.float64)
    core.validate(noise, ts_init, schedule)
    if schedule.zero_end and ts_init[-1] == 0:
        raise ValueError("learn_timesteps needs a final time > 0 (lambda is infinite at sigma = 0)")
    n = len(ts_init) - 1
    t_start, t_end = float(ts_init[0]), float(ts_init[-1])
    lams0 = grid_lams(schedule, ts_init)
    check_min_gap(min_gap, lams0)
    teach = functools.partial(
        teacher_solution, denoise, schedule, solver, t_start=t_start, t_end=t_end, teacher=teacher,
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

    # The denoiser's arrays (a network's weights) and the batches are arguments of the compiled
    # steps, not constants baked into them.
    arrays, static = partition(denoise)

    def mse(free, arrays, x, y):
        return learned_loss(ts_of(free), combine(arrays, static), schedule, solver, x, y, **solver_options)

    free = project_simplex(jnp.asarray(np.diff(lams0) - min_gap, dtype), budget)
    if loss == "ld3":  # params: (gaps, slack), the slack in units of the radius (unit balls)
        if radius is None:
            radius = ld3_radius(schedule, noise, t_start, registry.get(solver).nfe(n))
        radius = jnp.asarray(radius, dtype)

        def objective(params, arrays, x, y):
            free, slack = params
            return ld3_loss(ts_of(free), slack, combine(arrays, static), schedule, solver, x, y, radius,
                            **solver_options)

        def projection(params):
            return project_simplex(params[0], budget), unit_balls(params[1])

        params = (free, jnp.zeros_like(noise))
        gaps_of = lambda params: params[0]  # noqa: E731
    else:
        objective, params = mse, free
        projection = lambda free: project_simplex(free, budget)  # noqa: E731
        gaps_of = lambda params: params  # noqa: E731

    xla = xla_options.compile_options()  # these programs run the model

    @functools.partial(jax.jit, compiler_options=xla)
    def update(state, arrays, x, y):  # one more iteration
        value_and_grad = jax.value_and_grad(lambda params: jnp.log(objective(params, arrays, x, y)))
        return pg_run(value_and_grad, projection, state, state.it + 1, -jnp.inf)

    evaluate, evaluate_mse = jax.jit(objective, compiler_options=xla), jax.jit(mse, compiler_options=xla)

    def errors(params):
        train = float(evaluate(params, arrays, noise, target))
        held = math.nan if holdout is None else float(evaluate_mse(gaps_of(params), arrays, holdout, holdout_target))
        return train, held

    history = []

    def report(it, params):
        train, held = errors(params)
        history.append((it, train, held))
        if verbose:
            print(f"learn_timesteps: iter {it:4d}  train {loss} {train:.4e}  held-out mse {held:.4e}", flush=True)
        if callback is not None:
            callback(it, np.asarray(ts_of(gaps_of(params)), np.float64), train, held)
        return train, held

    state = pg_start(params, dtype)
    init_train, init_held = train, held = report(0, params)
    it = 0
    while it < maxiter:
        state = update(state, arrays, noise, target)
        params = state.x
        it += 1
        done = not float(state.error) > tol  # converged (or NaN)
        if it % log_every == 0 or done or it == maxiter:
            train, held = report(it, params)
        if done:
            break
    inner = lams0[0] + np.cumsum(min_gap + np.asarray(gaps_of(params)[:-1], np.float64))
    lams = np.concatenate([lams0[:1], inner, lams0[-1:]])
    return LearnResult(
        ts=grid_ts(schedule, lams, t_start, t_end), lams=lams, train_error=train, holdout_error=held,
        init_train_error=init_train, init_holdout_error=init_held, iterations=it, history=tuple(history),
    )


# --------------------------------------------------------------------------------------------
# GITS: dynamic programming over a fine grid



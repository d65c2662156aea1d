"""Learning a learnable solver's parameters (AMED, EPD, PAS) against a fine-grid teacher.

:func:`learn_solver` is the solver-parameter counterpart of
:func:`jdiffsample.learn.learn_timesteps`, with the same teacher (``learn.teacher_solution``: EDM's
Heun on a fine Karras grid, or the base solver on a fine logSNR grid) and losses
(``learn.learned_loss``, LD3's ``learn.ld3_loss``): the solver's parameters, one pytree, go
into the solver as its ``params`` argument, the gradient runs through its ``lax.scan``, and optax
(Adam by default) steps them, projected back into their documented ranges after each step.

The authors train differently: AMED and EPD step by step, each step's student started from the
teacher's state and matched to the teacher's next one; PAS greedily, step after step, keeping a
correction only where it lowers that step's loss by a tolerance. Here every step is trained at
once on the final sample (the whole trajectory the sampler will run), which is what sampling uses;
the per-step losses remain expressible as a custom ``optimizer`` and loss around ``sample``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiffsample import learn, xla_options
from jdiffsample.schedules import Schedule
from jdiffsample.solvers import combine, core, partition, registry

__all__ = ["LearnedSolver", "learn_solver", "teacher_calls", "LOSSES", "TEACHERS"]

LOSSES = ("mse", "l1", "ld3")
TEACHERS = ("heun", "same")


@dataclasses.dataclass(frozen=True)
class LearnedSolver:
    """Learned parameters of ``solver`` (with resolved ``options``) for the grid ``ts``.

    ``params``: the pytree (NumPy arrays), the one with the lowest training loss seen. Errors are
    mean squared errors against the teacher, on the training noises (``train_error``: the training
    loss, LD3's soft loss for ``loss='ld3'``) and on held-out noises (``holdout_error``: always the
    plain MSE; NaN without ``holdout``), before (``init_*``) and after learning. ``history``:
    (iteration, train loss, held-out MSE) per progress line. Cost: ``seconds`` of wall time (teacher,
    compilation and iterations) and ``model_calls``: network evaluations per training sample, the
    teacher's plus the student's forward passes (each training iteration also back-propagates
    through those), as a dict with ``teacher``, ``student`` and ``total``.
    """

    solver: str
    options: dict
    params: Any
    ts: np.ndarray
    loss: str
    teacher: str
    teacher_steps: int
    iterations: int
    init_train_error: float
    train_error: float
    init_holdout_error: float
    holdout_error: float
    history: tuple
    seconds: float
    model_calls: dict


def teacher_calls(schedule: Schedule, teacher: str, teacher_steps: int, base: str, base_options: dict) -> int:
    """Model calls of one teacher trajectory: Heun's on ``teacher_steps`` Karras steps (2 N), or the
    base solver's NFE on ``teacher_steps`` steps."""
    if teacher == "heun":
        return registry.get("heun").nfe(teacher_steps)
    return registry.get(base).nfe(teacher_steps, options=base_options)


def _l1_loss(ts, denoise, schedule, solver, noise, target, **solver_options):
    out = registry.get(solver).fn(denoise, noise, ts, schedule, **solver_options)
    return jnp.mean(jnp.abs(out - target))


def _check_settings(info, loss, teacher, iterations, teacher_steps):
    if not info.learnable:
        learnable = [n for n in registry.names() if registry.get(n).learnable]
        raise ValueError(f"solver {info.name} has no learned parameters; learnable solvers: {', '.join(learnable)}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")
    for name, value in (("iterations", iterations), ("teacher_steps", teacher_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if name == "iterations" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'iterations' else 'positive'} integer, "
                             f"got {value!r}")


def learn_solver(
    denoise,
    schedule: Schedule,
    solver: str,
    noise,
    ts,
    *,
    params=None,
    holdout=None,
    holdout_denoise=None,
    teacher: str = "heun",
    teacher_steps: int = 100,
    loss: str = "mse",
    radius: Optional[float] = None,
    iterations: int = 100,
    learning_rate: Optional[float] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    log_every: int = 10,
    verbose: bool = False,
    callback: Optional[Callable] = None,
    **solver_options,
) -> LearnedSolver:
    """Learn the parameters of the learnable ``solver`` on the grid ``ts`` against a teacher.

    ``noise`` [B, ...]: the training batch, starting states at ``ts[0]`` (all of it in every
    iteration); ``holdout``: more starting states, never trained on, whose error shows
    overfitting (``holdout_denoise``: the model for them, e.g. with their labels; default
    ``denoise``). ``teacher``: ``'heun'`` (EDM's Heun on ``teacher_steps`` Karras steps, the
    authors' usual teacher) or ``'same'`` (the solver's base, e.g. iPNDM for PAS on iPNDM, on
    ``teacher_steps`` logSNR steps); computed once for both batches. ``loss``: ``'mse'`` (mean
    squared error of the final sample), ``'l1'`` (PAS's default), or ``'ld3'`` (LD3's soft teacher
    loss, a slack per training sample in a ball of ``radius``, default ``learn.ld3_radius``).
    ``params``: the starting parameters (default the solver's ``init``, then its ``prepare``
    where it has one: PAS's step lengths from the base trajectory). ``optimizer``: any optax
    transformation (default ``optax.adam(learning_rate)``, the rate defaulting to the solver's
    ``learned.rate(options)``), its steps scaled by the solver's ``learned.step_sizes`` (AMED's and
    EPD's scales move in proportion to their bounds); after each step the parameters are projected
    into their ranges.
    Every ``log_every`` iterations the errors are recorded, printed with ``verbose`` and passed to
    ``callback(iteration, params, train_error, holdout_error)``. Runs in the dtype of ``noise``.
    """
    start = time.perf_counter()
    info = registry.get(solver)
    _check_settings(info, loss, teacher, iterations, teacher_steps)
    options = info.resolve(solver_options)
    learned = info.learned
    noise = jnp.asarray(noise)
    dtype = noise.dtype
    ts = np.asarray(ts, np.float64)
    core.validate(noise, ts, schedule, min_steps=info.min_steps(options))
    if schedule.zero_end and ts[-1] == 0:
        raise ValueError("learn_solver needs a final time > 0 (train on the grid without its last step into "
                         "sigma = 0)")
    n = len(ts) - 1
    base, base_options = learned.base(options)
    teach = functools.partial(learn.teacher_solution, schedule=schedule, solver=base, t_start=float(ts[0]),
                              t_end=float(ts[-1]), teacher=teacher, teacher_steps=teacher_steps,
                              solver_options=base_options)
    target = teach(denoise, noise=noise)
    holdout_denoise = denoise if holdout_denoise is None else holdout_denoise
    if holdout is not None:
        holdout = jnp.asarray(holdout, dtype)
        holdout_target = teach(holdout_denoise, noise=holdout)
    if params is None:
        params = learned.init(n, options)
        if learned.prepare is not None:
            params = learned.prepare(params, denoise, noise, ts, schedule, options)
    learned.check(params, n, options)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    grid = jnp.asarray(ts, dtype)
    arrays, static = partition(denoise)  # the weights and batches are arguments of the programs
    held_arrays, held_static = partition(holdout_denoise)

    def mse_of(static):
        def mse(p, arrays, x, y):
            return learn.learned_loss(grid, combine(arrays, static), schedule, solver, x, y, params=p, **options)

        return mse

    mse = mse_of(static)

    if loss == "ld3":
        if radius is None:
            radius = learn.ld3_radius(schedule, noise, ts[0], info.nfe(n, options=options))
        radius = jnp.asarray(radius, dtype)

        def objective(state, arrays, x, y):
            p, slack = state
            return learn.ld3_loss(grid, slack, combine(arrays, static), schedule, solver, x, y, radius,
                                     params=p, **options)

        def project(state):
            return learned.project(state[0], options), learn.unit_balls(state[1])

        state = (params, jnp.zeros_like(noise))
        params_of = lambda state: state[0]  # noqa: E731
    else:
        if loss == "mse":
            objective = mse
        else:
            def objective(p, arrays, x, y):
                return _l1_loss(grid, combine(arrays, static), schedule, solver, x, y, params=p, **options)

        def project(p):
            return learned.project(p, options)

        state, params_of = params, (lambda state: state)

    opt = optimizer if optimizer is not None else optax.adam(
        learned.rate(options) if learning_rate is None else learning_rate)
    xla = xla_options.compile_options()

    sizes = None if learned.step_sizes is None else learned.step_sizes(params, options)

    @functools.partial(jax.jit, compiler_options=xla)
    def update(state, opt_state, arrays, x, y):
        value, grads = jax.value_and_grad(objective)(state, arrays, x, y)
        updates, opt_state = opt.update(grads, opt_state, state)
        if sizes is not None:  # the parameters' own step sizes (LD3's slack keeps the optimizer's)
            steps = jax.tree.map(lambda u, m: u * m, params_of(updates), sizes)
            updates = (steps, updates[1]) if loss == "ld3" else steps
        return project(optax.apply_updates(state, updates)), opt_state, value

    evaluate_mse = jax.jit(mse_of(held_static), compiler_options=xla)
    history = []

    def held_error(state):
        if holdout is None:
            return math.nan
        return float(evaluate_mse(params_of(state), held_arrays, holdout, holdout_target))

    # Each update returns the loss of the state it starts from: one more, not applied, evaluates the
    # last state (no program of its own for the training loss).
    # committed to the device, like the updated state: the second update then reuses the first's program
    state, opt_state = jax.device_put((state, opt.init(state)), jax.devices()[0])
    best, best_value = state, math.inf
    for it in range(iterations + 1):
        new, new_opt_state, value = update(state, opt_state, arrays, noise, target)
        value = float(value)
        if value < best_value:
            best, best_value = state, value
        if it % log_every == 0 or it == iterations:
            held = held_error(state)
            history.append((it, value, held))
            if verbose:
                print(f"learn_solver: iter {it:4d}  train {loss} {value:.4e}  held-out mse {held:.4e}", flush=True)
            if callback is not None:
                callback(it, params_of(state), value, held)
        state, opt_state = new, new_opt_state
    if not all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(params_of(best))):
        raise ValueError("learning diverged (non-finite parameters); lower the learning rate")
    init_train, init_held = history[0][1:]
    held = held_error(best)
    student = iterations * info.evaluations(n, options=options)
    calls = teacher_calls(schedule, teacher, teacher_steps, base, base_options)
    return LearnedSolver(
        solver=solver, options=options, params=jax.tree.map(np.asarray, params_of(best)), ts=ts, loss=loss,
        teacher=teacher, teacher_steps=int(teacher_steps), train_error=best_value, holdout_error=held,
        init_train_error=init_train, init_holdout_error=init_held, iterations=iterations, history=tuple(history),
        seconds=time.perf_counter() - start, model_calls=dict(teacher=calls, student=student, total=calls + student),
    )

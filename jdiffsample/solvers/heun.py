"""EDM's samplers (Karras et al., 2022, Algorithm 2): Euler and Heun with optional churn.

Both integrate the probability-flow ODE in the scaled coordinates x_hat = x / alpha with noise level
s = sigma / alpha = exp(-lambda): dx_hat/ds = (x_hat - D(x_hat; s)) / s. For ``VE`` these are EDM's
own coordinates; other schedules are rescaled around the denoiser call.

Churn (``s_churn > 0``) raises the noise level of step i from s_i to s_i (1 + gamma_i), with
gamma_i = min(s_churn / N, sqrt(2) - 1) when s_tmin <= s_i <= s_tmax, adding fresh noise to match,
then steps from there. It needs ``key``; the raised level must stay inside the schedule's domain.

A grid may start at alpha = 0 (t = 1 on a flow), where s = inf: the first step is then taken in x as
Euler's limit, x_1 = (sigma_1 / sigma_0) x_0 + alpha_1 D(x_0) (the first step of every other solver
here; diffusers' ``FlowMatchEulerDiscreteScheduler`` takes the same step), without churn. Heun's
trapezoid over an infinite step has no limit, so that step is an Euler step for Heun too.

NFE: Euler N; Heun 2N, less one for each end of the grid where s is 0 (the last step, at sigma = 0)
or infinite (the first, at alpha = 0): those steps are Euler steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Option, register

_CHURN_OPTIONS = [
    Option("s_churn", float, "EDM's S_churn: extra noise per step (0: the ODE)", low=0.0, flag="churn"),
    Option("s_tmin", float, "churn only for sigma >= S_tmin", low=0.0),
    Option("s_tmax", float, "churn only for sigma <= S_tmax", low=0.0),
    Option("s_noise", float, "EDM's S_noise: scale of the churn noise", low=0.0),
]


def _edm_loop(
    denoise, x, ts, schedule, *, second_order, s_churn, s_tmin, s_tmax, s_noise, key, return_trajectory
):
    core.validate(x, ts, schedule, key=key, needs_key=s_churn > 0)
    dtype = x.dtype
    ts = jnp.asarray(ts, dtype)
    n_steps = ts.shape[0] - 1
    # A first t = 1 (alpha = 0) has s = inf and x_hat = x / 0, a last t = 0 has s = 0 (lambda = inf):
    # finite stand-ins take their places in these tables (so that no NaN reaches a gradient), the
    # first step is taken in x (see ``first_from_noise``) and the last level is set to 0.
    grid = core.grid_values(ts, schedule, dtype)
    first_noise, t_safe = grid.first_noise, grid.t
    levels = schedule.edm_sigma(t_safe)
    levels = levels.at[-1].set(jnp.where(grid.final_zero, 0.0, levels[-1]))
    scale = schedule.alpha(t_safe.at[-1].set(ts[-1]))
    gamma_max = min(s_churn / n_steps, math.sqrt(2.0) - 1.0)

    def d_of(x_hat, s, t):
        return (x_hat - denoise(x_hat * schedule.alpha(t).astype(dtype), t).astype(dtype)) / s

    def step(x_hat, i, heun_step):
        s_cur, s_next, t_cur, t_next = levels[i], levels[i + 1], ts[i], ts[i + 1]
        if s_churn > 0:
            inside = (s_cur >= s_tmin) & (s_cur <= s_tmax)
            s_up = s_cur * (1.0 + jnp.where(inside, gamma_max, 0.0))
            t_cur = jnp.where(inside, schedule.t_from_lam(-jnp.log(s_up)).astype(dtype), t_cur)
            noise = core.normal(key, i, x_hat.shape, dtype)
            x_hat = x_hat + core.safe_sqrt(s_up**2 - s_cur**2) * s_noise * noise
            s_cur = s_up
        d = d_of(x_hat, s_cur, t_cur)
        x_next = x_hat + (s_next - s_cur) * d
        if heun_step:
            d_next = d_of(x_next, s_next, t_next)
            x_next = x_hat + (s_next - s_cur) * 0.5 * (d + d_next)
        return x_next

    def step_k(x_hat, i):
        """Step ``i`` (static): into sigma = 0 the Heun correction is undefined, and EDM takes an Euler
        step there (one model call)."""
        if second_order and schedule.zero_end and i == n_steps - 1:
            return jax.lax.cond(levels[-1] > 0, lambda y: step(y, i, True), lambda y: step(y, i, False), x_hat)
        return step(x_hat, i, second_order)

    def first_from_noise(x):
        """The first step from s = inf, in x: Euler's limit x_1 = (sigma_1 / sigma_0) x_0 + alpha_1 D(x_0),
        the exponential integrator's first step (Heun's trapezoid over an infinite step has no limit, so
        it is an Euler step, one model call; and there is no churn above an infinite noise level)."""
        x_1 = jnp.exp(schedule.log_sigma(ts[1]) - schedule.log_sigma(ts[0])).astype(dtype) * x
        x_1 = x_1 + schedule.alpha(ts[1]).astype(dtype) * denoise(x, ts[0]).astype(dtype)
        return x_1 / scale[1]

    def body(x_hat, i):
        x_next = step(x_hat, i, second_order)
        return x_next, (x_hat if return_trajectory else None)

    x_hat = x / scale[0]
    start = 0
    if schedule.noise_start:  # step 0 here: from x at a noise start, from x_hat otherwise
        x_hat = jax.lax.cond(first_noise, first_from_noise, lambda y: step_k(y / scale[0], 0), x)
        start = 1
    if start < n_steps:
        x_hat, traj = jax.lax.scan(body, x_hat, jnp.arange(start, n_steps - 1))
        x_end = step_k(x_hat, n_steps - 1)
        hats = [traj, x_hat[None], x_end[None]] if return_trajectory else []
    else:
        x_end = x_hat
        hats = [x_end[None]]
    if return_trajectory:
        out = jnp.concatenate(hats) * scale[start:].reshape((-1,) + (1,) * x.ndim)
        return jnp.concatenate([x[None], out]) if start else out
    return x_end * scale[-1]


def _edm_solver(second_order: bool, name: str, doc: str):
    def solver(
        denoise, x, ts, schedule, *, s_churn: float = 0.0, s_tmin: float = 0.0,
        s_tmax: float = float("inf"), s_noise: float = 1.0, key=None, return_trajectory: bool = False,
    ):
        return _edm_loop(
            denoise, x, ts, schedule, second_order=second_order, s_churn=s_churn, s_tmin=s_tmin,
            s_tmax=s_tmax, s_noise=s_noise, key=key, return_trajectory=return_trajectory,
        )

    solver.__name__ = solver.__qualname__ = name
    solver.__doc__ = doc
    # Heun: two model calls per step, one on a last step into sigma = 0 (an Euler step there).
    return register(
        name, solver, options=_CHURN_OPTIONS, label="Heun (EDM)" if second_order else "Euler (EDM)",
        order=2 if second_order else 1, needs_key=lambda o: o["s_churn"] > 0, ode_options=dict(s_churn=0.0),
        calls_per_step=2 if second_order else 1, final_zero_calls=1 if second_order else None,
    )


euler = _edm_solver(False, "euler", "Euler steps on the EDM ODE (with optional churn). Deterministically identical to DDIM.")
heun = _edm_solver(True, "heun", "EDM's Heun sampler, Algorithm 2 (deterministic with the default ``s_churn = 0``).")

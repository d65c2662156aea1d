"""The exponential-integrator core shared by DDIM, DPM-Solver++, UniPC, SA-Solver, DEIS and iPNDM.

Every multistep solver of this package is one update rule in half-log-SNR lambda. Going from s to t
(h = lam_t - lam_s > 0) with stochasticity tau (z = (1 + tau^2) h)::

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s  +  sum_j w_j X_j  +  sigma_t sqrt(1 - e^{-2 tau^2 h}) xi

where the X_j are data predictions at the nodes r_j = (lam_j - lam_s) / h (r = 0 the current point,
r < 0 past points, r = 1 the target for a corrector). Interpolating X by the Lagrange polynomial
through the nodes and integrating it exactly against the exponential kernel gives

    w = alpha_t z V^{-T} g,     V[j, k] = r_j^k,     g_k = k! phi_{k+1}(-z) = int_0^1 e^{-z (1-u)} u^k du.

The solvers differ only in which nodes they use at each step (the order schedule), whether a
corrector follows, and small changes to the moments g: UniPC's "B(h)" shortcut at order 2 replaces
g_1, DPM-Solver++(3M) as the other libraries compute it halves g_2. All coefficients are computed in
JAX from the lambda grid, so they follow ``ts`` under ``jax.grad``.

Noise-prediction plans (``Plan.prediction = 'noise'``, the ODE only) interpolate E = (x - alpha X) /
sigma instead, in the form x_t / alpha_t = x_s / alpha_s + int E d rho (rho = sigma / alpha =
e^{-lambda}), with the interpolation variable ``Plan.variable``:

* 'lambda': w = -sigma_t h V^{-T} g(-h), the exact moments of the kernel e^{h (1-u)} (DEIS "log-rho");
* 't': the same kernel with the polynomial in the schedule's time t: g_k = int_0^1 e^{h(1-u)} v(u)^k du,
  v the normalized t along the step, by Gauss-Legendre quadrature in lambda (DEIS "tAB");
* 'rho': a plain Adams method in rho, w = alpha_t (rho_t - rho_s) V^{-T} [1 / (k + 1)] (DEIS "rhoAB",
  iPNDM_v); with ``equal_steps`` the nodes are r_j = -j whatever the grid, which gives the classical
  fixed Adams-Bashforth coefficients (iPNDM).

A grid may start at alpha = 0 (t = 1 on a flow, ``Schedule.noise_start``), where lambda = -inf: the
first step is then infinitely long in lambda, and every coefficient takes its limit h -> inf. The
kernel concentrates at the step's end (z g_k -> 1 for every k), so the first step is
x_1 = (sigma_1 / sigma_0) d x_0 + alpha_1 X_0 + sigma_1 sqrt(1 - d^2) xi, with d = e^{-tau^2 h} -> 0 where
tau > 0 and 1 where tau = 0 (DDIM passes its own, sqrt(1 - eta^2)); a corrector of that step weights
the target's prediction by its limit (all of it, or half with bh2; bh1's B(h) = h has no limit there and
the exact moments are used instead). Later steps drop the node at lambda = -inf from their polynomial
(its Lagrange weight tends to 0), keeping the moments of their nominal order; a polynomial in t keeps it
(t = 1 is finite), as do the fixed equal-step coefficients. The grid's first point is replaced by a
finite stand-in for the other coefficients, so no inf or NaN reaches them or their gradients.

The sampling loop is one ``lax.scan`` with a fixed-size history of the predictions (PEC: the model
is evaluated once per step, at the predicted point; the corrector reuses that evaluation). Without a
network a step is bound by memory traffic, so it is written to read each state-sized array about
once: the history is a ring buffer updated in place, and each result is one fused kernel
(``benchmarks/solver_passes.py`` counts the passes in the compiled program).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.schedules import Schedule

__all__ = [
    "Plan", "moments", "node_weights", "multistep", "validate", "check_order", "normal", "safe_sqrt",
    "resolve_tau", "lower_order_schedule", "predictor_tables",
]

_SERIES_TERMS = 24  # |z| < 1: the remainder z^24 / 24! is far below float64 precision
_SHORTCUTS = ("exact", "bh1", "bh2")
_PREDICTIONS = ("data", "noise")
_VARIABLES = ("lambda", "t", "rho")
_QUADRATURE = np.polynomial.legendre.leggauss(32)  # the 't' moments: exact for degree < 64


# --------------------------------------------------------------------------------------------
# Coefficients


def safe_sqrt(u):
    """sqrt(u) for u >= 0 whose gradient is 0 (not NaN) at u = 0."""
    pos = u > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, u, 1.0)), 0.0)


def moments(z, n: int):
    """g_k = k! phi_{k+1}(-z) = int_0^1 e^{-z(1-u)} u^k du for k = 0..n-1, for real z (any shape).

    z >= 0 is the data-prediction kernel, z = -h the noise-prediction one. A power series for
    |z| < 1 and the recursion g_k = (1 - k g_{k-1}) / z otherwise; both branches are masked so that
    gradients stay finite.
    """
    z = jnp.asarray(z)
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, z, 0.5)
    zb = jnp.where(small, 1.5, z)
    out = []
    # Recursion for large z: g_0 = (1 - e^{-z}) / z, g_k = (1 - k g_{k-1}) / z.
    g_big = -jnp.expm1(-zb) / zb
    for k in range(n):
        if k > 0:
            g_big = (1.0 - k * g_big) / zb
        # Series: k! phi_{k+1}(-z) = sum_m (-z)^m k! / (m + k + 1)!.
        term = jnp.full_like(zs, 1.0 / (k + 1))
        g_small = term
        for m in range(1, _SERIES_TERMS):
            term = term * (-zs) / (m + k + 1)
            g_small = g_small + term
        out.append(jnp.where(small, g_small, g_big))
    return jnp.stack(out, axis=-1)


def node_weights(r, order, g, valid=None):
    """Solve the (masked) Vandermonde system V^T w = g for the first ``order`` nodes.

    ``r`` [n] nodes, ``g`` [n] moments, ``order`` <= n (may be traced). Inactive nodes get weight 0.
    ``valid`` (may be traced): only the first ``valid`` nodes are finite; the others (at lambda = -inf)
    are dropped together with the highest moments, which is the limit of the system as they recede.
    """
    n = r.shape[-1]
    if valid is not None:
        order = jnp.minimum(order, valid)
    powers = [jnp.ones_like(r)]
    for _ in range(1, n):
        powers.append(powers[-1] * r)  # products, not r**k: finite gradients at r = 0
    vt = jnp.stack(powers)  # vt[k, j] = r_j^k
    idx = jnp.arange(n)
    active = (idx[:, None] < order) & (idx[None, :] < order)
    mat = jnp.where(active, vt, jnp.eye(n, dtype=r.dtype))
    rhs = jnp.where(idx < order, g, 0.0)
    return jnp.linalg.solve(mat, rhs)


def _shortcut_g1(kind: str, g):
    """UniPC's order-2 'B(h)' shortcut: rho = 1/2 replaces g_1 by B(h) / (2 z)."""
    if kind == "bh1":  # B(h) = z
        return jnp.full_like(g[..., 1], 0.5)
    if kind == "bh2":  # B(h) = 1 - e^{-z} = z g_0
        return 0.5 * g[..., 0]
    return g[..., 1]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static recipe of a multistep solver on a grid of ``len(pred_order)`` steps.

    pred_order[k]: number of nodes of the predictor of step k (1 = DDIM step).
    corr_order[k]: number of nodes of the corrector of step k, target included (0 = none).
    pred_shortcut / corr_shortcut: 'exact', 'bh1' or 'bh2' for two-node predictors / correctors.
    halve_g2: DPM-Solver++(3M) as implemented elsewhere (the second-difference weight halved).
    prediction: 'data' (X) or 'noise' (E) is interpolated; variable: 'lambda', 't' or 'rho', the
    variable of the interpolating polynomial ('t' and 'rho' with 'noise' only; see the module doc).
    equal_steps: nodes at r = 0, -1, -2, ... (fixed classical coefficients) instead of the grid's.
    """

    pred_order: tuple
    corr_order: tuple
    pred_shortcut: str = "exact"
    corr_shortcut: str = "exact"
    halve_g2: bool = False
    prediction: str = "data"
    variable: str = "lambda"
    equal_steps: bool = False

    def __post_init__(self):
        assert len(self.pred_order) == len(self.corr_order)
        assert self.pred_shortcut in _SHORTCUTS and self.corr_shortcut in _SHORTCUTS
        assert self.prediction in _PREDICTIONS and self.variable in _VARIABLES
        assert self.variable == "lambda" or self.prediction == "noise", "'t' and 'rho' interpolate noise"
        if self.prediction == "noise":  # the shortcuts are data-prediction conventions
            assert (self.pred_shortcut, self.corr_shortcut, self.halve_g2) == ("exact", "exact", False)

    @property
    def history(self) -> int:
        return max(max(self.pred_order), max(self.corr_order) - 1, 1)


def _past_nodes(coord, step, n_nodes):
    """r[k, j] = (c_{k-j} - c_k) / (c_{k+1} - c_k) for j < n_nodes (indices below 0 repeat c_0; masked)."""
    n_steps = step.shape[0]
    k = np.arange(n_steps)[:, None]
    idx = np.maximum(k - np.arange(n_nodes)[None, :], 0)
    return (coord[idx] - coord[:-1][:, None]) / step[:, None]


def _t_moments(schedule: Schedule, lams, ts, n: int):
    """g_k = int_0^1 e^{h (1-u)} v(u)^k du, v the normalized time at lambda_s + u h (quadrature in u)."""
    x, w = (jnp.asarray(a, lams.dtype) for a in _QUADRATURE)
    u, w = 0.5 * (x + 1.0), 0.5 * w
    h = lams[1:] - lams[:-1]
    t_q = schedule.t_from_lam(lams[:-1, None] + h[:, None] * u).astype(lams.dtype)
    v = (t_q - ts[:-1, None]) / (ts[1:] - ts[:-1])[:, None]
    kernel = jnp.exp(h[:, None] * (1.0 - u)) * w
    powers = [jnp.ones_like(v)]
    for _ in range(1, n):
        powers.append(powers[-1] * v)
    return jnp.stack([jnp.sum(kernel * p, axis=1) for p in powers], axis=1)


class _Grid(NamedTuple):
    """The grid quantities the tables need. A final t = 0 and a first t = 1 (alpha = 0) are replaced
    by finite stand-ins here (``final_zero``, ``first_noise``); the steps they touch are rewritten by
    their limits in ``_tables`` and ``multistep``."""

    t: jax.Array
    lam: jax.Array
    log_sigma: jax.Array
    alpha: jax.Array
    log_alpha: jax.Array
    rho: jax.Array
    final_zero: jax.Array
    first_noise: jax.Array
    t_real: jax.Array      # the times as given (the model is called there)
    log_sigma0: jax.Array  # log sigma at the real first time


def _limit_moments(g, order, shortcut, halve):
    """The moments z g of the first step from alpha = 0 (z = inf): all 1 (the kernel sits at the step's
    end), with the data-prediction shortcuts of ``order`` applied; bh1's B(h) = h has no limit (exact)."""
    ones = jnp.ones_like(g)
    return _modified_moments(ones, order, "exact" if shortcut == "bh1" else shortcut, halve)


def _modified_moments(g, order, shortcut, halve):
    """UniPC's order-2 shortcut on g_1 and DPM-Solver++(3M)'s halved g_2 (``order`` [N], traced)."""
    n = g.shape[1]
    if n > 1:
        g = g.at[:, 1].set(jnp.where(order == 2, _shortcut_g1(shortcut, g), g[:, 1]))
    if halve and n > 2:
        g = g.at[:, 2].set(jnp.where(order == 3, 0.5 * g[:, 2], g[:, 2]))
    return g


def _tables(plan: Plan, schedule: Schedule, grid: _Grid, tau_sq, first_decay=None):
    """Per-step multipliers, weights and noise scales (all [N] or [N, n]) from the grid, and the weight
    of the raw data prediction (``None`` unless a noise-prediction plan may start at alpha = 0)."""
    lams = grid.lam
    h = lams[1:] - lams[:-1]
    z = (1.0 + tau_sq) * h
    noise_form = plan.prediction == "noise"
    if noise_form:
        mult = jnp.exp(grid.log_alpha[1:] - grid.log_alpha[:-1])
    else:
        mult = jnp.exp(grid.log_sigma[1:] - grid.log_sigma[:-1] - tau_sq * h)
    noise = jnp.exp(grid.log_sigma[1:]) * safe_sqrt(-jnp.expm1(-2.0 * tau_sq * h))
    t_nodes = grid.t.at[0].set(grid.t_real[0])  # a first t = 1 is a finite node of a polynomial in t
    coord = {"lambda": lams, "t": t_nodes, "rho": grid.rho}[plan.variable]
    step = coord[1:] - coord[:-1]
    if plan.variable == "rho":
        scale = jnp.exp(grid.log_alpha[1:]) * step
        base = lambda n: jnp.broadcast_to(1.0 / jnp.arange(1, n + 1, dtype=h.dtype), (h.shape[0], n))  # noqa: E731
    elif plan.variable == "t":
        scale = -jnp.exp(grid.log_sigma[1:]) * h
        base = lambda n: _t_moments(schedule, lams, grid.t, n)  # noqa: E731
    elif noise_form:
        scale = -jnp.exp(grid.log_sigma[1:]) * h
        base = lambda n: moments(-h, n)  # noqa: E731
    else:
        scale = grid.alpha[1:] * z
        base = lambda n: moments(z, n)  # noqa: E731

    n_steps = h.shape[0]
    k = jnp.arange(n_steps)
    first_step = (k == 0) & grid.first_noise
    # Nodes at lambda = -inf (rho = inf): the first point, seen from a later step, unless the polynomial
    # is in t or has fixed coefficients. Predictor nodes are ages 0, 1, ...; the corrector's start with
    # the target, so the first point is node k (predictor) or k + 1 (corrector) of step k.
    drops = schedule.noise_start and plan.variable != "t" and not plan.equal_steps
    big = jnp.full_like(k, 1 << 20)
    valid_pred = jnp.where(grid.first_noise & (k > 0), k, big) if drops else None
    valid_corr = jnp.where(grid.first_noise & (k > 0), k + 1, big) if drops else None

    def nodes(n):
        if plan.equal_steps:
            return jnp.broadcast_to(-jnp.arange(n, dtype=h.dtype), (h.shape[0], n))
        return _past_nodes(coord, step, n)

    def weights(r, order, shortcut, halve, valid):
        g = _modified_moments(base(r.shape[1]), order, shortcut, halve)
        w_scale = scale
        if schedule.noise_start and not noise_form:  # the first step from alpha = 0: its limit
            g = jnp.where(first_step[:, None], _limit_moments(g, order, shortcut, halve), g)
            w_scale = jnp.where(first_step, grid.alpha[1], scale)
        if valid is None:
            w = jax.vmap(node_weights)(r, order, g)
        else:
            w = jax.vmap(node_weights)(r, order, g, valid)
        return w_scale[:, None] * w

    r_pred = nodes(plan.history)
    wp = weights(r_pred, jnp.asarray(plan.pred_order), plan.pred_shortcut, plan.halve_g2, valid_pred)
    # Corrector nodes: the target (r = 1), then the current and past points.
    r_corr = jnp.concatenate([jnp.ones_like(r_pred[:, :1]), r_pred], axis=1)
    wc = weights(r_corr, jnp.asarray(plan.corr_order), plan.corr_shortcut, False, valid_corr)

    w_raw = None
    if schedule.noise_start:
        sigma1 = jnp.exp(grid.log_sigma[1])
        if first_decay is None:
            first_decay = jnp.where(tau_sq[0] > 0, 0.0, 1.0)
        first_decay = jnp.asarray(first_decay, h.dtype)
        if noise_form:  # x_1 = alpha_1 X_0 + sigma_1 E_0: the raw data prediction carries alpha_1
            mult0 = jnp.zeros_like(mult[0])
            wp = jnp.where(first_step[:, None], sigma1 * jnp.eye(wp.shape[1], dtype=h.dtype)[0], wp)
            w_raw = jnp.where(first_step, grid.alpha[1], 0.0)
        else:
            mult0 = jnp.exp(grid.log_sigma[1] - grid.log_sigma0) * first_decay
        mult = jnp.where(first_step, mult0, mult)
        noise = jnp.where(first_step, sigma1 * safe_sqrt(1.0 - first_decay**2), noise)
    return mult, wp, wc, noise, w_raw


# --------------------------------------------------------------------------------------------
# Noise


def _is_batched_key(key) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def normal(key, step, shape, dtype):
    """Standard normal noise for ``step``: from ``fold_in(key, step)``.

    ``key`` may be one key or one key per sample (leading axis = batch); then each sample's noise
    depends on its own key only, so results do not depend on how samples are batched.
    """
    if _is_batched_key(key):
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, step)
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)
    return jax.random.normal(jax.random.fold_in(key, step), shape, dtype)


# --------------------------------------------------------------------------------------------
# Validation (runs on concrete values, before any tracing)


def _concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def validate(x, ts, schedule: Schedule, *, key=None, needs_key: bool = False, min_steps: int = 1,
             noise_start: bool = True):
    """Check a sampling call; raises ``ValueError`` with what was wrong and what is allowed.
    ``noise_start=False``: the solver cannot start at alpha = 0 (t = 1 on a flow schedule)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a jdiffsample.schedules.Schedule, got {type(schedule).__name__}")
    if jnp.ndim(x) < 1:
        raise ValueError("x must be a batch: an array with a leading batch axis")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"x must be a floating-point array, got {jnp.result_type(x)}")
    if jnp.ndim(ts) != 1:
        raise ValueError(f"ts must be a 1-D array of times, got shape {jnp.shape(ts)}")
    if jnp.shape(ts)[0] < 2:
        raise ValueError("ts needs at least 2 points (start and end)")
    n_steps = jnp.shape(ts)[0] - 1
    if n_steps < min_steps:
        raise ValueError(f"this solver configuration needs at least {min_steps} steps, got a grid of {n_steps}")
    if _concrete(ts):
        t = np.asarray(ts, dtype=np.float64)
        if not np.all(np.diff(t) < 0):
            raise ValueError(f"ts must be strictly decreasing (from noise to data), got {t}")
        schedule.check_times(t)
        if not noise_start and schedule.noise_start and t[0] >= 1:
            raise ValueError(f"this solver cannot start from pure noise (t = {t[0]:g}, alpha = 0): start the grid "
                             f"below t = 1, e.g. at the schedule's t_max = {schedule.t_max:g}")
    if needs_key and key is None:
        raise ValueError("this solver is stochastic with these options: pass key=jax.random.key(seed)")
    if key is not None and _concrete(key) and _is_batched_key(key) and key.shape[0] != jnp.shape(x)[0]:
        raise ValueError(f"a batch of keys must have one key per sample: {key.shape[0]} keys, batch {jnp.shape(x)[0]}")


def check_order(name: str, value, lo: int, hi: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# The sampling loop


def grid_values(ts, schedule: Schedule, dtype) -> _Grid:
    """lambda, log sigma, alpha, ... on the grid, with whether it ends at sigma = 0 (``final_zero``) or
    starts at alpha = 0 (``first_noise``).

    A final sigma = 0 or a first alpha = 0 makes lambda infinite; such a point is replaced by a finite
    stand-in here (``t``, ``lam``, ... hold the stand-ins; ``t_real`` the times as given) and the steps
    it touches are rewritten by their limits by the caller, so no inf or NaN reaches the coefficients
    or their gradients.
    """
    ts = jnp.asarray(ts, dtype)
    t_safe = ts
    final_zero = first_noise = jnp.asarray(False)
    if schedule.zero_end:
        final_zero = ts[-1] == 0
        t_safe = t_safe.at[-1].set(jnp.where(final_zero, ts[-2] * 0.5, ts[-1]))
    if schedule.noise_start:
        first_noise = ts[0] >= 1
        t_safe = t_safe.at[0].set(jnp.where(first_noise, 0.5 * (1.0 + t_safe[1]), ts[0]))
    lams = schedule.lam(t_safe)
    log_sigma = schedule.log_sigma(t_safe)
    log_alpha = schedule.log_alpha(t_safe).astype(dtype)
    # log sigma at the real first time (finite at alpha = 0, where sigma is largest)
    log_sigma0 = schedule.log_sigma(ts[0]) if schedule.noise_start else log_sigma[0]
    return _Grid(t_safe, lams, log_sigma, schedule.alpha(t_safe), log_alpha, jnp.exp(-lams), final_zero,
                 first_noise, ts, log_sigma0)


def multistep(
    denoise: Callable,
    x,
    ts,
    schedule: Schedule,
    plan: Plan,
    tau_sq=None,
    *,
    key=None,
    return_trajectory: bool = False,
    first_decay=None,
):
    """Run a predictor(-corrector) exponential Adams method as one ``lax.scan``.

    ``tau_sq`` [N] (or None for the ODE): stochasticity per step (data-prediction plans only). The
    model is called once per step (N calls for N steps): at t_k on the state predicted for t_k.
    ``first_decay``: e^{-tau^2 h} of a first step from alpha = 0 (h = inf), where tau^2 alone does not
    fix it (default: 0 where tau > 0 on that step, else 1; see the module doc).
    """
    dtype = x.dtype
    n_steps = len(plan.pred_order)
    noise_form = plan.prediction == "noise"
    if noise_form and tau_sq is not None:
        raise ValueError("noise-prediction plans integrate the ODE only (tau must be None)")
    grid = grid_values(ts, schedule, dtype)
    stochastic = tau_sq is not None
    tau_sq = jnp.zeros(n_steps, dtype) if tau_sq is None else jnp.asarray(tau_sq, dtype)
    mult, wp, wc, noise_std, w_raw = _tables(plan, schedule, grid, tau_sq, first_decay)

    # The step into sigma = 0 returns the current data prediction X (= (x - sigma E) / alpha, or the
    # model's own X where the plan keeps it: from alpha = 0 that quotient has no value).
    last = n_steps - 1
    is_last_zero = (jnp.arange(n_steps) == last) & grid.final_zero
    noise_std = jnp.where(is_last_zero, 0.0, noise_std)
    first = jnp.eye(wp.shape[1], dtype=dtype)[0]
    if w_raw is not None:
        end_mult, end_w = 0.0, 0.0 * first
        w_raw = jnp.where(is_last_zero, 1.0, w_raw)
    elif noise_form:
        end_mult, end_w = jnp.exp(-grid.log_alpha[-2]), -grid.rho[-2] * first
    else:
        end_mult, end_w = 0.0, first
    mult = jnp.where(is_last_zero, end_mult, mult)
    wp = jnp.where(is_last_zero[:, None], end_w, wp)

    # History: a ring buffer of the predictions (X, or E). Step k first stores its own in slot k % S
    # (S = H + 1 slots) and then reads the prediction of age a (step k - a) from slot (k - a) % S:
    # the slot overwritten held age S, which no step reads (the corrector reads ages 0..H, the
    # predictor 0..H-1), so every read comes after the write it depends on and the buffer is updated
    # in place, without copies.
    hist_len = plan.history
    slots = hist_len + 1
    xs = dict(t=grid.t_real[:-1], step=jnp.arange(n_steps), mult=mult, noise=noise_std, wp=wp[:, :hist_len])
    if noise_form:  # the model's output is stored as E = (x - alpha X) / sigma (alpha = 0 at a noise start)
        alpha = grid.alpha.at[0].set(jnp.where(grid.first_noise, 0.0, grid.alpha[0]))
        sigma = jnp.exp(grid.log_sigma.at[0].set(grid.log_sigma0))
        xs.update(alpha=alpha[:-1], sigma=sigma[:-1])
    if w_raw is not None:
        xs["w_raw"] = w_raw

    # The corrector of step k is applied at the start of step k + 1, after the model call at t_{k+1}:
    # its nodes (the target, the current point, the past ones) are then of ages 0, 1, ..., H. Its
    # first terms are the predictor's (the same base, mult x_k + noise xi, from the same state with the
    # same draw), so the corrected state is the predicted one plus the difference of the two weightings:
    #     x_c = x_eval + wc[k] . (D ages 0..H) - wp[k] . (D ages 1..H).
    # The loop then carries only the predicted state, and the corrected one lives inside the kernel
    # that computes the next prediction (one kernel reading x_eval and the history once; XLA:CPU has
    # no multi-output fusion, so carrying the corrected state cost it a kernel of its own). Steps
    # without a corrector (step 0 among them) get zero weights: x_c = x_eval.
    use_corrector = max(plan.corr_order) > 0
    if use_corrector:
        has_corr = jnp.asarray(np.asarray(plan.corr_order[:-1]) > 0)[:, None]
        delta = wc[:-1, : hist_len + 1] - jnp.pad(wp[:-1, :hist_len], ((0, 0), (1, 0)))
        xs["c_w"] = jnp.concatenate([jnp.zeros_like(delta[:1]), jnp.where(has_corr, delta, 0.0)])

    # The weighted sums are written out age by age (in the order of the dot product over the stacked
    # history they replace), so that XLA fuses them with the rest of the update: one kernel per
    # step, reading each array it needs once. A dot product was a kernel of its own, whose result
    # another kernel read back.
    def weighted(weights, hist, step, n):
        ages = [jax.lax.dynamic_index_in_dim(hist, (step - a) % slots, keepdims=False) for a in range(n)]
        total = weights[0] * ages[0]
        for a in range(1, n):
            total = total + weights[a] * ages[a]
        return total

    def step(carry, s):
        x_eval, hist = carry
        m = raw = denoise(x_eval, s["t"]).astype(dtype)
        if noise_form:
            m = (x_eval - s["alpha"] * m) / s["sigma"]
        hist = jax.lax.dynamic_update_index_in_dim(hist, m, s["step"] % slots, 0)
        x_cur = x_eval + weighted(s["c_w"], hist, s["step"], hist_len + 1) if use_corrector else x_eval
        base = s["mult"] * x_cur
        if stochastic:
            base = base + s["noise"] * normal(key, s["step"], x.shape, dtype)
        x_next = base + weighted(s["wp"], hist, s["step"], hist_len)
        if w_raw is not None:
            x_next = x_next + s["w_raw"] * raw
        return (x_next, hist), (x_cur if return_trajectory else None)

    init = (x, jnp.zeros((slots, *x.shape), dtype))
    (x_final, _), traj = jax.lax.scan(step, init, xs)
    if return_trajectory:
        return jnp.concatenate([traj, x_final[None]])
    return x_final


def predictor_tables(plan: Plan, ts, schedule: Schedule, dtype):
    """``(alpha, sigma, mult, wp)`` [N + 1], [N + 1], [N], [N, H] of a deterministic plan: the step
    x_{k+1} = mult[k] x_k + sum_j wp[k, j] P_{k-j} (P the stored predictions), for solvers that
    change the update itself (PAS). A final t = 0 is replaced by a finite stand-in (see
    :func:`grid_values`); the caller handles that step."""
    grid = grid_values(ts, schedule, dtype)
    mult, wp, _, _, _ = _tables(plan, schedule, grid, jnp.zeros(len(plan.pred_order), dtype))
    return grid.alpha, jnp.exp(grid.log_sigma), mult, wp[:, : plan.history]


def resolve_tau(tau, ts, dtype):
    """tau as a constant or a function of t, evaluated at the target time of each step -> tau^2 [N]."""
    targets = jnp.asarray(ts, dtype)[1:]
    if callable(tau):
        values = jax.vmap(tau)(targets)
    else:
        values = jnp.broadcast_to(jnp.asarray(tau, dtype), targets.shape)
    return jnp.square(values.astype(dtype))


def lower_order_schedule(order: int, n_steps: int, lower_order_final: bool, warmup_extra: int = 0) -> list:
    """min(order, k + 1 + warmup_extra, N - k (if lower_order_final)) for k = 0..N-1."""
    out = []
    for k in range(n_steps):
        p = min(order, k + 1 + warmup_extra)
        if lower_order_final:
            p = min(p, n_steps - k + warmup_extra)
        out.append(max(p, 1))
    return out


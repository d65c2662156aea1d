"""EPD-Solver (Zhu et al., ICCV 2025, "Distilling Parallel Gradients for Fast ODE Solvers of
Diffusion Models"): several model evaluations per step at learned intermediate times, combined
with learned weights. Its step is also AMED-Solver's (:mod:`jdiffsample.solvers.amed`, one point).

In EDM coordinates x_hat = x / alpha and noise level s = sigma / alpha = e^{-lambda} (for ``VE``
the schedule's own), a step from s_k to s_{k+1} with K points j reads::

    d    = (x_hat - D(x_hat; s_k)) / s_k                    (AFS, ``afs=True``, on the first step:
                                                             d = x_hat / sqrt(1 + s_k^2), no call)
    s_j  = s_k (s_{k+1} / s_k)^{r_j}                        (r_j in [0, 1]: lambda moves by r_j h)
    y_j  = x_hat + (s_j - s_k) d
    d_j  = (y_j - D(y_j; a_j s_j)) / s_j                    (a_j: "scale_time", the model's level)
    x_hat' = x_hat + (s_{k+1} - s_k) sum_j w_j c_j d_j      (w on the simplex, c_j: "scale_dir")

The K evaluations of a step are independent: they run as one batched call (``jax.vmap`` over the
points, so a sharded batch evaluates them in parallel). The authors count a step as 2 sequential
evaluations whatever K (their NFE: 2 N, 2 N - 1 with AFS, "the latency of 2 N - 1 NFE"); the
registry records that as the NFE and (K + 1) N - AFS network evaluations in all
(``registry.get('epd').evaluations``). A last step into sigma = 0 returns D(x_hat; s_k) (one call).

Learned parameters (one pytree, the solver's ``params``; ``init``: r_j = j / (K + 1), equal
weights, scales 1)::

    {"r": [N, K] in [0, 1], "weights": [N, K] on the simplex,
     "scale_dir": [N, K] in [1 - scale_dir, 1 + scale_dir], "scale_time": [N, K] in [1 - scale_time, 1 + scale_time]}

The authors' predictor stores unconstrained values mapped by sigmoid / softmax; here the values
themselves are the parameters, kept in range by projection after each training step, so that the
files read plainly and the exact reductions are representable: one point with r = 0, weight 1
and scales 1 is Euler (= DDIM), two points at r = (0, 1) with weights (1/2, 1/2) are EDM's Heun.
The per-sample form (values ``[B, K]``) is AMED's network form; see :func:`step_loop`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.solvers import core
from jdiffsample.solvers.registry import Learned, Option, register

__all__ = ["epd", "step_loop", "check_tree", "check_range", "clip_range", "bound_steps"]

_KEYS = ("r", "weights", "scale_dir", "scale_time")


# --------------------------------------------------------------------------------------------
# The step loop (shared with AMED)


def _per_sample(v, ndim):
    """A per-point value [K] (per step) or [B, K] (per sample) -> [K, 1...] or [K, B, 1...]."""
    v = jnp.moveaxis(v, -1, 0)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim + 1))


def step_loop(denoise, x, ts, schedule, predict: Callable, *, afs: bool, return_trajectory: bool):
    """Run the EPD step (module doc) as one ``lax.scan``.

    ``predict(step, features, s_cur, s_next) -> (r, scale_dir, scale_time, weights)``: the points of
    ``step`` (traced), each ``[K]`` (per step) or ``[B, K]`` (per sample: the model is then called
    with a time per sample, ``t`` of shape [B], which the EDM networks accept). ``features``: the
    current direction d ([B, ...], zeros on an AFS step). Returns the final state or the N + 1
    states at the grid times, in the schedule's coordinates. The first step's AFS and a last step
    into sigma = 0 are branches (``lax.cond``) of the one loop body, so the program holds the
    network twice: the current point's call and the points' batched call.
    """
    dtype = x.dtype
    n_steps = len(ts) - 1
    grid = core.grid_values(ts, schedule, dtype)
    t_safe, lams, final_zero = grid.t, grid.lam, grid.final_zero
    levels = jnp.exp(-lams)  # s = sigma / alpha at each grid time (a final 0 replaced by a stand-in)
    scale = schedule.alpha(jnp.asarray(ts, dtype)).astype(dtype)

    def model(x_hat, t):
        return denoise(x_hat * _expand(schedule.alpha(t).astype(dtype), x_hat.ndim), t).astype(dtype)

    def body(x_hat, k):
        s_cur, s_next, t_cur, lam_cur = levels[k], levels[k + 1], t_safe[k], lams[k]

        def evaluate(y):
            data = model(y, t_cur)
            d = (y - data) / s_cur
            return d, d, data

        def analytic(y):  # AFS: the noise direction of a data distribution small against s
            d = y / jnp.sqrt(1.0 + s_cur * s_cur)
            return d, jnp.zeros_like(y), y - s_cur * d

        d, features, data = jax.lax.cond(k == 0, analytic, evaluate, x_hat) if afs else evaluate(x_hat)

        def points(_):
            r, c, a, w = (jnp.asarray(v, dtype) for v in predict(k, features, s_cur, s_next))
            s_pt = s_cur * jnp.exp(r * jnp.log(s_next / s_cur))  # [K] or [B, K]
            lam_eval = lam_cur + r * (lams[k + 1] - lam_cur) - jnp.log(a)
            # the point's own time when it coincides with the current one (exact reductions)
            t_eval = jnp.where((r == 0) & (a == 1), t_cur, schedule.t_from_lam(lam_eval).astype(dtype))
            ys = x_hat[None] + _per_sample(s_pt - s_cur, x_hat.ndim) * d[None]
            ds = (ys - jax.vmap(model)(ys, jnp.moveaxis(t_eval, -1, 0))) / _per_sample(s_pt, x_hat.ndim)
            return x_hat + jnp.sum(_per_sample(w * c * (s_next - s_cur), x_hat.ndim) * ds, axis=0)

        if schedule.zero_end:  # into sigma = 0: the data prediction (alpha(0) = 1)
            x_next = jax.lax.cond(final_zero & (k == n_steps - 1), lambda _: data, points, None)
        else:
            x_next = points(None)
        return x_next, (x_next if return_trajectory else None)

    x_hat, traj = jax.lax.scan(body, x / scale[0], jnp.arange(n_steps))
    if not return_trajectory:
        return x_hat * scale[-1]
    return jnp.concatenate([(x / scale[0])[None], traj]) * _expand(scale, x.ndim + 1)


def _expand(v, ndim):
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


# --------------------------------------------------------------------------------------------
# Parameter checks shared by the learnable solvers


def check_tree(name: str, params, shapes: dict) -> None:
    """``params`` must be a dict with exactly ``shapes``' keys, each an array of that shape with
    finite values (shapes only while traced); ``ValueError`` otherwise."""
    if not isinstance(params, dict) or set(params) != set(shapes):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{name} parameters must be a dict with keys {sorted(shapes)}, got {got}")
    for key, shape in shapes.items():
        if isinstance(shape, dict):
            check_tree(f"{name}.{key}", params[key], shape)
            continue
        value = params[key]
        if tuple(np.shape(value)) != tuple(shape):
            raise ValueError(f"{name} parameter {key} must have shape {tuple(shape)} (for these steps and "
                             f"options), got {tuple(np.shape(value))}")
        if not isinstance(value, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(value, np.float64))):
            raise ValueError(f"{name} parameter {key} must be finite")


def check_range(name: str, key: str, value, lo: float, hi: float) -> None:
    """Values of ``value`` must lie in [lo, hi] (up to 1e-6: float32 bounds); skipped while traced."""
    if isinstance(value, jax.core.Tracer):
        return
    v = np.asarray(value, np.float64)
    if v.size and (v.min() < lo - 1e-6 or v.max() > hi + 1e-6):
        raise ValueError(f"{name} parameter {key} must lie in [{lo}, {hi}], got values in [{v.min():.6g}, {v.max():.6g}]")


def clip_range(value, bound: float):
    """Clip to [1 - bound, 1 + bound]."""
    return jnp.clip(value, 1.0 - bound, 1.0 + bound)


# --------------------------------------------------------------------------------------------
# EPD


def _init(n_steps, o):
    k = o["points"]
    full = lambda v: jnp.full((n_steps, k), v)  # noqa: E731
    r = jnp.broadcast_to(jnp.arange(1, k + 1) / (k + 1), (n_steps, k))
    return dict(r=jnp.asarray(r), weights=full(1.0 / k), scale_dir=full(1.0), scale_time=full(1.0))


def _neutral(n_steps, o):
    k = o["points"]
    weights = jnp.zeros((n_steps, k)).at[:, 0].set(1.0)
    ones = jnp.ones((n_steps, k))
    return dict(r=jnp.zeros((n_steps, k)), weights=weights, scale_dir=ones, scale_time=ones)


def _check(params, n_steps, o):
    k = o["points"]
    check_tree("epd", params, {key: (n_steps, k) for key in _KEYS})
    check_range("epd", "r", params["r"], 0.0, 1.0)
    check_range("epd", "weights", params["weights"], 0.0, 1.0)
    if not isinstance(params["weights"], jax.core.Tracer):
        sums = np.asarray(params["weights"], np.float64).sum(axis=1)
        if np.any(np.abs(sums - 1.0) > 1e-6):
            raise ValueError(f"epd parameter weights must sum to 1 over the points of each step, got sums {sums}")
    for key in ("scale_dir", "scale_time"):
        check_range("epd", key, params[key], 1.0 - o[key], 1.0 + o[key])


def _project_simplex(v):
    """Euclidean projection of each row onto the probability simplex (sort and threshold)."""
    u = jnp.sort(v, axis=-1)[..., ::-1]
    excess = jnp.cumsum(u, axis=-1) - 1.0
    k = jnp.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    n_pos = jnp.sum(u - excess / k > 0, axis=-1, keepdims=True)
    theta = jnp.take_along_axis(excess, n_pos - 1, axis=-1) / n_pos
    return jnp.maximum(v - theta, 0.0)


def _project(params, o):
    return dict(r=jnp.clip(params["r"], 0.0, 1.0), weights=_project_simplex(params["weights"]),
                scale_dir=clip_range(params["scale_dir"], o["scale_dir"]),
                scale_time=clip_range(params["scale_time"], o["scale_time"]))


def bound_steps(params, o):
    """Optimizer step multipliers: 1, and each scale's bound for the scales (a step of the learning
    rate then moves a scale by that fraction of its range)."""
    return {k: jnp.full(jnp.shape(v), o[k] if k in ("scale_dir", "scale_time") else 1.0) for k, v in params.items()}


_RANGES = ("r in [0, 1]; weights >= 0 summing to 1 per step; scale_dir in [1 - scale_dir, 1 + scale_dir] and "
           "scale_time in [1 - scale_time, 1 + scale_time] (the options); shapes [N, points]")


def _evaluations(o):
    return o["points"] + 1


@register(
    "epd", noise_start=False,
    label=lambda o: f"EPD-{o['points']}{'-AFS' if o['afs'] else ''}", order=2, calls_per_step=2,
    final_zero_calls=1, saved_calls=lambda o: int(o["afs"]), evaluations=_evaluations,
    learned=Learned(init=_init, neutral=_neutral, base=lambda o: ("euler", {}), check=_check, project=_project,
                    ranges=_RANGES, learning_rate=5e-2, step_sizes=bound_steps),
    options=[
        Option("points", int, "EPD: intermediate points per step, evaluated in parallel", low=1, high=8),
        Option("afs", bool, "analytic first step: the first direction without a model call (saves one)"),
        Option("scale_dir", float, "bound b of the learned direction scales, in [1 - b, 1 + b]", low=0.0, high=0.5),
        Option("scale_time", float, "bound b of the learned model-time scales, in [1 - b, 1 + b]", low=0.0,
               high=0.5),
    ])
def epd(
    denoise, x, ts, schedule, *, points: int = 2, afs: bool = False, scale_dir: float = 0.05,
    scale_time: float = 0.05, params=None, key=None, return_trajectory: bool = False,
):
    """Sample with EPD-Solver: ``points`` parallel evaluations per step at learned times (``params``;
    None: the untrained ones)."""
    core.validate(x, ts, schedule, key=key, noise_start=False)
    n_steps = len(ts) - 1
    options = dict(points=points, afs=afs, scale_dir=scale_dir, scale_time=scale_time)
    params = _init(n_steps, options) if params is None else params
    _check(params, n_steps, options)

    def predict(k, features, s_cur, s_next):
        return tuple(params[key][k] for key in ("r", "scale_dir", "scale_time", "weights"))

    return step_loop(denoise, x, ts, schedule, predict, afs=afs, return_trajectory=return_trajectory)

"""PAS (Wang et al., ICML 2025, "Diffusion Sampling Correction via Approximately 10 Parameters"): a
learned correction of a solver's sampling direction in a few PCA coordinates of the trajectory.

The base solver (``base``: DDIM, iPNDM or DEIS, as in the paper) moves, in EDM coordinates x_hat =
x / alpha and rho = sigma / alpha, by x_hat' = x_hat + (rho' - rho) d with d its combination of the
noise predictions. On a corrected step PAS replaces d by sum_j c_j u_j, c the step's learned
coordinates and u an orthonormal basis: u_1 = d / |d|, then the ``pca`` - 1 leading principal
directions of the buffer of past directions (the starting point x_hat_T first with ``xt``, and d
itself; centred over the buffer), Gram-Schmidt-orthogonalized against the earlier u and signed to
point along x_hat - x_hat_T (along x_hat_T on the first step, where that is 0). As in the authors'
sampler (``pas_solvers.py``), a corrected step leaves both its uncorrected and its corrected
direction in the buffer (their search script keeps only the corrected one).

Parameters (one pytree, the solver's ``params``)::

    {"coordinates": [N, pca] (any finite values), "corrected": [N] (0 or 1: whether step k is corrected)}

Coordinates are absolute and shared by the batch, as the authors' (their search starts the first
at the batch's mean |d| and the others at 0: ``learned.prepare``). ``relative=True`` scales them by
each sample's |d| instead (d_new = |d| sum_j c_j u_j, starting from c = (1, 0, ...), the base
itself): the authors' form replaces every sample's step length by one shared value, which costs
accuracy where |d| varies between samples (low-dimensional data). A step can be corrected only
when the buffer's principal directions are all defined, xt + k >= pca - 1 (the authors also
correct one step earlier, with a last direction of zero variance that their randomized PCA fills
arbitrarily). No step corrected (the untrained parameters) is the base solver exactly. Each
principal direction is differentiable (the eigenvector derivative, with the terms of equal
eigenvalues dropped), so the coordinates learn through the whole ``lax.scan``. One model call per
step; ODE only; a last step into sigma = 0 returns the data prediction, uncorrected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.solvers import core
from jdiffsample.solvers.deis import VARIANTS
from jdiffsample.solvers.epd import check_tree
from jdiffsample.solvers.registry import Learned, Option, register

__all__ = ["pas", "pas_loop", "eligible", "base_options"]

_MAX_ORDER = dict(ddim=1, ipndm=4, deis=3)


def base_options(o) -> dict:
    """The options of the base solver that PAS with options ``o`` corrects."""
    if o["base"] == "ipndm":
        return dict(order=o["order"])
    if o["base"] == "deis":
        return dict(order=o["order"], variant=o["variant"], lower_order_final=False)
    return {}


def _plan(o, n_steps: int) -> core.Plan:
    order = o["order"] if o["base"] != "ddim" else 1
    if order > _MAX_ORDER[o["base"]]:
        raise ValueError(f"pas with base {o['base']} takes order 1 to {_MAX_ORDER[o['base']]}, got {order}")
    preds = tuple(core.lower_order_schedule(order, n_steps, False))
    variable = VARIANTS[o["variant"]] if o["base"] == "deis" else "rho"
    return core.Plan(preds, (0,) * n_steps, prediction="noise", variable=variable, equal_steps=o["base"] == "ipndm")


def eligible(n_steps: int, pca: int, xt: bool) -> np.ndarray:
    """Which steps can be corrected: those whose buffer has pca - 1 principal directions."""
    return np.arange(n_steps) + int(xt) >= pca - 1


# --------------------------------------------------------------------------------------------
# Principal directions


@jax.custom_jvp
def _eigh(g):
    w, v = jnp.linalg.eigh(g)
    return w, v


@_eigh.defjvp
def _eigh_jvp(primals, tangents):
    """The eigen-derivative dV = V (F o V^T dG V), F_ij = 1 / (w_j - w_i), with the pairs of (near)
    equal eigenvalues dropped: the buffer's zero-variance directions are never used, and their
    terms would be 0 / 0."""
    (g,), (dg,) = primals, tangents
    w, v = _eigh(g)
    dg = 0.5 * (dg + jnp.swapaxes(dg, -1, -2))
    vdv = jnp.swapaxes(v, -1, -2) @ dg @ v
    diff = w[..., None, :] - w[..., :, None]
    tol = 1e3 * jnp.finfo(g.dtype).eps * jnp.max(jnp.abs(w), axis=-1, keepdims=True)[..., None]
    apart = jnp.abs(diff) > tol
    f = jnp.where(apart, 1.0 / jnp.where(apart, diff, 1.0), 0.0)
    return (w, v), (jnp.diagonal(vdv, axis1=-2, axis2=-1), v @ (f * vdv))


def _unit(v, axis=-1):
    norm = core.safe_sqrt(jnp.sum(v * v, axis=axis, keepdims=True))
    return v / jnp.where(norm > 0, norm, 1.0)


def _basis(buf, count, d, flip, n_dirs: int):
    """u_1 = d / |d| and ``n_dirs`` principal directions of the buffer entries ``buf[:count]`` plus
    ``d`` (all [.., B, D]), orthogonalized and signed along ``flip``; [1 + n_dirs, B, D]."""
    u = [_unit(d)]
    if n_dirs:
        slots = buf.shape[0]
        rows = jnp.concatenate([buf, d[None]])  # d sits in the last row, always valid
        valid = (jnp.arange(slots + 1) < count) | (jnp.arange(slots + 1) == slots)
        mask = valid.astype(d.dtype)[:, None, None]
        mean = jnp.sum(rows * mask, axis=0) / (count + 1).astype(d.dtype)
        centred = (rows - mean) * mask
        gram = jnp.einsum("mbd,nbd->bmn", centred, centred)
        _, vecs = _eigh(gram)  # ascending eigenvalues
        lead = vecs[..., ::-1][..., :n_dirs]  # [B, M, n_dirs]
        for j in range(n_dirs):
            v = jnp.einsum("bm,mbd->bd", lead[..., j], centred)
            for prev in u:
                v = v - jnp.sum(prev * v, axis=-1, keepdims=True) * prev
            v = _unit(v)
            u.append(jnp.where(jnp.sum(flip * v, axis=-1, keepdims=True) > 0, v, -v))
    return jnp.stack(u)


# --------------------------------------------------------------------------------------------
# The loop


def pas_loop(denoise, x, ts, schedule, params, o, *, return_trajectory: bool = False, norms: bool = False):
    """PAS with options ``o`` as one ``lax.scan``; with ``norms`` also the batch-mean |d| of each step
    (the base direction, before any correction) [N]."""
    dtype = x.dtype
    n_steps = len(ts) - 1
    plan = _plan(o, n_steps)
    alpha, sigma, mult, wp = core.predictor_tables(plan, ts, schedule, dtype)
    final_zero = core.grid_values(ts, schedule, dtype).final_zero
    rho = sigma / alpha
    step_len = alpha[1:] * (rho[1:] - rho[:-1])  # x' = mult x + step_len d
    hist_len = plan.history
    slots = hist_len + 1
    shape = x.shape
    flat = lambda a: a.reshape(shape[0], -1)  # noqa: E731
    n_dirs = o["pca"] - 1
    buf_len = int(o["xt"]) + 2 * n_steps
    coords = jnp.asarray(params["coordinates"], dtype)
    corrected = (jnp.asarray(params["corrected"]) > 0.5) & jnp.asarray(eligible(n_steps, o["pca"], o["xt"]))
    is_last_zero = (jnp.arange(n_steps) == n_steps - 1) & final_zero
    x_start = flat(x / alpha[0])
    xs = dict(step=jnp.arange(n_steps), t=core.grid_values(ts, schedule, dtype).t[:-1], alpha=alpha[:-1],
              alpha_next=alpha[1:], sigma=sigma[:-1], mult=mult, wp=wp, step_len=step_len, coords=coords,
              corrected=corrected, last_zero=is_last_zero)

    def step(carry, s):
        x_cur, hist, buf, count = carry
        m = denoise(x_cur, s["t"]).astype(dtype)
        e = (x_cur - s["alpha"] * m) / s["sigma"]  # the noise prediction = the EDM direction
        hist = jax.lax.dynamic_update_index_in_dim(hist, e, s["step"] % slots, 0)
        ages = [jax.lax.dynamic_index_in_dim(hist, (s["step"] - a) % slots, keepdims=False) for a in range(hist_len)]
        pred = s["wp"][0] * ages[0]
        for a in range(1, hist_len):
            pred = pred + s["wp"][a] * ages[a]
        d = flat(pred / s["step_len"])
        x_hat = flat(x_cur / s["alpha"])
        flip = jnp.where(s["step"] == 0, x_start, x_hat - x_start)
        basis = _basis(buf, count, d, flip, n_dirs)
        d_new = jnp.tensordot(s["coords"], basis, axes=1)
        if o["relative"]:
            d_new = d_new * core.safe_sqrt(jnp.sum(d * d, axis=-1, keepdims=True))
        fix = s["corrected"]
        # the buffer: d, then (on a corrected step) the corrected direction after it
        buf = jax.lax.dynamic_update_index_in_dim(buf, d, count, 0)
        buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(fix, d_new, d), count + 1, 0)
        count = count + 1 + fix.astype(count.dtype)
        x_next = jnp.where(fix, s["mult"] * x_cur + s["step_len"] * d_new.reshape(shape), s["mult"] * x_cur + pred)
        x_next = jnp.where(s["last_zero"], (x_cur - s["sigma"] * e) / s["alpha"], x_next)
        out = (x_cur if return_trajectory else None, jnp.mean(core.safe_sqrt(jnp.sum(d * d, axis=-1))))
        return (x_next, hist, buf, count), out

    buf = jnp.zeros((buf_len, shape[0], x_start.shape[1]), dtype)
    count = jnp.asarray(0, jnp.int32)
    if o["xt"]:
        buf, count = buf.at[0].set(x_start), count + 1
    init = (x, jnp.zeros((slots, *shape), dtype), buf, count)
    (x_final, _, _, _), (traj, mean_norms) = jax.lax.scan(step, init, xs)
    out = jnp.concatenate([traj, x_final[None]]) if return_trajectory else x_final
    return (out, mean_norms) if norms else out


# --------------------------------------------------------------------------------------------
# Parameters


def _init(n_steps, o):
    return dict(coordinates=jnp.zeros((n_steps, o["pca"])), corrected=jnp.zeros((n_steps,)))


def _check(params, n_steps, o):
    check_tree("pas", params, dict(coordinates=(n_steps, o["pca"]), corrected=(n_steps,)))
    if isinstance(params["corrected"], jax.core.Tracer):
        return
    fix = np.asarray(params["corrected"], np.float64)
    if not np.all((fix == 0) | (fix == 1)):
        raise ValueError(f"pas parameter corrected must hold 0 or 1 per step, got {fix}")
    bad = np.flatnonzero((fix == 1) & ~eligible(n_steps, o["pca"], o["xt"]))
    if bad.size:
        raise ValueError(f"pas cannot correct step {int(bad[0])} with pca={o['pca']} and xt={o['xt']}: a step k "
                         f"needs xt + k >= pca - 1")


def _project(params, o):
    return dict(coordinates=params["coordinates"], corrected=jnp.round(jnp.clip(params["corrected"], 0.0, 1.0)))


def _prepare(params, denoise, x, ts, schedule, o):
    """The authors' start: every eligible step corrected, the first coordinate the batch-mean |d| of
    the base solver's step there (1 with ``relative``), the others 0."""
    n_steps = len(ts) - 1
    if o["relative"]:
        norms = jnp.ones((n_steps,), x.dtype)
    else:
        _, norms = pas_loop(denoise, x, ts, schedule, _init(n_steps, o), o, norms=True)
    coords = jnp.zeros((n_steps, o["pca"]), x.dtype).at[:, 0].set(norms)
    return dict(coordinates=coords, corrected=jnp.asarray(eligible(n_steps, o["pca"], o["xt"]), x.dtype))


_RANGES = ("coordinates: finite [N, pca]; corrected: 0 or 1 [N], 1 only where xt + k >= pca - 1")


def _label(o):
    base = {"ddim": "DDIM", "ipndm": f"iPNDM-{o['order']}", "deis": f"DEIS-{o['variant']}{o['order']}"}[o["base"]]
    return f"PAS-{o['pca']}({base})"


@register(
    "pas", noise_start=False, label=_label, order=lambda o: 1 if o["base"] == "ddim" else o["order"],
    min_steps=lambda o: max(1, o["pca"] - int(o["xt"])),
    learned=Learned(init=_init, neutral=_init, base=lambda o: (o["base"], base_options(o)), check=_check,
                    project=_project, ranges=_RANGES, prepare=_prepare, learning_rate=3e-2),
    options=[
        Option("base", str, "PAS: the solver it corrects", choices=("ddim", "ipndm", "deis")),
        Option("order", int, "PAS: the base's order (iPNDM 1-4, DEIS 1-3; DDIM 1)", choices=(1, 2, 3, 4)),
        Option("variant", str, "PAS on DEIS: its variant", choices=tuple(VARIANTS)),
        Option("pca", int, "PAS: coordinates per corrected step (d and pca - 1 principal directions)", low=1,
               high=4),
        Option("xt", bool, "PAS: the starting point joins the buffer of directions"),
        Option("relative", bool, "PAS: coordinates in units of each sample's |d| (the authors': absolute)"),
    ])
def pas(
    denoise, x, ts, schedule, *, base: str = "ddim", order: int = 3, variant: str = "tab", pca: int = 4,
    xt: bool = True, relative: bool = False, params=None, key=None, return_trajectory: bool = False,
):
    """Sample with PAS on ``base``: learned coordinates correct its direction on some steps (``params``;
    None: no step corrected, the base solver)."""
    n_steps = len(ts) - 1
    o = dict(base=base, order=order, variant=variant, pca=pca, xt=xt, relative=relative)
    core.validate(x, ts, schedule, key=key, min_steps=max(1, pca - int(xt)), noise_start=False)
    params = _init(n_steps, o) if params is None else params
    _check(params, n_steps, o)
    return pas_loop(denoise, x, ts, schedule, params, o, return_trajectory=return_trajectory)

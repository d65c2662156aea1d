"""AMED-Solver (Zhou et al., CVPR 2024, "Fast ODE-based Sampling for Diffusion Models in Around 5
Steps"): one extra model evaluation inside each step, at a learned place.

AMED approximates the mean direction of a step: from s_k to s_{k+1} (EDM noise levels s = sigma /
alpha, x_hat = x / alpha) it takes an Euler step to s_m = s_k^{1-r} s_{k+1}^r, evaluates the model
there at the level a s_m, and steps from x_hat with that direction scaled by c::

    d = (x_hat - D(x_hat; s_k)) / s_k,    y = x_hat + (s_m - s_k) d,
    x_hat' = x_hat + c (s_{k+1} - s_k) (y - D(y; a s_m)) / s_m

This is the step of :mod:`jdiffsample.solvers.epd` with one point of weight 1. Two model calls per
step (NFE = 2 N); with ``afs`` (the analytic first step of the authors' code, d = x_hat /
sqrt(1 + s^2) on the first step) one call fewer (NFE = 2 N - 1, the authors' NFE 3, 5, 7, 9). A
last step into sigma = 0 returns D(x_hat; s_k) (one call).

The authors predict (r, c, a) for each sample with a tiny network from features of the trajectory
(their U-Net's bottleneck, averaged over channels, and the two noise levels). This package's
denoisers give no bottleneck, so ``form='network'`` feeds it the features of the current
direction d instead (its channel mean, resized to 8 x 8 = 64 values; zeros on an AFS step), with
the authors' architecture: the noise levels s_k, s_{k+1} through a shared 4-frequency positional
embedding (sin, cos) and a linear layer with SiLU (8 each), the features through 64 -> 128 -> 4
with SiLU, and from the 20 values one linear head each for r = sigmoid(.), c = 1 + scale_dir
(2 sigmoid(.) - 1) and a = 1 + scale_time (2 sigmoid(.) - 1). Its values differ per sample, so the
model is called with a time per sample (``t`` of shape [B]; the EDM networks take it; wrap a
denoiser that takes scalar times with :func:`per_sample_times`). ``form='constant'`` (default)
learns (r, c, a) per step instead::

    constant: {"r": [N] in [0, 1], "scale_dir": [N] in [1 - scale_dir, 1 + scale_dir], "scale_time": [N] (likewise)}
    network:  {"map", "enc0", "enc1", "r", "scale_dir", "scale_time"}: {"kernel" [in, out], "bias" [out]} layers

Untrained (``init``): r = 1/2 and scales 1 (the geometric midpoint); the network's heads start at
zero, so they give the same. r = 0 with scales 1 is Euler (= DDIM) on the same grid, exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.solvers import core
from jdiffsample.solvers.epd import bound_steps, check_range, check_tree, clip_range, step_loop
from jdiffsample.solvers.registry import Learned, Option, register

__all__ = ["amed", "features", "predictor", "per_sample_times", "network_shapes"]

FEATURES = 64   # the authors' bottleneck_input_dim: an 8 x 8 map
_EMBED = 8      # noise_channels: 4 frequencies, sin and cos
_HIDDEN = 128   # hidden_dim
_BOTTLENECK = 4  # bottleneck_output_dim
_HEADS = ("r", "scale_dir", "scale_time")


def network_shapes() -> dict:
    """The predictor's layers: name -> {"kernel": [in, out], "bias": [out]}."""
    head_in = _BOTTLENECK + 2 * _EMBED
    layers = dict(map=(_EMBED, _EMBED), enc0=(FEATURES, _HIDDEN), enc1=(_HIDDEN, _BOTTLENECK),
                  **{h: (head_in, 1) for h in _HEADS})
    return {name: dict(kernel=(i, o), bias=(o,)) for name, (i, o) in layers.items()}


def features(d):
    """The predictor's input: the channel mean of ``d`` [B, H, W, C] resized to 8 x 8, or any other
    sample shape flattened and resized to 64 values; [B, 64]."""
    if d.ndim == 4:
        m = jnp.mean(d, axis=-1)
        side = int(np.sqrt(FEATURES))
        if m.shape[1:] != (side, side):
            m = jax.image.resize(m, (m.shape[0], side, side), "linear", antialias=True)
        return m.reshape(m.shape[0], FEATURES)
    flat = d.reshape(d.shape[0], -1)
    if flat.shape[1] != FEATURES:
        flat = jax.image.resize(flat, (flat.shape[0], FEATURES), "linear", antialias=True)
    return flat


def _embed(s, layer, dtype):
    # computed in float32, as the authors' PositionalEmbedding does (their predictors see these values)
    freqs = ((1.0 / 10000.0) ** (jnp.arange(_EMBED // 2, dtype=jnp.float32) / (_EMBED // 2 - 1))).astype(dtype)
    arg = s * freqs
    pos = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])
    return jax.nn.silu(pos @ layer["kernel"] + layer["bias"])


def _dense(v, layer):
    return v @ layer["kernel"] + layer["bias"]


def predictor(net, feats, s_cur, s_next, scale_dir: float, scale_time: float):
    """The network form: (r, c, a), each [B], from features [B, 64] and the noise levels."""
    dtype = feats.dtype
    net = jax.tree.map(lambda a: jnp.asarray(a, dtype), net)
    hidden = _dense(jax.nn.silu(_dense(feats, net["enc0"])), net["enc1"])
    emb = jnp.concatenate([_embed(s_cur, net["map"], dtype), _embed(s_next, net["map"], dtype)])
    z = jnp.concatenate([hidden, jnp.broadcast_to(emb, (feats.shape[0], emb.shape[0]))], axis=1)
    heads = {h: _dense(z, net[h])[:, 0] for h in _HEADS}
    r = jax.nn.sigmoid(heads["r"])
    c = 1.0 + scale_dir * (2.0 * jax.nn.sigmoid(heads["scale_dir"]) - 1.0)
    a = 1.0 + scale_time * (2.0 * jax.nn.sigmoid(heads["scale_time"]) - 1.0)
    return r, c, a


@dataclasses.dataclass(frozen=True)
class _PerSample:
    denoise: Any

    def __call__(self, x, t):
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        return jax.vmap(lambda xi, ti: self.denoise(xi[None], ti)[0])(x, t)


jax.tree_util.register_dataclass(_PerSample, data_fields=["denoise"], meta_fields=[])


def per_sample_times(denoise):
    """``denoise(x, t)`` taking a time per sample (``t`` [B]) from one that takes a scalar time and has
    no per-sample conditioning (e.g. ``GaussianMixture.denoiser``): it runs sample by sample (vmap)."""
    return _PerSample(denoise)


# --------------------------------------------------------------------------------------------
# Parameters


def _init_network(key=0):
    """Hidden layers N(0, 1 / fan_in) from ``jax.random.key(key)``, biases and heads zero."""
    keys = iter(jax.random.split(jax.random.key(key), 3))
    out = {}
    for name, shape in network_shapes().items():
        fan_in = shape["kernel"][0]
        kernel = (jax.random.normal(next(keys), shape["kernel"]) / np.sqrt(fan_in)
                  if name in ("map", "enc0", "enc1") else jnp.zeros(shape["kernel"]))
        out[name] = dict(kernel=kernel, bias=jnp.zeros(shape["bias"]))
    return out


def _init(n_steps, o):
    if o["form"] == "network":
        return _init_network()
    return dict(r=jnp.full((n_steps,), 0.5), scale_dir=jnp.ones((n_steps,)), scale_time=jnp.ones((n_steps,)))


def _neutral(n_steps, o):
    if o["form"] == "network":  # sigmoid(-1e4) is exactly 0 (in float32 too); zero heads give scales 1
        net = jax.tree.map(jnp.zeros_like, _init_network())
        net["r"]["bias"] = jnp.full((1,), -1e4)
        return net
    return dict(r=jnp.zeros((n_steps,)), scale_dir=jnp.ones((n_steps,)), scale_time=jnp.ones((n_steps,)))


def _check(params, n_steps, o):
    if o["form"] == "network":
        check_tree("amed", params, network_shapes())
        return
    check_tree("amed", params, {k: (n_steps,) for k in _HEADS})
    check_range("amed", "r", params["r"], 0.0, 1.0)
    for key in ("scale_dir", "scale_time"):
        check_range("amed", key, params[key], 1.0 - o[key], 1.0 + o[key])


def _project(params, o):
    if o["form"] == "network":
        return params
    return dict(r=jnp.clip(params["r"], 0.0, 1.0), scale_dir=clip_range(params["scale_dir"], o["scale_dir"]),
                scale_time=clip_range(params["scale_time"], o["scale_time"]))


_RANGES = ("form 'constant': r in [0, 1], scale_dir in [1 - scale_dir, 1 + scale_dir], scale_time in "
           "[1 - scale_time, 1 + scale_time] (the options), each [N]; form 'network': any finite weights "
           "(its outputs lie in those ranges by construction)")


@register(
    "amed", noise_start=False,
    label=lambda o: f"AMED{'-net' if o['form'] == 'network' else ''}{'-AFS' if o['afs'] else ''}", order=2,
    calls_per_step=2, final_zero_calls=1, saved_calls=lambda o: int(o["afs"]),
    learned=Learned(init=_init, neutral=_neutral, base=lambda o: ("euler", {}), check=_check, project=_project,
                    ranges=_RANGES, learning_rate=lambda o: 3e-2 if o["form"] == "network" else 5e-2,
                    step_sizes=lambda p, o: None if o["form"] == "network" else bound_steps(p, o)),
    options=[
        Option("form", str, "AMED: learned (r, c, a) per step, or predicted per sample by the authors' network",
               choices=("constant", "network")),
        Option("afs", bool, "analytic first step: the first direction without a model call (saves one)"),
        Option("scale_dir", float, "bound b of the learned direction scales, in [1 - b, 1 + b]", low=0.0, high=0.5),
        Option("scale_time", float, "bound b of the learned model-time scales, in [1 - b, 1 + b]", low=0.0,
               high=0.5),
    ])
def amed(
    denoise, x, ts, schedule, *, form: str = "constant", afs: bool = False, scale_dir: float = 0.01,
    scale_time: float = 0.0, params=None, key=None, return_trajectory: bool = False,
):
    """Sample with AMED-Solver: one extra evaluation per step at a learned place (``params``; None:
    the untrained midpoint)."""
    core.validate(x, ts, schedule, key=key, noise_start=False)
    n_steps = len(ts) - 1
    options = dict(form=form, afs=afs, scale_dir=scale_dir, scale_time=scale_time)
    params = _init(n_steps, options) if params is None else params
    _check(params, n_steps, options)
    one = jnp.ones((1,), x.dtype)

    def predict(k, feats, s_cur, s_next):
        if form == "network":
            r, c, a = predictor(params, features(feats), s_cur, s_next, scale_dir, scale_time)
            return r[:, None], c[:, None], a[:, None], jnp.ones_like(r)[:, None]
        return params["r"][k] * one, params["scale_dir"][k] * one, params["scale_time"][k] * one, one

    return step_loop(denoise, x, ts, schedule, predict, afs=afs, return_trajectory=return_trajectory)

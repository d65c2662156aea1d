"""Denoisers: everything a solver needs from a model is ``denoise(x, t) -> x0_hat``.

``x`` is a batch in the schedule's own coordinates (x_t = alpha_t x0 + sigma_t eps) and ``t`` a
scalar time. The adapters below turn the usual network parameterizations into that form; the
Gaussian mixture gives an exact denoiser (the posterior mean) and exact samples, the ground truth of
the tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.schedules import RectifiedFlow, Schedule

__all__ = [
    "Denoiser",
    "x0_from_eps",
    "x0_from_v",
    "from_eps",
    "from_v",
    "from_velocity",
    "from_x0",
    "from_edm",
    "guided",
    "classifier_guidance",
    "prediction_from_x0",
    "rescale_guidance",
    "ClassifierGuided",
    "threshold",
    "Thresholded",
    "GaussianMixture",
]

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def _coeffs(schedule: Schedule, t, dtype):
    return schedule.alpha(t).astype(dtype), schedule.sigma(t).astype(dtype)


def x0_from_eps(x, eps, t, schedule: Schedule):
    """The data prediction of a noise prediction: x0 = (x - sigma eps) / alpha."""
    alpha, sigma = _coeffs(schedule, t, x.dtype)
    return (x - sigma * eps.astype(x.dtype)) / alpha


def x0_from_v(x, v, t, schedule: Schedule):
    """The data prediction of a velocity v = alpha eps - sigma x0 (VP): x0 = alpha x - sigma v."""
    alpha, sigma = _coeffs(schedule, t, x.dtype)
    return alpha * x - sigma * v.astype(x.dtype)


def from_eps(eps_fn: Callable, schedule: Schedule) -> Denoiser:
    """Noise prediction ``eps_fn(x, t)``: x0 = (x - sigma eps) / alpha."""
    return lambda x, t: x0_from_eps(x, eps_fn(x, t), t, schedule)


def from_v(v_fn: Callable, schedule: Schedule) -> Denoiser:
    """Velocity prediction ``v_fn(x, t)`` (v = alpha eps - sigma x0, VP): x0 = alpha x - sigma v."""
    return lambda x, t: x0_from_v(x, v_fn(x, t), t, schedule)


def _check_flow(schedule: Schedule, what: str) -> None:
    if not isinstance(schedule, RectifiedFlow):
        raise ValueError(f"{what} needs a flow schedule (schedules.RectifiedFlow, alpha = 1 - sigma), got "
                         f"{schedule!r}; for a VP model's v-prediction use from_v")


def from_velocity(v_fn: Callable, schedule: Schedule) -> Denoiser:
    """Flow-matching velocity ``v_fn(x, t)`` (v = dx/dsigma = eps - x0 under ``RectifiedFlow``):
    x0 = x - sigma v (sigma = t without shift). ``ValueError`` for a VP or VE schedule."""
    _check_flow(schedule, "from_velocity")

    def denoise(x, t):
        return x - schedule.sigma(t).astype(x.dtype) * v_fn(x, t)

    return denoise


def from_x0(x0_fn: Callable) -> Denoiser:
    """Data prediction ``x0_fn(x, t)``: already a denoiser."""
    return lambda x, t: x0_fn(x, t)


def from_edm(edm_fn: Callable, schedule: Schedule) -> Denoiser:
    """An EDM-preconditioned network ``D(x_hat, s)`` in VE coordinates (x_hat = x / alpha, s = sigma / alpha).

    For ``schedule = VE()`` this is ``D(x, t)`` itself; for a VP schedule the state is rescaled, which
    lets an EDM model be sampled on any lambda grid.
    """

    def denoise(x, t):
        alpha = schedule.alpha(t).astype(x.dtype)
        return edm_fn(x / alpha, schedule.edm_sigma(t))

    return denoise


def guided(cond: Denoiser, uncond: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance on data predictions: uncond + scale (cond - uncond).

    ``scale = 1`` is the conditional model and ``scale = 0`` the unconditional one. Both denoisers
    see the same ``(x, t)``; to evaluate them in one batched call, wrap a network that concatenates
    the two halves yourself and pass the halves as ``cond``/``uncond``.
    """

    def denoise(x, t):
        u = uncond(x, t)
        return u + scale * (cond(x, t) - u)

    return denoise


def classifier_guidance(x0, x, t, labels, logits_fn, scale, schedule: Schedule):
    """Classifier guidance in data-prediction form: ``x0 + scale sigma_t^2 / alpha_t grad_x log p(y | x_t)``.

    guided-diffusion shifts the mean of each ancestral step by ``scale * variance * grad`` and, for
    DDIM (``condition_score``), the noise prediction by ``-sqrt(1 - alpha_bar) scale grad``; with
    x_t = alpha x0 + sigma eps, the latter is x0 + scale sigma^2 / alpha grad, which every solver
    here consumes. ``logits_fn(x) -> [B, K]`` at this ``t``; ``labels`` int [B].
    """

    def total(y):
        log_p = jax.nn.log_softmax(logits_fn(y).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(log_p, labels[:, None], axis=-1).sum()

    grad = jax.grad(total)(x)
    alpha, sigma = _coeffs(schedule, t, x.dtype)
    return x0 + jnp.asarray(scale, x.dtype) * sigma**2 / alpha * grad.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ClassifierGuided:
    """``denoise`` guided by a classifier ``classify(x, t) -> logits`` towards ``labels`` with weight
    ``scale`` (:func:`classifier_guidance`); a pytree: labels and scale are traced."""

    denoise: Any
    classify: Any
    labels: Any
    scale: Any
    schedule: Schedule

    def __call__(self, x, t):
        return classifier_guidance(self.denoise(x, t), x, t, self.labels, lambda y: self.classify(y, t), self.scale,
                                   self.schedule)


jax.tree_util.register_dataclass(ClassifierGuided, data_fields=["denoise", "classify", "labels", "scale"],
                                 meta_fields=["schedule"])


PREDICTIONS = ("epsilon", "v_prediction", "sample")


def prediction_from_x0(x, x0, t, schedule: Schedule, prediction: str):
    """What a network of output type ``prediction`` gives for data prediction ``x0`` at ``(x, t)``:
    epsilon = (x - alpha x0) / sigma, v = (alpha x - x0) / sigma, or x0 itself."""
    if prediction == "sample":
        return x0
    alpha, sigma = _coeffs(schedule, t, x.dtype)
    if prediction == "epsilon":
        return (x - alpha * x0) / sigma
    if prediction == "v_prediction":
        return (alpha * x - x0) / sigma
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def rescale_guidance(guided, cond, x, t, schedule: Schedule, prediction: str, phi):
    """Guidance rescale (Lin et al. 2023), as diffusers' ``rescale_noise_cfg``: in the network's
    output space, the guided output o is blended with o std(o_cond) / std(o) (per sample) by ``phi``.
    Inputs and result are data predictions."""
    o, o_cond = (prediction_from_x0(x, v, t, schedule, prediction) for v in (guided, cond))
    axes = tuple(range(1, x.ndim))
    rescaled = o * (jnp.std(o_cond, axis=axes, keepdims=True) / jnp.std(o, axis=axes, keepdims=True))
    o = phi * rescaled + (1 - phi) * o
    if prediction == "sample":
        return o
    if prediction == "epsilon":
        return x0_from_eps(x, o, t, schedule)
    return x0_from_v(x, o, t, schedule)


THRESHOLDS = ("static", "dynamic")


def threshold(x0, kind: str, ratio=0.995, max_value=1.0):
    """Thresholding of data predictions in [-1, 1] pixel space.

    ``'static'``: clip to [-1, 1]. ``'dynamic'`` (Saharia et al. 2022, as DPM-Solver and diffusers
    define it): per sample, s = clip(quantile(|x0|, ratio), 1, max_value) over all its values, and
    x0 <- clip(x0, -s, s) / s. ``ratio`` and ``max_value`` may be traced.
    """
    if kind == "static":
        return jnp.clip(x0, -1.0, 1.0)
    if kind != "dynamic":
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {kind!r}")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True)
class Thresholded:
    """``denoise`` with its data predictions thresholded (:func:`threshold`); a pytree, so the
    ratio and maximum are traced arguments of a compiled sampler."""

    denoise: Any
    ratio: Any = 0.995
    max_value: Any = 1.0
    kind: str = "dynamic"

    def __call__(self, x, t):
        return threshold(self.denoise(x, t), self.kind, self.ratio, self.max_value)


jax.tree_util.register_dataclass(Thresholded, data_fields=["denoise", "ratio", "max_value"], meta_fields=["kind"])


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A mixture of Gaussians with diagonal covariances in dimension D, for data x0 of any shape.

    ``weights`` [K] (normalized here), ``means`` [K, D], ``variances`` [K, D] (or [K] for isotropic
    components). Data arrays have shape ``[B, *shape]`` with prod(shape) = D.
    """

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    def __post_init__(self):
        w = np.asarray(self.weights, np.float64)
        mu = np.asarray(self.means, np.float64)
        var = np.asarray(self.variances, np.float64)
        if mu.ndim != 2 or w.shape != (mu.shape[0],):
            raise ValueError("means must be [K, D] and weights [K]")
        if var.ndim == 1:
            var = np.repeat(var[:, None], mu.shape[1], axis=1)
        if var.shape != mu.shape or np.any(var <= 0) or np.any(w <= 0):
            raise ValueError("variances must be positive, [K] or [K, D]; weights positive")
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "variances", var)

    @classmethod
    def random(cls, key, dim: int, n_components: int = 4, spread: float = 1.0, var_range=(0.05, 0.3)):
        """A random, well-separated mixture (for tests and benchmarks)."""
        k1, k2, k3 = jax.random.split(key, 3)
        means = spread * np.asarray(jax.random.normal(k1, (n_components, dim)), np.float64) / np.sqrt(dim) * 3
        lo, hi = var_range
        variances = np.asarray(jax.random.uniform(k2, (n_components, dim), minval=lo, maxval=hi), np.float64)
        weights = np.asarray(jax.random.uniform(k3, (n_components,), minval=0.5, maxval=1.5), np.float64)
        return cls(weights, means, variances)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    def covariance(self) -> np.ndarray:
        second = np.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second += np.diag(self.weights @ self.variances)
        m = self.mean()
        return second - np.outer(m, m)

    def sample(self, key, n: int, shape=None, dtype=jnp.float32) -> jax.Array:
        """Exact samples of x0, shape [n, *shape] (default shape (D,))."""
        shape = (self.dim,) if shape is None else tuple(shape)
        if int(np.prod(shape)) != self.dim:
            raise ValueError(f"shape {shape} does not hold {self.dim} values")
        kc, kn = jax.random.split(key)
        comp = jax.random.choice(kc, len(self.weights), (n,), p=jnp.asarray(self.weights, dtype))
        z = jax.random.normal(kn, (n, self.dim), dtype)
        x = jnp.asarray(self.means, dtype)[comp] + jnp.sqrt(jnp.asarray(self.variances, dtype))[comp] * z
        return x.reshape((n, *shape))

    def sample_marginal(self, key, n: int, t, schedule: Schedule, shape=None, dtype=jnp.float32):
        """Exact samples of x_t = alpha_t x0 + sigma_t eps (e.g. the true start of a sampler)."""
        k0, ke = jax.random.split(key)
        x0 = self.sample(k0, n, shape, dtype)
        alpha, sigma = _coeffs(schedule, jnp.asarray(t, dtype), dtype)
        return alpha * x0 + sigma * jax.random.normal(ke, x0.shape, dtype)

    def velocity(self, schedule: Schedule) -> Callable:
        """The exact flow-matching velocity E[eps - x0 | x_t] = (x - E[x0 | x_t]) / sigma under a
        ``RectifiedFlow`` schedule (``ValueError`` otherwise): the mixture as a flow model."""
        _check_flow(schedule, "GaussianMixture.velocity")
        denoise = self.denoiser(schedule)

        def velocity(x, t):
            return (x - denoise(x, t)) / schedule.sigma(jnp.asarray(t, x.dtype)).astype(x.dtype)

        return velocity

    def denoiser(self, schedule: Schedule) -> Denoiser:
        """The exact posterior mean E[x0 | x_t] under ``schedule`` (any alpha/sigma pair: VP, VE,
        flows)."""
        log_w = np.log(self.weights)

        def denoise(x, t):
            dtype = x.dtype
            alpha, sigma = _coeffs(schedule, jnp.asarray(t, dtype), dtype)
            flat = x.reshape(x.shape[0], -1)
            mu = jnp.asarray(self.means, dtype)
            var = jnp.asarray(self.variances, dtype)
            var_t = alpha**2 * var + sigma**2  # [K, D]: covariance of x_t given the component
            diff = flat[:, None, :] - alpha * mu[None]  # [B, K, D]
            log_p = -0.5 * jnp.sum(diff**2 / var_t + jnp.log(var_t), axis=-1) + jnp.asarray(log_w, dtype)
            resp = jax.nn.softmax(log_p, axis=-1)  # [B, K]
            post = mu[None] + alpha * var / var_t * diff  # E[x0 | x_t, k]
            return jnp.einsum("bk,bkd->bd", resp, post).reshape(x.shape)

        return denoise

"""Exact models to test samplers against: a Gaussian mixture has a closed-form denoiser.

:class:`GaussianMixture` gives the exact posterior mean E[x0 | x_t] under any schedule (the ideal
denoiser), exact samples of the data and of x_t, and the exact flow-matching velocity: the ground
truth of jdiffsample's own tests and benchmarks, importable for tests of your own solvers::

    from jdiffsample.testing import GaussianMixture
    mixture = GaussianMixture.random(jax.random.key(0), dim=64)
    x0 = jdiffsample.sample(mixture.denoiser(schedule), x, ts, schedule, "unipc")
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.models import check_flow
from jdiffsample.schedules import Schedule

__all__ = ["GaussianMixture"]


def _coeffs(schedule: Schedule, t, dtype):
    return schedule.alpha(t).astype(dtype), schedule.sigma(t).astype(dtype)


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
        check_flow(schedule, "GaussianMixture.velocity")
        denoise = self.denoiser(schedule)

        def velocity(x, t):
            return (x - denoise(x, t)) / schedule.sigma(jnp.asarray(t, x.dtype)).astype(x.dtype)

        return velocity

    def denoiser(self, schedule: Schedule) -> Callable:
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

"""Denoisers: everything a solver needs from a model is ``denoise(x, t) -> x0_hat``.

``x`` is a batch in the schedule's own coordinates (x_t = alpha_t x0 + sigma_t eps) and ``t`` a
scalar time. The adapters below turn the usual network parameterizations into that form. Guidance
lives in :mod:`jdiffsample.guidance`; an exact denoiser to test against in
:mod:`jdiffsample.testing`.
"""

from __future__ import annotations

from typing import Callable

import jax

from jdiffsample.schedules import RectifiedFlow, Schedule

__all__ = ["Denoiser", "PREDICTIONS", "x0_from_eps", "x0_from_v", "x0_from_prediction", "prediction_from_x0",
           "from_eps", "from_v", "from_velocity", "from_x0", "from_edm", "check_flow"]

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


def check_flow(schedule: Schedule, what: str) -> None:
    if not isinstance(schedule, RectifiedFlow):
        raise ValueError(f"{what} needs a flow schedule (schedules.RectifiedFlow, alpha = 1 - sigma), got "
                         f"{schedule!r}; for a VP model's v-prediction use from_v")


def from_velocity(v_fn: Callable, schedule: Schedule) -> Denoiser:
    """Flow-matching velocity ``v_fn(x, t)`` (v = dx/dsigma = eps - x0 under ``RectifiedFlow``):
    x0 = x - sigma v (sigma = t without shift). ``ValueError`` for a VP or VE schedule."""
    check_flow(schedule, "from_velocity")

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


PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")


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
    if prediction == "flow_prediction":  # v = eps - x0 with x = (1 - sigma) x0 + sigma eps
        return (x - x0) / sigma
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def x0_from_prediction(x, output, t, schedule: Schedule, prediction: str):
    """The data prediction of a network output of type ``prediction`` (inverse of
    :func:`prediction_from_x0`)."""
    if prediction == "sample":
        return output
    if prediction == "epsilon":
        return x0_from_eps(x, output, t, schedule)
    if prediction == "v_prediction":
        return x0_from_v(x, output, t, schedule)
    if prediction == "flow_prediction":
        return x - schedule.sigma(t).astype(x.dtype) * output
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

"""Guidance: how a network's predictions become the denoiser a solver calls.

Every transform here acts on data predictions (x0) in the schedule's coordinates and is a pytree whose
weights are traced leaves, so another weight, interval, scale or threshold reuses a compiled program.
:class:`Guidance` composes them in one fixed order, the order guided-diffusion and diffusers use:

1. :class:`CFG` combines a conditional and an unconditional prediction,
   ``D = D_u + w (D_c - D_u)``. ``D_u`` is whatever the caller provides: the network with its null
   label or a negative prompt (classifier-free guidance), or a second, weaker network (autoguidance,
   ``D = D_guide + w (D_main - D_guide)``). Within it, in this order:

   * the guidance interval (Kynkaanniemi et al. 2024): ``w = 1`` where the noise level
     ``sigma / alpha`` lies outside ``[lo, hi]``;
   * the rescale (Lin et al. 2023, diffusers' ``rescale_noise_cfg``), measured in the network's
     output space (``prediction``: epsilon, v or the sample itself);
   * the channel limit: only the first ``channels`` channels take the guided value, the others the
     conditional one (DiT's original sampler guides 3 of its 4 latent channels).
2. :class:`SkipLayerGuidance` (SD3.5, diffusers' ``skip_guidance_layers``) adds
   ``scale (D_c - D_skip)``, ``D_skip`` the conditional prediction of the network with some of its
   blocks bypassed, at the times ``t`` in ``[lo, hi]`` (the steps it was asked for).
3. :class:`Threshold`: static clipping to [-1, 1] or dynamic thresholding (Saharia et al. 2022) of
   pixel-space predictions.
4. :class:`ClassifierGuidance`: ``x0 + s sigma^2 / alpha grad_x log p(y | x_t)``, guided-diffusion's
   DDIM form (``condition_score``) written for x0, after thresholding as the original does.

``nets.Denoiser`` is a network call followed by this chain; :func:`guided`, :func:`thresholded`
and :func:`classifier_guided` apply single transforms to any ``denoise(x, t)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import models
from jdiffsample.schedules import Schedule

__all__ = ["CFG", "SkipLayerGuidance", "Threshold", "ClassifierGuidance", "Guidance", "THRESHOLDS", "PREDICTIONS", "threshold",
           "rescale", "classifier_guidance", "skip_layer_steps", "guided", "thresholded", "classifier_guided"]

THRESHOLDS = ("static", "dynamic")
PREDICTIONS = models.PREDICTIONS


def _scalar(value, name: str):
    value = jnp.asarray(value, jnp.float32)
    if value.ndim:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    return value


# ---------------------------------------------------------------------------------------------
# The transforms as functions


def rescale(guided_x0, cond_x0, x, t, schedule: Schedule, prediction: str, phi):
    """Guidance rescale (Lin et al. 2023) as diffusers' ``rescale_noise_cfg``: in the network's output
    space the guided output o is blended with ``o std(o_cond) / std(o)`` (per sample) by ``phi``."""
    o, o_cond = (models.prediction_from_x0(x, v, t, schedule, prediction) for v in (guided_x0, cond_x0))
    axes = tuple(range(1, x.ndim))
    rescaled = o * (jnp.std(o_cond, axis=axes, keepdims=True) / jnp.std(o, axis=axes, keepdims=True))
    return models.x0_from_prediction(x, phi * rescaled + (1 - phi) * o, t, schedule, prediction)


def threshold(x0, kind: str, ratio=0.995, max_value=1.0):
    """``'static'``: clip to [-1, 1]. ``'dynamic'`` (Saharia et al. 2022, as DPM-Solver and diffusers
    define it): per sample s = clip(quantile(|x0|, ratio), 1, max_value) and x0 <- clip(x0, -s, s) / s."""
    if kind == "static":
        return jnp.clip(x0, -1.0, 1.0)
    if kind != "dynamic":
        raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {kind!r}")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def skip_layer_steps(n_steps: int, start: float = 0.01, stop: float = 0.2) -> np.ndarray:
    """bool ``[n_steps]``: the steps ``i`` in which skip-layer guidance acts, ``start n < i < stop n``
    (diffusers' ``skip_layer_guidance_start`` and ``_stop``, whose defaults these are)."""
    i = np.arange(int(n_steps))
    return (i > n_steps * start) & (i < n_steps * stop)


def classifier_guidance(x0, x, t, labels, logits_fn: Callable, scale, schedule: Schedule):
    """``x0 + scale sigma_t^2 / alpha_t grad_x log p(y | x_t)``.

    guided-diffusion shifts the noise prediction of a DDIM step by ``-sigma scale grad``
    (``condition_score``); with x_t = alpha x0 + sigma eps that is this shift of x0, which every solver
    here consumes. ``logits_fn(x) -> [B, K]`` at this ``t``; ``labels`` int ``[B]``.
    """

    def total(y):
        log_p = jax.nn.log_softmax(logits_fn(y).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(log_p, labels[:, None], axis=-1).sum()

    grad = jax.grad(total)(x)
    alpha, sigma = schedule.alpha(t).astype(x.dtype), schedule.sigma(t).astype(x.dtype)
    return x0 + jnp.asarray(scale, x.dtype) * sigma**2 / alpha * grad.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# The transforms as pytrees


@dataclasses.dataclass(frozen=True)
class CFG:
    """``D_u + w (D_c - D_u)`` with an optional interval ``[lo, hi]`` of sigma/alpha, rescale ``phi``
    and channel limit (static), in that order (see the module docstring)."""

    weight: Any
    interval: Any = None
    rescale: Any = None
    channels: int | None = None
    prediction: str = "sample"

    @classmethod
    def create(cls, weight, *, interval=None, rescale=None, channels=None, prediction="sample") -> "CFG":
        if interval is not None:
            interval = jnp.asarray(interval, jnp.float32)
            if interval.shape != (2,):
                raise ValueError(f"the guidance interval must be [lo, hi], got shape {interval.shape}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"guidance channels must be None (all) or a positive integer, got {channels!r}")
        return cls(_scalar(weight, "the guidance weight"), interval,
                   None if rescale is None else _scalar(rescale, "the guidance rescale"), channels, prediction)

    def __call__(self, cond, uncond, x, t, schedule: Schedule):
        w = self.weight
        if self.interval is not None:
            level = schedule.edm_sigma(jnp.asarray(t, jnp.float32))
            w = jnp.where((level >= self.interval[0]) & (level <= self.interval[1]), w, 1.0)
        out = uncond + w.astype(cond.dtype) * (cond - uncond)
        if self.rescale is not None:
            out = rescale(out, cond, x, t, schedule, self.prediction, self.rescale)
        if self.channels is None or self.channels >= out.shape[-1]:
            return out
        return jnp.concatenate([out[..., : self.channels], cond[..., self.channels:]], axis=-1)


@dataclasses.dataclass(frozen=True)
class SkipLayerGuidance:
    """``D + scale (D_c - D_skip)`` where ``lo <= t <= hi`` (``times``), ``D_skip`` the conditional
    prediction with the network's blocks ``layers`` (static) bypassed; ``scale`` and ``times`` are traced."""

    layers: tuple
    scale: Any
    times: Any

    @classmethod
    def create(cls, layers, scale, times) -> "SkipLayerGuidance":
        layers = tuple(layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"skip-layer guidance needs block indices (non-negative integers), got {list(layers)}")
        times = jnp.asarray(times, jnp.float32)
        if times.shape != (2,):
            raise ValueError(f"skip-layer guidance's times must be [lo, hi], got shape {times.shape}")
        return cls(layers, _scalar(scale, "the skip-layer guidance scale"), times)

    def active(self, t):
        t = jnp.asarray(t, jnp.float32)
        return (t >= self.times[0]) & (t <= self.times[1])

    def __call__(self, x0, cond, skipped, t):
        w = jnp.where(self.active(t), self.scale, 0.0).astype(x0.dtype)
        return x0 + w * (cond - skipped)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Static or dynamic thresholding (:func:`threshold`); ``ratio`` and ``max_value`` are traced."""

    kind: str = "dynamic"
    ratio: Any = 0.995
    max_value: Any = 1.0

    @classmethod
    def create(cls, kind: str, ratio=0.995, max_value=1.0) -> "Threshold":
        if kind not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {kind!r}")
        return cls(kind, _scalar(ratio, "the threshold ratio"), _scalar(max_value, "the threshold maximum"))

    def __call__(self, x0):
        return threshold(x0, self.kind, self.ratio, self.max_value)


@dataclasses.dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance by ``classify(x, t) -> logits`` (a callable pytree, e.g. a converted
    noisy-image classifier) with weight ``scale`` (:func:`classifier_guidance`)."""

    classify: Any
    scale: Any

    def __call__(self, x0, x, t, labels, schedule: Schedule):
        if labels is None:
            raise ValueError("classifier guidance needs labels (the classes to guide towards)")
        return classifier_guidance(x0, x, t, labels, lambda y: self.classify(y, t), self.scale, schedule)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """The chain: :class:`CFG`, :class:`SkipLayerGuidance`, :class:`Threshold`, then
    :class:`ClassifierGuidance` (each optional). ``cfg`` set means the caller must provide an
    unconditional prediction, ``skip_layers`` set the prediction ``skipped`` of the network with those
    blocks bypassed (used where it is active)."""

    cfg: CFG | None = None
    threshold: Threshold | None = None
    classifier: ClassifierGuidance | None = None
    skip_layers: SkipLayerGuidance | None = None

    def __call__(self, cond, uncond, x, t, schedule: Schedule, labels=None, skipped=None):
        x0 = cond if self.cfg is None else self.cfg(cond, uncond, x, t, schedule)
        if self.skip_layers is not None:
            x0 = self.skip_layers(x0, cond, skipped, t)
        if self.threshold is not None:
            x0 = self.threshold(x0)
        if self.classifier is not None:
            x0 = self.classifier(x0, x, t, labels, schedule)
        return x0


for _cls, _data, _meta in ((CFG, ["weight", "interval", "rescale"], ["channels", "prediction"]),
                           (SkipLayerGuidance, ["scale", "times"], ["layers"]),
                           (Threshold, ["ratio", "max_value"], ["kind"]),
                           (ClassifierGuidance, ["classify", "scale"], []),
                           (Guidance, ["cfg", "threshold", "classifier", "skip_layers"], [])):
    jax.tree_util.register_dataclass(_cls, data_fields=_data, meta_fields=_meta)


# ---------------------------------------------------------------------------------------------
# Single transforms on plain denoisers


@dataclasses.dataclass(frozen=True)
class _Wrapped:
    """``guidance`` applied to ``cond`` (and ``uncond``), plain denoisers or callable pytrees."""

    guidance: Guidance
    cond: Any
    uncond: Any
    labels: Any
    schedule: Schedule

    def __call__(self, x, t):
        uncond = None if self.uncond is None else self.uncond(x, t)
        return self.guidance(self.cond(x, t), uncond, x, t, self.schedule, self.labels)


jax.tree_util.register_dataclass(_Wrapped, data_fields=["guidance", "cond", "uncond", "labels"],
                                 meta_fields=["schedule"])


def guided(cond: Callable, uncond: Callable, weight, schedule: Schedule | None = None, *, interval=None) -> Callable:
    """Classifier-free guidance of two denoisers: ``uncond + weight (cond - uncond)`` (``interval``
    needs the ``schedule``)."""
    if interval is not None and schedule is None:
        raise ValueError("a guidance interval needs the schedule (its noise levels)")
    return _Wrapped(Guidance(cfg=CFG.create(weight, interval=interval)), cond, uncond, None, schedule)


def thresholded(denoise: Callable, kind: str = "dynamic", ratio=0.995, max_value=1.0) -> Callable:
    """``denoise`` with its data predictions thresholded (:class:`Threshold`)."""
    return _Wrapped(Guidance(threshold=Threshold.create(kind, ratio, max_value)), denoise, None, None, None)


def classifier_guided(denoise: Callable, classify: Callable, labels, scale, schedule: Schedule) -> Callable:
    """``denoise`` guided by ``classify(x, t) -> logits`` towards ``labels`` with weight ``scale``."""
    chain = Guidance(classifier=ClassifierGuidance(classify, _scalar(scale, "the classifier scale")))
    return _Wrapped(chain, denoise, None, jnp.asarray(labels, jnp.int32), schedule)

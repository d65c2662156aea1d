"""A loaded network as a value: a pytree that jitted programs take as an argument.

:class:`Model` holds what defines the network (family, class, constructor kwargs, schedule, compute
dtype: static, hashable) and its variables (traced leaves). :class:`Denoiser` adds the
conditioning (labels, classifier-free or auto-guidance weight, guidance interval: traced leaves) and
is the solvers' ``denoise(x, t)``. So other weights of the same shapes, other labels, another
guidance weight or other Skip-Tuning scales reuse a compiled program; nothing is baked into it::

    model = nets.load_model("ckpt/edm-cifar10")
    denoise = model.denoiser(labels=jnp.arange(16) % 10, guidance=1.5)
    x0 = jdiffsample.sample(denoise, x, ts, model.schedule, "unipc")
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets import checkpoint
from jdiffsample.nets import family as families

__all__ = ["Model", "Denoiser", "load_model", "from_config"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@functools.lru_cache(maxsize=64)
def _build(family: str, class_name: str, kwargs_json: str, dtype: str):
    return families.get(family).build(class_name, json.loads(kwargs_json), dtype=_DTYPES[dtype])


@functools.lru_cache(maxsize=64)
def _schedule(family: str, schedule_json: str):
    fam = families.get(family)
    if fam.schedule is None:
        raise ValueError(f"{family} networks are not diffusion models: they have no schedule")
    return fam.schedule(json.loads(schedule_json))


def _canonical(value) -> str:
    from jdiffsample.nets.torchfile import json_value

    return json.dumps(json_value(value), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Model:
    """A converted network and its variables. Static: ``family``, ``class_name``, ``kwargs_json``,
    ``schedule_json``, ``dtype``, ``latent_json`` (a latent model's decoding spec, see
    :mod:`jdiffsample.nets.latent`; "null" for pixel models); traced: ``variables``."""

    family: str
    class_name: str
    kwargs_json: str
    schedule_json: str
    dtype: str
    variables: Any
    latent_json: str = "null"

    @property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)

    @property
    def family_info(self) -> families.Family:
        return families.get(self.family)

    @property
    def module(self):
        """The Flax module (built once per configuration)."""
        return _build(self.family, self.class_name, self.kwargs_json, self.dtype)

    @property
    def schedule(self):
        return _schedule(self.family, self.schedule_json)

    @property
    def latent(self) -> dict | None:
        """How this model's samples become images (None: it samples pixels)."""
        return json.loads(self.latent_json)

    @property
    def num_classes(self) -> int:
        return int(self.family_info.num_classes(self.module))

    @property
    def sample_shape(self) -> tuple:
        fam = self.family_info
        if fam.sample_shape is None:
            raise ValueError(f"{self.family} networks are not diffusion models")
        return tuple(int(v) for v in fam.sample_shape(self.module))

    def apply(self, *args, **kwargs):
        """``module.apply(variables, *args, **kwargs)``."""
        return self.module.apply(self.variables, *args, **kwargs)

    def with_variables(self, variables) -> "Model":
        return dataclasses.replace(self, variables=variables)

    def with_dtype(self, dtype) -> "Model":
        """The same network computing in ``dtype`` ('float32' or 'bfloat16')."""
        name = jnp.dtype(dtype).name
        if name not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name}")
        return dataclasses.replace(self, dtype=name)

    def denoiser(self, labels=None, **options) -> "Denoiser":
        """The solvers' ``denoise(x, t)`` for this network; ``options`` as for :meth:`Denoiser.create`
        (guidance, guide, interval, channels, classifier, classifier_scale, conditioning)."""
        return Denoiser.create(self, labels, **options)


jax.tree_util.register_dataclass(
    Model, data_fields=["variables"],
    meta_fields=["family", "class_name", "kwargs_json", "schedule_json", "dtype", "latent_json"])


def from_config(config: Mapping, variables, dtype="float32") -> Model:
    """A :class:`Model` from a checkpoint's ``config.json`` dict and its variables."""
    fam = families.get(config["family"])
    schedule = config.get("schedule") if fam.schedule is not None else None
    if fam.schedule is not None and schedule is None:
        raise ValueError(f"the {fam.name} config has no schedule entry")
    model = Model(config["family"], config["class_name"], _canonical(config["kwargs"]), _canonical(schedule),
                  "float32", variables, _canonical(config.get("latent")))
    return model.with_dtype(dtype)


def load_model(name_or_dir, *, dtype="float32") -> Model:
    """A checkpoint folder (or bundled model name) as a :class:`Model` (variables on this device)."""
    path = checkpoint.resolve(name_or_dir)
    return from_config(checkpoint.load_config(path), checkpoint.restore_variables(path), dtype)


def _check_labels(model: Model, labels):
    n = model.num_classes
    if labels is None:
        if n and not model.family_info.has_null_label(model.module):
            raise ValueError(f"this {model.family} network is class-conditional ({n} classes) and has no "
                             f"unconditional mode: pass integer labels [B]")
        return None
    if not n:
        raise ValueError("labels given for an unconditional network")
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers [B] in [0, {n - 1}] (-1: unconditional), got "
                         f"{labels.dtype} {labels.shape}")
    if not isinstance(labels, jax.core.Tracer):
        values = np.asarray(labels)
        if values.size and (values.min() < -1 or values.max() >= n):
            raise ValueError(f"labels must lie in [0, {n - 1}] (-1: unconditional), got {values.min()}..{values.max()}")
    return labels.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """``denoise(x, t)`` of a network: x in its schedule's coordinates, t a scalar time.

    ``labels``: int32 ``[B]`` (-1: the null label) or None. ``guidance``: None (off) or the weight
    w of ``D = D_uncond + w (D_cond - D_uncond)``: classifier-free guidance when ``guide`` is None
    (D_uncond = this network with the null label, in one call on the doubled batch), autoguidance
    when ``guide`` is a second network of the same family (D_uncond = the guide with the same labels,
    EDM2's ``D = D_guide + w (D_main - D_guide)``). ``interval`` [lo, hi]: guidance only where the
    noise level sigma/alpha lies in it (Kynkaanniemi et al. 2024), elsewhere w = 1.
    ``channels`` (static): guide only the first ``channels`` channels, the others are the
    conditional prediction (DiT's original ``forward_with_cfg`` guides 3 of 4); None: all.
    ``classifier`` and ``classifier_scale``: classifier guidance by a noisy-image classifier
    (:func:`jdiffsample.models.classifier_guidance`), towards ``labels``, after any other guidance.
    ``conditioning``: per-sample arrays the family's denoiser needs (the upsampler's ``low_res``,
    Stable Diffusion's text embeddings); ``uncond_conditioning``: their unconditional values
    (the negative prompt), which classifier-free guidance then uses instead of a null label.
    ``guidance_rescale``: Lin et al. (2023)'s rescale of the guided prediction, phi in [0, 1], as
    diffusers computes it (standard deviations in the network's output space).
    ``threshold`` (static) and ``threshold_params`` [ratio, max]: thresholding of the data
    prediction (:func:`jdiffsample.models.threshold`), after classifier-free guidance and before
    classifier guidance, in guided-diffusion's order (it clips, then shifts by the classifier).
    """

    model: Model
    labels: Any = None
    guidance: Any = None
    guide: Model | None = None
    interval: Any = None
    classifier: Model | None = None
    classifier_scale: Any = None
    conditioning: Any = None
    uncond_conditioning: Any = None
    guidance_rescale: Any = None
    threshold_params: Any = None
    channels: int | None = None
    threshold: str | None = None

    @classmethod
    def create(cls, model: Model, labels=None, *, guidance=None, guide=None, interval=None,
               channels="default", classifier: Model | None = None, classifier_scale=None,
               conditioning=None, uncond_conditioning=None, guidance_rescale=None, threshold: str | None = None,
               threshold_ratio=0.995, threshold_max=1.0) -> "Denoiser":
        fam = model.family_info
        if fam.denoise is None:
            raise ValueError(f"{model.family} networks are not diffusion models")
        uncond_conditioning = None if uncond_conditioning is None else _check_conditioning(model, uncond_conditioning)
        if guidance is not None:
            if guide is None and uncond_conditioning is None and not (model.num_classes and
                                                                       fam.has_null_label(model.module)):
                raise ValueError(f"classifier-free guidance needs a class-conditional network with an "
                                 f"unconditional mode; this {model.family} network has none (use a guide network)")
            if guide is not None and (guide.family != model.family or guide.num_classes not in (0, model.num_classes)
                                      or guide.sample_shape != model.sample_shape):
                raise ValueError(f"the guide must be a {model.family} network with {model.num_classes} classes (or "
                                 f"unconditional) and sample shape {model.sample_shape}, got {guide.family} with "
                                 f"{guide.num_classes} classes and {guide.sample_shape}")
            guidance = jnp.asarray(guidance, jnp.float32)
            if guidance.ndim:
                raise ValueError(f"guidance must be a scalar weight, got shape {guidance.shape}")
        elif guide is not None or interval is not None or guidance_rescale is not None:
            raise ValueError("a guide network, a guidance interval or a guidance rescale needs a guidance weight")
        if guidance_rescale is not None:
            guidance_rescale = jnp.asarray(guidance_rescale, jnp.float32)
        if interval is not None:
            interval = jnp.asarray(interval, jnp.float32)
            if interval.shape != (2,):
                raise ValueError(f"the guidance interval must be [lo, hi], got shape {interval.shape}")
        labels = _check_labels(model, labels)
        if channels == "default":
            channels = fam.guidance_channels(model.module)
        n = model.sample_shape[-1]
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)
                                     or not 1 <= channels <= n):
            raise ValueError(f"guidance channels must be None (all) or an integer in [1, {n}], got {channels!r}")
        if (classifier is None) != (classifier_scale is None):
            raise ValueError("classifier guidance needs both a classifier and a classifier scale")
        if classifier is not None:
            _check_classifier(model, classifier, labels)
            classifier_scale = jnp.asarray(classifier_scale, jnp.float32)
        conditioning = _check_conditioning(model, conditioning)
        params = None
        if threshold is not None:
            from jdiffsample.models import THRESHOLDS

            if threshold not in THRESHOLDS:
                raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
            params = jnp.asarray([threshold_ratio, threshold_max], jnp.float32)
        return cls(model, labels, guidance, guide, interval, classifier, classifier_scale, conditioning,
                   uncond_conditioning, guidance_rescale, params, None if channels == n else channels, threshold)

    @property
    def schedule(self):
        return self.model.schedule

    def with_labels(self, labels) -> "Denoiser":
        return dataclasses.replace(self, labels=_check_labels(self.model, labels))

    def _call(self, model: Model, x, t, labels, conditioning):
        fam = model.family_info
        return fam.denoise(model.module, model.variables, x, t, labels, model.schedule,
                           **(conditioning or {})).astype(x.dtype)

    def __call__(self, x, t):
        from jdiffsample import models

        x0 = self._guided(x, t)
        if self.threshold is not None:
            x0 = models.threshold(x0, self.threshold, self.threshold_params[0], self.threshold_params[1])
        if self.classifier is None:
            return x0
        fam, c = self.classifier.family_info, self.classifier
        return models.classifier_guidance(x0, x, t, self.labels, lambda y: fam.classify(c.module, c.variables, y, t,
                                                                                          self.model.schedule),
                                          self.classifier_scale, self.model.schedule)

    def _guided(self, x, t):
        if self.guidance is None:
            return self._call(self.model, x, t, self.labels, self.conditioning)
        if self.guide is None:  # one call on the doubled batch: the null label or the uncond conditioning
            labels = None if self.labels is None else jnp.concatenate([self.labels, jnp.full_like(self.labels, -1)])
            other = self.conditioning if self.uncond_conditioning is None else self.uncond_conditioning
            both = None if self.conditioning is None else jax.tree.map(
                lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape)]), self.conditioning, other)
            cond, uncond = jnp.split(self._call(self.model, jnp.concatenate([x, x]), t, labels, both), 2)
        else:
            cond = self._call(self.model, x, t, self.labels, self.conditioning)
            uncond = self._call(self.guide, x, t, self.labels if self.guide.num_classes else None, self.conditioning)
        w = self.guidance
        if self.interval is not None:
            level = self.model.schedule.edm_sigma(jnp.asarray(t, jnp.float32))
            w = jnp.where((level >= self.interval[0]) & (level <= self.interval[1]), w, 1.0)
        guided = uncond + w.astype(x.dtype) * (cond - uncond)
        if self.guidance_rescale is not None:
            from jdiffsample import models

            guided = models.rescale_guidance(guided, cond, x, t, self.model.schedule,
                                             self.model.family_info.prediction(self.model.module),
                                             self.guidance_rescale)
        if self.channels is None:
            return guided
        return jnp.concatenate([guided[..., : self.channels], cond[..., self.channels:]], axis=-1)


jax.tree_util.register_dataclass(
    Denoiser, data_fields=["model", "labels", "guidance", "guide", "interval", "classifier", "classifier_scale",
                           "conditioning", "uncond_conditioning", "guidance_rescale", "threshold_params"],
    meta_fields=["channels", "threshold"])


def _check_classifier(model: Model, classifier: Model, labels) -> None:
    fam = classifier.family_info
    if fam.classify is None:
        raise ValueError(f"a {classifier.family} network is not a noisy-image classifier")
    if labels is None:
        raise ValueError("classifier guidance needs labels (the classes to guide towards)")
    size, classes = fam.sample_shape(classifier.module), fam.num_classes(classifier.module)
    if tuple(size) != tuple(model.sample_shape) or (model.num_classes and classes != model.num_classes):
        raise ValueError(f"the classifier takes {tuple(size)} images and has {classes} classes; the model samples "
                         f"{tuple(model.sample_shape)} with {model.num_classes} classes")


def _check_conditioning(model: Model, conditioning):
    needed = tuple(model.family_info.conditioning(model.module))
    given = tuple(sorted(conditioning or {}))
    if tuple(sorted(needed)) != given:
        raise ValueError(f"this {model.family} denoiser needs the conditioning {list(needed) or 'none'}, "
                         f"got {list(given) or 'none'}")
    return None if not needed else {k: jnp.asarray(v) for k, v in conditioning.items()}

"""A loaded network as a value: a pytree that jitted programs take as an argument.

:class:`Model` holds what defines the network (family, class, constructor kwargs, schedule, compute
dtype: static, hashable) and its variables (traced leaves). :class:`Denoiser` is the network call
followed by the guidance chain of :mod:`jdiffsample.guidance` (labels, conditioning, guidance weights:
traced leaves) and is the solvers' ``denoise(x, t)``. So other weights of the same shapes, other
labels, another guidance weight or other Skip-Tuning scales reuse a compiled program::

    model = nets.load_model("ckpt/edm-cifar10")
    denoise = model.denoiser(labels=jnp.arange(16) % 10, guidance=1.5)
    x0 = jdiffsample.sample(denoise, x, ts, model.schedule, "unipc")
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import guidance as guidance_chain
from jdiffsample import schedules
from jdiffsample.nets import families  # the module (nets.family_names is its names())
from jdiffsample.nets.family import Family
from jdiffsample.nets.formats import checkpoint
from jdiffsample.nets.formats.torchfile import json_value

__all__ = ["Model", "Denoiser", "Classifier", "load", "load_model", "from_config", "save", "build", "convert",
           "random_variables", "model_digest", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: config.json entries that are not run-time information of a family
_STANDARD = {"format", "format_version", "family", "class_name", "kwargs", "schedule", "latent", "versions",
             "checksums", "digest", "files", "source"}


def build(family_name: str, class_name: str, kwargs, *, dtype=jnp.float32):
    """The Flax module of ``family_name`` for ``class_name`` and its constructor kwargs."""
    return families.get(family_name).build(class_name, kwargs, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _build(family: str, class_name: str, kwargs_json: str, dtype: str):
    return build(family, class_name, json.loads(kwargs_json), dtype=DTYPES[dtype])


@functools.lru_cache(maxsize=64)
def _schedule(family: str, schedule_json: str):
    if schedule_json == "null":
        raise ValueError(f"{family} networks are not diffusion models: they have no schedule")
    return schedules.from_config(json.loads(schedule_json))


def _canonical(value) -> str:
    return json.dumps(json_value(value), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Model:
    """A converted network and its variables. Static: ``family``, ``class_name``, ``kwargs_json``,
    ``schedule_json``, ``dtype``, ``latent_json`` (a latent model's decoding spec, see
    :mod:`jdiffsample.nets.latent`; "null" for pixel models), ``extra_json`` (the family's other
    config entries, e.g. a diffusers scheduler config); traced: ``variables``."""

    family: str
    class_name: str
    kwargs_json: str
    schedule_json: str
    dtype: str
    variables: Any
    latent_json: str = "null"
    extra_json: str = "{}"

    @property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)

    @property
    def extra(self) -> dict:
        return json.loads(self.extra_json)

    @property
    def family_info(self) -> Family:
        return families.get(self.family)

    @property
    def sampling(self):
        """The family's :class:`jdiffsample.nets.family.Sampling` (``ValueError`` for other networks)."""
        spec = self.family_info.sampling
        if spec is None:
            raise ValueError(f"{self.family} networks are not diffusion models; sample from a diffusion model")
        return spec

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
        return int(self.sampling.num_classes(self.module))

    @property
    def sample_shape(self) -> tuple:
        return tuple(int(v) for v in self.sampling.sample_shape(self.module))

    def apply(self, *args, **kwargs):
        """``module.apply(variables, *args, **kwargs)``."""
        return self.module.apply(self.variables, *args, **kwargs)

    def with_variables(self, variables) -> "Model":
        return dataclasses.replace(self, variables=variables)

    def with_dtype(self, dtype) -> "Model":
        """The same network computing in ``dtype`` ('float32' or 'bfloat16')."""
        name = jnp.dtype(dtype).name
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name}")
        return dataclasses.replace(self, dtype=name)

    def denoiser(self, labels=None, **options) -> "Denoiser":
        """The solvers' ``denoise(x, t)`` for this network; ``options`` as for :meth:`Denoiser.create`."""
        return Denoiser.create(self, labels, **options)


jax.tree_util.register_dataclass(
    Model, data_fields=["variables"],
    meta_fields=["family", "class_name", "kwargs_json", "schedule_json", "dtype", "latent_json", "extra_json"])


def from_config(config: Mapping, variables, dtype="float32") -> Model:
    """A :class:`Model` from a checkpoint's ``config.json`` dict and its variables."""
    fam = families.get(config["family"])
    schedule = config.get("schedule")
    if fam.sampling is not None and schedule is None:
        raise ValueError(f"the {fam.name} config has no schedule entry")
    extra = {k: v for k, v in config.items() if k not in _STANDARD}
    model = Model(config["family"], config["class_name"], _canonical(config["kwargs"]), _canonical(schedule),
                  "float32", variables, _canonical(config.get("latent")), _canonical(extra))
    return model.with_dtype(dtype)


def load_model(name_or_dir, *, dtype="float32", verify: bool = True, shardings=None, host: bool = False) -> Model:
    """A checkpoint folder (or bundled model name) as a :class:`Model`, every array checked against
    its recorded checksum; ``shardings(path, shape)`` places the arrays (default: this process's
    first device); ``host``: NumPy arrays in host memory instead (placed later, e.g. split over
    devices by a runner)."""
    path = checkpoint.resolve(name_or_dir)
    config = checkpoint.read_config(path)
    families.get(config["family"])  # a known family, before reading any weights
    variables = checkpoint.restore(path, verify=verify, shardings=shardings, host=host)
    return from_config(config, variables, dtype)


def load(name_or_dir) -> tuple[Any, Any]:
    """``(module, variables)`` of a checkpoint: ``module.apply(variables, ...)`` runs the network."""
    model = load_model(name_or_dir)
    return model.module, model.variables


def model_digest(path) -> str:
    """The digest of a checkpoint's weights, recorded at conversion (computed from its arrays for
    checkpoints written before digests were recorded)."""
    config = checkpoint.read_config(path)
    if config.get("digest"):
        return config["digest"]
    return checkpoint.digest(checkpoint.checksums(checkpoint.restore(path, verify=False)))


def save(dst, family: str, class_name: str, kwargs: Mapping[str, Any], variables,
         extra: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write a checkpoint of ``family`` (``config.json`` + variables, atomically). ``extra`` adds
    config entries; without a ``schedule`` entry a diffusion family records its default schedule."""
    fam = families.get(family)
    config = dict(family=family, class_name=class_name, kwargs=dict(kwargs), **dict(extra or {}))
    if "schedule" not in config and fam.conversion.schedule is not None:
        config["schedule"] = fam.conversion.schedule(class_name, kwargs, dict(extra or {})).to_config()
    return checkpoint.write(dst, config, variables, overwrite=overwrite)


def convert(family_name: str, src, dst, **options) -> dict:
    """Convert original weights ``src`` of a family into a checkpoint folder ``dst``; returns a
    summary (``jdiffsample convert FAMILY SRC DST`` runs this)."""
    return families.get(family_name).conversion.convert(src, dst, **options)


def random_variables(module, *example_args, seed: int = 0) -> dict:
    """Variables for ``module.init(key, *example_args)`` with every parameter random,
    ``N(0, 1 / fan_in)``, and every other collection (Skip-Tuning scales) at one.

    For tests and benchmarks: a freshly initialised network has zero-initialised output layers,
    which would make every sampler return the same images and hide differences.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *example_args)
    rng = np.random.default_rng(seed)

    def rand(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 4
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

    return {name: jax.tree.map(rand if name == "params" else (lambda s: np.ones(s.shape, np.float32)), tree)
            for name, tree in shapes.items()}


# ---------------------------------------------------------------------------------------------
# The denoiser


def _check_labels(model: Model, labels):
    n = model.num_classes
    if labels is None:
        if n and not model.sampling.has_null_label(model.module):
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


def _check_conditioning(model: Model, conditioning):
    needed = tuple(model.sampling.conditioning(model.module))
    given = tuple(sorted(conditioning or {}))
    if tuple(sorted(needed)) != given:
        raise ValueError(f"this {model.family} denoiser needs the conditioning {list(needed) or 'none'}, "
                         f"got {list(given) or 'none'}")
    return None if not needed else {k: jnp.asarray(v) for k, v in conditioning.items()}


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A converted noisy-image classifier as ``classify(x, t) -> logits`` at the diffusion model's
    time ``t`` (``schedule``: the diffusion model's, static)."""

    model: Model
    schedule: Any

    def __call__(self, x, t):
        c = self.model
        return c.family_info.classify(c.module, c.variables, x, t, self.schedule)


jax.tree_util.register_dataclass(Classifier, data_fields=["model"], meta_fields=["schedule"])


def _check_classifier(model: Model, classifier: Model, labels) -> None:
    fam = classifier.family_info
    if fam.classify is None:
        raise ValueError(f"a {classifier.family} network is not a noisy-image classifier")
    if labels is None:
        raise ValueError("classifier guidance needs labels (the classes to guide towards)")
    size, classes = fam.classifier_shape(classifier.module)
    if tuple(size) != tuple(model.sample_shape) or (model.num_classes and classes != model.num_classes):
        raise ValueError(f"the classifier takes {tuple(size)} images and has {classes} classes; the model samples "
                         f"{tuple(model.sample_shape)} with {model.num_classes} classes")


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """``denoise(x, t)`` of a network: its prediction at ``(x, t)`` for ``labels`` and
    ``conditioning``, then the guidance chain (:class:`jdiffsample.guidance.Guidance`).

    Classifier-free guidance takes its unconditional prediction from the same network in one call on
    the doubled batch (the null label, -1, or ``uncond_conditioning``: a negative prompt), or from
    ``guide``, a second network of the same family (autoguidance, with the same labels where the
    guide is conditional).
    """

    model: Model
    labels: Any = None
    conditioning: Any = None
    uncond_conditioning: Any = None
    guide: Model | None = None
    guidance: guidance_chain.Guidance = guidance_chain.Guidance()

    @classmethod
    def create(cls, model: Model, labels=None, *, guidance=None, guide=None, interval=None,
               channels="default", classifier: Model | None = None, classifier_scale=None,
               conditioning=None, uncond_conditioning=None, guidance_rescale=None, threshold: str | None = None,
               threshold_ratio=0.995, threshold_max=1.0) -> "Denoiser":
        """Check every argument against ``model`` and build the chain: ``guidance`` (None: off) the
        weight w of ``D_u + w (D_c - D_u)``, with ``interval`` [lo, hi] of sigma/alpha, ``channels``
        (the family's default, None for all, or the first N), ``guidance_rescale`` phi; then
        ``threshold`` ('static' or 'dynamic', with its ratio and maximum); then classifier guidance by
        ``classifier`` with ``classifier_scale`` towards ``labels``."""
        spec = model.sampling
        uncond_conditioning = None if uncond_conditioning is None else _check_conditioning(model, uncond_conditioning)
        labels = _check_labels(model, labels)
        cfg = None
        if guidance is not None:
            if guide is None and uncond_conditioning is None and not (model.num_classes and
                                                                       spec.has_null_label(model.module)):
                raise ValueError(f"classifier-free guidance needs a class-conditional network with an "
                                 f"unconditional mode; this {model.family} network has none (use a guide network)")
            if guide is not None and (guide.family != model.family or guide.num_classes not in (0, model.num_classes)
                                      or guide.sample_shape != model.sample_shape):
                raise ValueError(f"the guide must be a {model.family} network with {model.num_classes} classes (or "
                                 f"unconditional) and sample shape {model.sample_shape}, got {guide.family} with "
                                 f"{guide.num_classes} classes and {guide.sample_shape}")
            n = model.sample_shape[-1]
            if channels == "default":
                channels = spec.guidance_channels(model.module)
            if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)
                                         or not 1 <= channels <= n):
                raise ValueError(f"guidance channels must be None (all) or an integer in [1, {n}], got {channels!r}")
            cfg = guidance_chain.CFG.create(guidance, interval=interval, rescale=guidance_rescale,
                                            channels=None if channels == n else channels,
                                            prediction=spec.prediction(model.module))
        elif guide is not None or interval is not None or guidance_rescale is not None:
            raise ValueError("a guide network, a guidance interval or a guidance rescale needs a guidance weight")
        thresh = None if threshold is None else guidance_chain.Threshold.create(threshold, threshold_ratio,
                                                                                threshold_max)
        if (classifier is None) != (classifier_scale is None):
            raise ValueError("classifier guidance needs both a classifier and a classifier scale")
        by_classifier = None
        if classifier is not None:
            _check_classifier(model, classifier, labels)
            by_classifier = guidance_chain.ClassifierGuidance(Classifier(classifier, model.schedule),
                                                              jnp.asarray(classifier_scale, jnp.float32))
        chain = guidance_chain.Guidance(cfg, thresh, by_classifier)
        return cls(model, labels, _check_conditioning(model, conditioning), uncond_conditioning, guide, chain)

    @property
    def schedule(self):
        return self.model.schedule

    def with_labels(self, labels) -> "Denoiser":
        return dataclasses.replace(self, labels=_check_labels(self.model, labels))

    def with_skip_layer_guidance(self, layers, scale, times) -> "Denoiser":
        """This denoiser with skip-layer guidance (:class:`jdiffsample.guidance.SkipLayerGuidance`):
        ``scale (D_c - D_skip)`` added where ``times[0] <= t <= times[1]``, ``D_skip`` the network with
        its blocks ``layers`` bypassed. Needs classifier-free guidance and a family whose network can
        skip blocks (SD3)."""
        count = self.model.sampling.skip_layers
        if count is None:
            raise ValueError(f"{self.model.family} networks cannot skip blocks: skip-layer guidance is for SD3 models")
        if self.guidance.cfg is None:
            raise ValueError("skip-layer guidance acts with classifier-free guidance: give a guidance weight")
        slg = guidance_chain.SkipLayerGuidance.create(layers, scale, times)
        n = count(self.model.module)
        if max(slg.layers) >= n:
            raise ValueError(f"skip-layer guidance's blocks must lie in [0, {n - 1}] (this network has {n}), got "
                             f"{list(slg.layers)}")
        return dataclasses.replace(self, guidance=dataclasses.replace(self.guidance, skip_layers=slg))

    def __call__(self, x, t):
        if self.guidance.cfg is None:
            cond, uncond = _network(self.model, x, t, self.labels, self.conditioning), None
        elif self.guide is None:  # one call on the doubled batch: the null label or the uncond conditioning
            labels = None if self.labels is None else jnp.concatenate([self.labels, jnp.full_like(self.labels, -1)])
            other = self.conditioning if self.uncond_conditioning is None else self.uncond_conditioning
            both = None if self.conditioning is None else jax.tree.map(
                lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape)]), self.conditioning, other)
            cond, uncond = jnp.split(_network(self.model, jnp.concatenate([x, x]), t, labels, both), 2)
        else:
            cond = _network(self.model, x, t, self.labels, self.conditioning)
            uncond = _network(self.guide, x, t, self.labels if self.guide.num_classes else None, self.conditioning)
        skipped, slg = None, self.guidance.skip_layers
        if slg is not None:  # computed only in the steps where it acts
            skipped = jax.lax.cond(
                slg.active(t), lambda: _network(self.model, x, t, self.labels, self.conditioning, slg.layers),
                lambda: cond)
        return self.guidance(cond, uncond, x, t, self.model.schedule, self.labels, skipped)


jax.tree_util.register_dataclass(
    Denoiser, data_fields=["model", "labels", "conditioning", "uncond_conditioning", "guide", "guidance"],
    meta_fields=[])


@functools.partial(jax.jit, inline=True, static_argnums=5)
def _network(model: Model, x, t, labels, conditioning, skip_layers: tuple = ()):
    """The network's denoised prediction. Jitted and inlined: tracing a network is most of the time
    of building a program that calls it, and its traced form is kept for every later program that
    calls the same network on arguments of the same shapes (the grid-learning steps, the teacher,
    the sampling program, other runs in the process); called eagerly, it is one compiled call
    instead of one per operation. ``skip_layers``: blocks to bypass (skip-layer guidance)."""
    options = dict(conditioning or {}, **({"skip_layers": skip_layers} if skip_layers else {}))
    return model.sampling.denoise(model.module, model.variables, x, t, labels, model.schedule,
                                  **options).astype(x.dtype)

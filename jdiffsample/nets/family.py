"""Network families: what is known about one kind of network, declared once in its own module.

A family module (``jdiffsample/nets/edm.py``, ``adm.py``, ...) holds the Flax port and ends with
``FAMILY = Family(...)``; :mod:`jdiffsample.nets.families` lists every family in one tuple. A
family says how to build its Flax module from the original constructor's kwargs, and then, in two
separate records, what converting its files needs (:class:`Conversion`: the ``jdiffsample
convert`` sub-command) and what sampling from it needs (:class:`Sampling`: the denoiser, its
conditioning, shapes and guidance defaults; None for networks that are not diffusion models).
Nothing outside the family module branches on the family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

__all__ = ["Family", "Conversion", "Sampling"]


def _none(module):
    return None


def _no_conditioning(module) -> tuple:
    return ()


def _zero(module) -> int:
    return 0


def _false(module) -> bool:
    return False


def _epsilon(module) -> str:
    return "epsilon"


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What ``jdiffsample convert FAMILY SRC DST`` needs.

    Attributes:
      convert: ``(src, dst, *, overwrite=False, **options) -> dict`` summary: reads the original files,
        writes a checkpoint with :func:`jdiffsample.nets.save_converted`.
      arguments: ``parser -> None``: the sub-command's options besides SRC and DST (their ``dest``
        names are ``convert``'s keyword options).
      schedule: ``(class_name, kwargs, extra) -> Schedule``: the schedule :func:`jdiffsample.nets.save`
        records when the caller gives none (diffusion models only).
    """

    convert: Callable
    arguments: Callable[[Any], None] = lambda parser: None
    schedule: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What sampling from a diffusion network of the family needs. Functions of the Flax ``module``
    read its configuration; the others take a :class:`jdiffsample.nets.Model`.

    Attributes:
      denoise: ``(module, variables, x, t, labels, schedule, **conditioning) -> x0_hat`` in the
        schedule's coordinates (``t`` a scalar time; ``labels`` int32 ``[B]``, -1 the null label, or
        None; ``conditioning`` the arrays named by ``conditioning``).
      sample_shape: ``module -> (H, W, C)`` of what the model samples (latents for latent models).
      num_classes: ``module -> int`` (0: unconditional).
      has_null_label: ``module -> bool``: label -1 is the unconditional model (classifier-free
        guidance with this network alone works).
      guidance_channels: ``module -> int | None``: the default number of leading channels guidance
        acts on (None: all).
      conditioning: ``module -> tuple`` of the names of per-sample arrays ``denoise`` needs besides
        labels (the upsampler's ``low_res``, text embeddings).
      encode_prompts: text-conditional families: ``(model, folder, prompts, height, width, **options)
        -> {name: [P, ...]}``, the conditioning arrays of each prompt.
      sample_shape_at: families that sample any size: ``(module, height, width) -> (h, w, c)``
        (``ValueError`` for a size the network cannot take); ``pixels_per_latent``: ``module -> int``,
        the image pixels per sample pixel along each side (the VAE's factor), which makes the default
        image size of ``sample_shape``.
      prediction: ``module -> 'epsilon' | 'v_prediction' | 'sample'``: the network's output type, the
        space in which guidance rescale measures standard deviations.
      grids: time grids of the family's own, ``{name: (model, n_steps, height, width) -> N + 1 times}``
        (``height``/``width``: the image size, None for families that sample one size).
      skip_tuning: whether the module carries Skip-Tuning scales (the ``"skip"`` collection).
      sharding: ``(path, shape, n) -> axis | None``: the axis along which a parameter is split over
        ``n`` devices (None: the generic rule of :mod:`jdiffsample.nets.sharding`).
      schedule_at: families whose schedule depends on the image size (FLUX.1-dev's dynamic time
        shift): ``(model, height, width) -> Schedule``.
      guidance_input: ``module -> bool``: whether the guidance weight is an input of the network
        (FLUX.1-dev's distilled guidance, passed to ``encode_prompts`` as ``guidance=``) instead of
        classifier-free guidance, which then takes the ``true_cfg`` setting.
      prompt_options: the settings ``encode_prompts`` takes as keyword options
        (``max_sequence_length`` of T5 encoders).
      default_guidance: the guidance input used when the settings give none (with ``guidance_input``).
      true_cfg: classifier-free guidance takes its weight from the ``true_cfg`` setting (FLUX.1,
        whose ``guidance`` setting is the network's input where it has one).
      skip_layers: ``module -> int``: the number of blocks ``denoise(..., skip_layers=(i, ...))`` can
        bypass, for skip-layer guidance (SD3.5); None: the family has none.
    """

    denoise: Callable
    sample_shape: Callable
    num_classes: Callable[[Any], int] = _zero
    has_null_label: Callable[[Any], bool] = _false
    guidance_channels: Callable[[Any], int | None] = _none
    conditioning: Callable[[Any], tuple] = _no_conditioning
    encode_prompts: Callable | None = None
    sample_shape_at: Callable | None = None
    pixels_per_latent: Callable[[Any], int] | None = None
    prediction: Callable[[Any], str] = _epsilon
    grids: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    skip_tuning: bool = False
    sharding: Callable | None = None
    schedule_at: Callable | None = None
    guidance_input: Callable[[Any], bool] = _false
    prompt_options: tuple = ()
    default_guidance: float | None = None
    true_cfg: bool = False
    skip_layers: Callable[[Any], int] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """One network family.

    Attributes:
      name: ``config.json``'s ``family`` and the ``convert`` sub-command.
      description: one line for help texts.
      build: ``(class_name, kwargs, *, dtype) -> flax module`` from the original constructor's kwargs.
      example_inputs: ``module -> tuple`` of arrays for ``module.init(key, *inputs)``.
      conversion: :class:`Conversion`.
      sampling: :class:`Sampling`, or None for networks that are not diffusion models.
      classify: noisy-image classifiers: ``(module, variables, x, t, schedule) -> logits`` at the
        diffusion model's time ``t`` (classifier guidance); ``sample_shape`` and ``num_classes``
        of a classifier are read from ``classifier_shape``.
      classifier_shape: classifiers: ``module -> ((H, W, C), num_classes)``.
    """

    name: str
    description: str
    build: Callable
    example_inputs: Callable
    conversion: Conversion
    sampling: Sampling | None = None
    classify: Callable | None = None
    classifier_shape: Callable | None = None

    @property
    def is_diffusion_model(self) -> bool:
        return self.sampling is not None

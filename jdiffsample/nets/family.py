"""Network families: what is known about one kind of network, declared once in its own module.

A family module (``jdiffsample/nets/edm.py``, ``adm.py``, ...) holds the Flax port and ends with
``FAMILY = Family(...)``: how to build the module from the original constructor's kwargs, how to
convert the original files (its ``jdiffsample convert`` sub-command), the schedule and
prediction type, how to call the network as a denoiser and how labels condition it. Nothing
outside the family module branches on the family: the rest of the package asks :func:`get`.

Families are found by looking for ``FAMILY`` in the modules of this package, so adding one is
adding one file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

__all__ = ["Family", "get", "get_family", "names", "all_families"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One network family.

    Attributes:
      name: the family's name (``config.json``'s ``family``, the ``convert`` sub-command).
      description: one line for help texts.
      build: ``(class_name, kwargs, *, dtype) -> flax module`` from the original constructor's
        keyword arguments.
      example_inputs: ``module -> tuple`` of arrays for ``module.init(key, *inputs)``.
      convert: ``(src, dst, *, overwrite=False, **options) -> dict`` summary: reads the original
        files, writes a checkpoint with :func:`jdiffsample.nets.checkpoint.save`.
      convert_arguments: ``parser -> None``: the sub-command's options besides SRC and DST (their
        ``dest`` names are ``convert``'s keyword options).
      schedule_info: ``(class_name, kwargs, extra) -> dict``: the schedule recorded in
        ``config.json`` when the converter gives none (None: not a diffusion model).
      schedule: ``info -> jdiffsample.schedules.Schedule``.
      denoise: ``(module, variables, x, t, labels, schedule) -> x0_hat`` in the schedule's
        coordinates (``t`` a scalar time; ``labels`` int32 ``[B]``, -1 the null label, or None).
      sample_shape: ``module -> (H, W, C)`` of what the model samples.
      num_classes: ``module -> int`` (0: unconditional).
      has_null_label: ``module -> bool``: whether label -1 (unconditional) is meaningful, i.e.
        classifier-free guidance with this network alone works.
      guidance_channels: ``module -> int | None``: the default number of leading channels that
        guidance acts on (None: all).
      conditioning: ``module -> tuple`` of the names of per-sample arrays ``denoise`` needs besides
        labels, passed as keyword arguments (the upsampler's ``low_res``, Stable Diffusion's text
        embeddings).
      encode_prompts: text-conditional families: ``(model, prompts, height, width) -> {name: [P, ...]}``,
        the conditioning arrays of each prompt (a :class:`jdiffsample.nets.Model` is passed).
      sample_shape_at: families that sample any size: ``(module, height, width) -> (h, w, c)`` of
        the samples for images of ``height`` x ``width`` pixels (``ValueError`` for a bad size).
      prediction: ``module -> 'epsilon' | 'v_prediction' | 'sample'``: the network's output, the
        space in which guidance rescale (Lin et al. 2023) measures standard deviations.
      grids: time grids of the family's own, ``{name: (model, n_steps) -> N + 1 times}``
        (Stable Diffusion's ``diffusers``: the timesteps of the folder's diffusers scheduler).
      classify: for noisy-image classifiers: ``(module, variables, x, t, schedule) -> logits`` at
        the diffusion model's time ``t`` (classifier guidance).
      skip_tuning: whether the module carries Skip-Tuning scales (the ``"skip"`` collection).
    """

    name: str
    description: str
    build: Callable
    example_inputs: Callable
    convert: Callable
    convert_arguments: Callable
    schedule_info: Callable | None = None
    schedule: Callable | None = None
    denoise: Callable | None = None
    sample_shape: Callable | None = None
    num_classes: Callable[[Any], int] = lambda module: 0
    has_null_label: Callable[[Any], bool] = lambda module: False
    guidance_channels: Callable[[Any], int | None] = lambda module: None
    conditioning: Callable[[Any], tuple] = lambda module: ()
    encode_prompts: Callable | None = None
    sample_shape_at: Callable | None = None
    prediction: Callable[[Any], str] = lambda module: "epsilon"
    grids: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    classify: Callable | None = None
    skip_tuning: bool = False

    @property
    def is_diffusion_model(self) -> bool:
        return self.denoise is not None


_FAMILIES: dict[str, Family] = {}
_SCANNED = False


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    import jdiffsample.nets as package

    for info in pkgutil.iter_modules(package.__path__):
        source = Path(package.__path__[0]) / f"{info.name}.py"
        if info.name.startswith("_") or not source.is_file() or "\nFAMILY = " not in source.read_text():
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            _FAMILIES[family.name] = family
    _SCANNED = True


def names() -> list[str]:
    """Names of all families, sorted."""
    _scan()
    return sorted(_FAMILIES)


def all_families() -> list[Family]:
    return [_FAMILIES[name] for name in names()]


def get(name: str) -> Family:
    """The family ``name``; ``ValueError`` naming the known ones."""
    _scan()
    if name not in _FAMILIES:
        raise ValueError(f"unknown network family {name!r}; choose one of {', '.join(names())}")
    return _FAMILIES[name]


get_family = get

"""What a run is: its settings, checked before anything is compiled, and the time grid they give.

:class:`Settings` is everything that decides the images (and nothing that does not: batch size,
devices and processes are not settings). :class:`Program` is the part of it that the compiled
program is specialized on; the rest (seed, labels, grid values, guidance weight, Skip-Tuning scales,
the weights) are arguments of that program, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Settings", "Program", "check_positive_int", "check_labels", "make_grid", "json_options", "grid_names"]


@dataclasses.dataclass(frozen=True)
class Program:
    """The static part of the compiled sampling program."""

    solver: str
    options: tuple       # sorted (name, value) pairs
    sample_shape: tuple  # (H, W, C) of one sample (latents for latent models)
    micro_batch: int
    n_classes: int = 0
    latents_only: bool = False
    stage: int = 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the images of a run (recorded in its manifest)."""

    solver: str
    options: tuple           # the resolved options, sorted (name, value) pairs of JSON values
    nfe: int
    n_steps: int
    grid: str                # a name in GRIDS, or 'custom'
    grid_values: tuple       # the N + 1 times
    skip_tuning: float | None
    guidance: float | None
    guidance_interval: tuple | None
    class_labels: Any        # None, 'random' or a tuple of labels cycled by index
    seed: int
    sample_shape: tuple      # of the samples: latents for latent models
    micro_batch: int
    dtype: str
    guidance_channels: int | None = None
    latents_only: bool = False
    n_classes: int = 0
    threshold: str | None = None
    threshold_ratio: float = 0.995
    threshold_max: float = 1.0
    classifier_scale: float | None = None
    stage: int = 1
    prompts: tuple | None = None
    negative_prompts: tuple | None = None
    guidance_rescale: float | None = None
    height: int | None = None
    width: int | None = None

    @property
    def program(self) -> Program:
        return Program(self.solver, self.options, self.sample_shape, self.micro_batch, self.n_classes,
                       self.latents_only, self.stage)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["options"] = {k: v for k, v in self.options}
        return json.loads(json.dumps(out))

    @classmethod
    def from_json(cls, data: dict) -> dict:
        """The keyword arguments of :class:`jdiffsample.pipeline.Sampler` that reproduce ``data``."""
        labels = data["class_labels"]
        return dict(solver=data["solver"], options=data["options"], nfe=data["nfe"],
                    grid=data["grid"] if data["grid"] != "custom" else data["grid_values"],
                    skip_tuning=data["skip_tuning"], guidance=data["guidance"],
                    guidance_interval=data.get("guidance_interval"),
                    class_labels=labels if not isinstance(labels, list) else tuple(labels), seed=data["seed"],
                    micro_batch=data["micro_batch"], dtype=data.get("dtype", "float32"),
                    guidance_channels=data.get("guidance_channels"), latents_only=data.get("latents_only", False),
                    threshold=data.get("threshold"), threshold_ratio=data.get("threshold_ratio", 0.995),
                    threshold_max=data.get("threshold_max", 1.0), classifier_scale=data.get("classifier_scale"),
                    prompts=data.get("prompts"), negative_prompts=data.get("negative_prompts"),
                    guidance_rescale=data.get("guidance_rescale"), height=data.get("height"), width=data.get("width"))


def check_positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def json_options(solver, options: dict) -> tuple:
    """The solver's resolved options as sorted pairs of JSON values (functions are refused)."""
    resolved = solver.resolve(options)
    for name, value in resolved.items():
        if callable(value):
            raise ValueError(f"option {name} must be a number, string or list here, not a function")
    plain = json.loads(json.dumps(resolved))
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in plain.items()))


def check_labels(class_labels, n_classes: int):
    """``class_labels`` as None, ``'random'`` or a tuple of ints (cycled by index)."""
    if n_classes == 0:
        if class_labels is not None:
            raise ValueError("class labels were given, but the model is unconditional")
        return None
    if class_labels is None or class_labels == "random":
        return "random"
    values = [class_labels] if isinstance(class_labels, (int, np.integer)) else class_labels
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"class labels must be 'random', a label or a list of labels, got {class_labels!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n_classes:
            raise ValueError(f"class label {v!r} is not an integer in [0, {n_classes - 1}]")
        out.append(int(v))
    return tuple(out)


def grid_names() -> list[str]:
    """The grid names the pipeline knows: :data:`jdiffsample.grids.NAMES` and every family's own."""
    from jdiffsample import grids
    from jdiffsample.nets import family

    return [*grids.NAMES, *sorted({name for fam in family.all_families() for name in fam.grids})]


def make_grid(grid, schedule, n_steps: int, final_zero: bool, solver, options: dict, model=None,
              warmup: Callable | None = None) -> tuple[str, np.ndarray]:
    """``(name, times)``: the grid of ``n_steps`` steps named ``grid`` (:mod:`jdiffsample.grids`, or
    the model's family's own grids), or explicit times.

    With ``final_zero`` the last step goes into sigma = 0: the named grid is built for
    ``n_steps - 1`` steps and a final 0 is appended (EDM's Heun with an odd NFE). ``warmup()``
    gives ``(denoise, warm-up noises)`` for the grids found on the model's trajectories.
    """
    from jdiffsample import grids

    own = {} if model is None else model.family_info.grids
    if isinstance(grid, str) and grid in own:
        return grid, make_grid(np.asarray(own[grid](model, n_steps), np.float64), schedule, n_steps, False, solver,
                               options)[1]
    if not isinstance(grid, str):
        ts = np.asarray(grid, np.float64)
        if ts.ndim != 1 or len(ts) != n_steps + 1:
            raise ValueError(f"explicit grid values must be {n_steps + 1} times for {n_steps} steps, "
                             f"got shape {ts.shape}")
        if not np.all(np.diff(ts) < 0):
            raise ValueError("explicit grid values must decrease strictly (from noise to data)")
        schedule.check_times(ts)
        return "custom", ts
    if grid not in grids.NAMES:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join([*grids.NAMES, *own])}")
    base = n_steps - 1 if final_zero else n_steps
    denoise, noise = warmup() if grid in grids.NEEDS_MODEL and warmup is not None else (None, None)
    ts = grids.make(grid, schedule, base, solver=solver.name, options=options, denoise=denoise, noise=noise)
    return grid, (np.append(ts, 0.0) if final_zero else ts)


def sample_shape(model, height, width) -> tuple[tuple, tuple | None]:
    """``(shape of a sample, (height, width) in pixels or None)`` for a requested image size:
    families that sample any size (``sample_shape_at``) take it, the others their fixed one."""
    fam = model.family_info
    if fam.sample_shape_at is None:
        if height is not None or width is not None:
            raise ValueError(f"{model.family} networks sample a fixed size; --height/--width apply to Stable Diffusion")
        return tuple(model.sample_shape), None
    factor = 1024 // fam.sample_shape_at(model.module, 1024, 1024)[0]
    height = model.sample_shape[0] * factor if height is None else check_positive_int("height", height)
    width = model.sample_shape[1] * factor if width is None else check_positive_int("width", width)
    return tuple(fam.sample_shape_at(model.module, height, width)), (height, width)


def check_prompts(model, prompts, negative_prompts, guidance) -> tuple:
    """``(prompts, negative prompts)`` as tuples of non-empty strings (or None), for text models only."""
    fam = model.family_info

    def texts(name, values):
        if values is None:
            return None
        values = (values,) if isinstance(values, str) else tuple(values)
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{name} must be a string or a non-empty list of strings")
        empty = [i for i, v in enumerate(values) if not v.strip()]
        if empty:
            raise ValueError(f"{name} {empty[0]} is empty; give a text (the unconditional input is the default "
                             f"negative prompt)")
        return values

    prompts, negative_prompts = texts("prompt", prompts), texts("negative prompt", negative_prompts)
    if fam.encode_prompts is None:
        if prompts is not None or negative_prompts is not None:
            raise ValueError(f"{model.family} networks are not text-conditional: they take no prompts")
        return None, None
    if prompts is None:
        raise ValueError(f"this {model.family} model is text-conditional: give a prompt (--prompt TEXT or --prompt-file)")
    if negative_prompts is not None and guidance is None:
        raise ValueError("a negative prompt acts through classifier-free guidance: give --guidance W")
    return prompts, negative_prompts


def check_threshold(kind, ratio, max_value, model) -> tuple[float, float]:
    """``(ratio, max_value)`` checked for thresholding ``kind`` on ``model`` (pixel-space VP only)."""
    from jdiffsample.models import THRESHOLDS

    if kind is None:
        return 0.995, 1.0
    if kind not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {kind!r}")
    if model.schedule.is_ve:
        raise ValueError(f"thresholding acts on [-1, 1] data predictions of VP models; this {model.family} model "
                         f"samples on a VE schedule, whose denoiser it would distort")
    if model.latent is not None:
        raise ValueError("thresholding is for pixel-space models; this model samples latents")
    ratio, max_value = check_float("threshold ratio", ratio), check_float("threshold max", max_value)
    if not 0 < ratio <= 1 or max_value < 1:
        raise ValueError(f"the threshold ratio must lie in (0, 1] and the maximum be >= 1, got {ratio}, {max_value}")
    return ratio, max_value


def check_float(name: str, value, *, positive: bool = False):
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return v

"""What a run is: every setting named, typed, defaulted, documented and checked in one place.

:class:`Settings` holds everything that decides the images of a run (and nothing that does not:
batch size, devices and processes are not settings); :class:`Output` holds where and how many.
Each field is declared once with :func:`setting`, and everything else is derived from those
declarations: the ``jdiffsample sample`` flags and their help (:mod:`jdiffsample.commands._flags`),
the manifest (:meth:`Settings.to_json` / :meth:`Settings.from_json`), and the keyword arguments of
:func:`jdiffsample.pipeline.generate` and :func:`jdiffsample.text2image.generate`. Constructing a
:class:`Settings` checks every value that can be checked without the model; :func:`plan` checks the
rest, before anything is traced. A new setting is one field here (and its use in the plan).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from jdiffsample import grids
from jdiffsample.solvers import registry

__all__ = ["Settings", "Output", "setting", "fields", "Field", "MODEL_REFERENCES", "DEFAULT_MICRO_BATCH",
           "check_positive_int", "check_float", "parse_labels", "parse_pair", "parse_channels", "parse_grid"]

#: the micro-batch when none is given: min(this, the number of samples)
DEFAULT_MICRO_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Field:
    """What is declared about one setting (a dataclass field's metadata)."""

    name: str
    default: Any
    help: str
    flag: str | None            # the CLI flag (None: no flag of its own)
    parse: Callable | None      # CLI text -> value (None: the value as given)
    check: Callable | None      # value -> normalized value; ValueError naming what is allowed
    choices: Callable | tuple | None
    metavar: str | None
    group: str
    repeat: bool                # the flag may be given several times (a list)
    model: bool                 # the value names a network (a folder, a bundled name or a Model)
    in_manifest: bool
    kind: type                  # what a flag's text converts to before ``parse``/``check`` (str, int, float)

    def describe(self) -> str:
        """The help text with the default, as ``--help`` shows it."""
        default = self.default
        if isinstance(default, bool) or default is None:
            return self.help
        return f"{self.help} (default {default})"

    def allowed(self):
        return self.choices() if callable(self.choices) else self.choices


def setting(default, help: str, *, flag: str | None = "", parse=None, check=None, choices=None, metavar=None,
            group: str = "sampling", repeat: bool = False, model: bool = False, in_manifest: bool = True,
            kind: type = str):
    """A dataclass field of :class:`Settings` or :class:`Output` with its declaration. ``flag=""``:
    the field name as a flag (``--skip-tuning``); ``None``: no flag."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, flag=flag, parse=parse, check=check, choices=choices, metavar=metavar, group=group,
        repeat=repeat, model=model, in_manifest=in_manifest, kind=kind))


def fields(cls) -> list[Field]:
    """The declarations of ``cls``'s settings, in order."""
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        flag = m["flag"]
        out.append(Field(f.name, f.default, m["help"], ("--" + f.name.replace("_", "-")) if flag == "" else flag,
                         m["parse"], m["check"], m["choices"], m["metavar"], m["group"], m["repeat"], m["model"],
                         m["in_manifest"], m["kind"]))
    return out


# ---------------------------------------------------------------------------------------------
# Checks and parsers (each names the setting as the API and the CLI spell it)


def _names(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{_names(name)} must be a positive integer, got {value!r}")
    return int(value)


def check_float(name: str, value, *, positive: bool = False, low=None, high=None):
    if value is None:
        return None
    try:
        if isinstance(value, (bool, np.bool_, str)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_names(name)} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (positive and v <= 0) or (low is not None and v < low) or (high is not None and v > high):
        what = ("a positive " if positive else "a ") + "finite number"
        if low is not None or high is not None:
            what += f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{_names(name)} must be {what}, got {value!r}")
    return v


def _positive_int(name):
    return lambda value: check_positive_int(name, value)


def _optional_positive_int(name):
    return lambda value: None if value is None else check_positive_int(name, value)


def _number(name, **kw):
    return lambda value: check_float(name, value, **kw)


def _one_of(name, allowed, optional=False):
    def check(value):
        if value is None and optional:
            return None
        options = allowed() if callable(allowed) else allowed
        if value not in options:
            raise ValueError(f"{_names(name)} must be one of {', '.join(map(str, options))}, got {value!r}")
        return value
    return check


def parse_labels(text: str | None):
    """``"random"``, ``"7"`` or ``"1,2,3"`` -> 'random', 7 or (1, 2, 3)."""
    if text is None or text == "random":
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--class-labels must be 'random', a label or a comma-separated list, got {text!r}") from None
    return values[0] if len(values) == 1 else tuple(values)


def _indices(name: str, value, what: str) -> tuple:
    """One non-negative integer or a non-empty sequence of them -> a tuple; else ``ValueError``."""
    values = [value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if isinstance(values, str) or not isinstance(values, Sequence) or not values or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in values):
        raise ValueError(f"{_names(name)} must be {what}, got {value!r}")
    return tuple(int(v) for v in values)


def _check_labels(value):
    if value is None or value == "random":
        return value
    return _indices("class_labels", value, "'random', a label or a list of labels (non-negative integers)")


def parse_pair(flag: str):
    def parse(text: str):
        try:
            lo, hi = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"{flag} must be LO,HI (two numbers), got {text!r}") from None
        return lo, hi
    return parse


def _float_pair(name: str, value, form: str) -> tuple[float, float]:
    """Two finite numbers -> a pair of floats; else ``ValueError`` naming the ``form`` ("lo, hi")."""
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{_names(name)} must be ({form}), got {value!r}") from None
    return check_float(name, a), check_float(name, b)


def _check_interval(value):
    if value is None:
        return None
    lo, hi = _float_pair("guidance_interval", value, "lo, hi")
    if not 0 <= lo < hi:
        raise ValueError(f"{_names('guidance_interval')} must be LO,HI with 0 <= LO < HI, got {value!r}")
    return lo, hi


def parse_layers(text: str):
    """``"7,8,9"`` -> (7, 8, 9)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--slg-layers must be block indices separated by commas (e.g. 7,8,9), got {text!r}") from None


def _check_layers(value):
    if value is None:
        return None
    return tuple(sorted(set(_indices("slg_layers", value, "block indices (non-negative integers)"))))


def _check_fractions(value):
    start, stop = _float_pair("slg_steps", value, "start, stop")
    if not 0 <= start < stop <= 1:
        raise ValueError(f"{_names('slg_steps')} must be START,STOP with 0 <= START < STOP <= 1, got {value!r}")
    return start, stop


def parse_channels(text: str):
    if text == "default":
        return "default"
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--guidance-channels must be 'all' or a number of channels, got {text!r}") from None


def _check_channels(value):
    if value in ("default", None):
        return value
    return check_positive_int("guidance_channels", value)


def _check_seed(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
        raise ValueError(f"{_names('seed')} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


def _check_solver(value):
    registry.get(value)  # ValueError naming the registered solvers
    return value


def _check_options(value):
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        value = dict(value)  # the normalized form
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError(f"options must be a mapping of the solver's option names to values, got {value!r}")
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in value.items()))


def grid_names() -> list[str]:
    """The grid names: :data:`jdiffsample.grids.NAMES`, and ``diffusers`` (families' own grids)."""
    return [*grids.NAMES, "diffusers"]


def parse_grid(text: str):
    """A grid name, or explicit times ``T0,T1,...,TN`` (decreasing)."""
    if "," not in text:
        return text
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--grid must be a grid name or comma-separated times, got {text!r}") from None


def _check_grid(value):
    if isinstance(value, str):
        return _one_of("grid", grid_names)(value)
    try:
        ts = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{_names('grid')} must be a grid name or a list of times, got {value!r}") from None
    if ts.ndim != 1 or len(ts) < 2 or not np.all(np.isfinite(ts)):
        raise ValueError(f"{_names('grid')}: explicit times must be a 1-D list of at least 2 finite times")
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"{_names('grid')}: explicit times must decrease strictly (from noise to data)")
    return tuple(float(t) for t in ts)


def _check_texts(name, allow_empty: bool = False):
    def check(value):
        if value is None:
            return None
        values = (value,) if isinstance(value, str) else value
        try:
            values = tuple(values)
        except TypeError:
            raise ValueError(f"{_names(name)} must be a string or a non-empty list of strings, got {value!r}") from None
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{_names(name)} must be a string or a non-empty list of strings, got {value!r}")
        empty = [i for i, v in enumerate(values) if not v.strip()]
        if empty and not allow_empty:
            raise ValueError(f"{name[:-1].replace('_', ' ')} {empty[0]} is empty; give a text (the unconditional "
                             f"input is the default negative prompt)")
        return values
    return check


def _check_model(name):
    def check(value):
        if value is None or isinstance(value, str) or hasattr(value, "family"):
            return value
        if hasattr(value, "__fspath__"):
            return str(value)
        raise ValueError(f"{_names(name)} must be a checkpoint folder, a bundled model name or a loaded Model, "
                         f"got {type(value).__name__}")
    return check


def _check_file(value):
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ValueError(f"--solver-params: no file {path} (write one with 'jdiffsample learn')")
        return path
    raise ValueError(f"--solver-params must be the path of a parameter file, got {type(value).__name__}")


def _check_bool(name):
    def check(value):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{_names(name)} must be True or False, got {value!r}")
        return bool(value)
    return check


def _solver_help() -> str:
    return "the solver: " + ", ".join(f"{n} ({registry.get(n).label()})" for n in registry.names())


# ---------------------------------------------------------------------------------------------
# The description of a run


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the images of a run (recorded in its manifest, fingerprinted)."""

    # -- the sampler
    solver: str = setting("unipc", "the solver (see the solver options below)", check=_check_solver,
                          choices=registry.names, metavar="NAME")
    options: Any = setting((), "the solver's options (each solver's own defaults unless given)", flag=None,
                           check=_check_options)
    nfe: int = setting(10, "model calls per sample", check=_positive_int("nfe"), metavar="N", kind=int)
    grid: Any = setting("logsnr", "time grid: a name, or explicit decreasing times T0,...,TN", parse=parse_grid,
                        check=_check_grid, choices=grid_names, metavar="NAME|T0,...,TN")
    seed: int = setting(0, "base seed: sample i draws everything from fold_in(key(seed), i)", check=_check_seed, kind=int)
    class_labels: Any = setting(None, "class-conditional models: random (the default), one label, or a list "
                                "cycled by index", parse=parse_labels, check=_check_labels, metavar="random|N|N,N,...")
    dtype: str = setting("float32", "the networks' compute dtype (the solver state stays float32)",
                         check=_one_of("dtype", ("float32", "bfloat16")), choices=("float32", "bfloat16"))
    micro_batch: Any = setting(None, f"samples one network call computes on one device (default: min("
                               f"{DEFAULT_MICRO_BATCH}, --num)); the images depend on it, not on --batch, the devices "
                               f"or the hosts", check=_optional_positive_int("micro_batch"), metavar="N", kind=int)
    model_parallel: int = setting(1, "split every network's weights over N devices (a data x model mesh; the "
                                  "batch runs on the other axis); images agree with N = 1 to rounding",
                                  check=_positive_int("model_parallel"), metavar="N", kind=int)
    skip_tuning: Any = setting(None, "Skip-Tuning: scale of the deepest skip, rho_bottom (rho_top = 1), e.g. 0.8",
                               check=_number("skip_tuning", positive=True), metavar="RHO_BOTTOM", kind=float)
    solver_params: Any = setting(None, "learned solvers: the parameter file of 'jdiffsample learn'",
                                 metavar="FILE", check=_check_file)
    learn_iters: int = setting(30, "learned grids (--grid learned, ld3): optimizer iterations",
                               check=_positive_int("learn_iters"), metavar="N", group="grids found on the model", kind=int)
    learn_batch: int = setting(64, "grids found on the model (gits, learned, ld3): warm-up noises",
                               check=_positive_int("learn_batch"), metavar="N", group="grids found on the model", kind=int)
    # -- guidance
    guidance: Any = setting(None, "guidance weight w of D_u + w (D_c - D_u): classifier-free (the null label or the "
                            "negative prompt), or autoguidance with --guide-model; FLUX.1-dev: its distilled guidance "
                            "input (default: the family's, else none)", check=_number("guidance"), metavar="W",
                            group="guidance", kind=float)
    guide: Any = setting(None, "autoguidance: a second network of the same family as the guide", flag="--guide-model",
                         check=_check_model("guide"), metavar="DIR", group="guidance", model=True)
    guidance_interval: Any = setting(None, "guide only where the noise level sigma lies in [LO, HI]",
                                     parse=parse_pair("--guidance-interval"), check=_check_interval, metavar="LO,HI",
                                     group="guidance")
    guidance_channels: Any = setting("default", "guide only the first N channels (default: the family's; DiT's "
                                     "original sampler guides 3 of its 4 latent channels; 'all': every channel)",
                                     parse=parse_channels, check=_check_channels, metavar="all|N", group="guidance")
    guidance_rescale: Any = setting(None, "rescale the guided prediction (Lin et al. 2023), phi in [0, 1], e.g. 0.7",
                                    check=_number("guidance_rescale", low=0.0, high=1.0), metavar="PHI",
                                    group="guidance", kind=float)
    true_cfg: Any = setting(None, "FLUX.1: real classifier-free guidance with the negative prompt, weight W, on top "
                            "of the distilled guidance (diffusers' true_cfg_scale)", check=_number("true_cfg"),
                            metavar="W", group="guidance", kind=float)
    slg_layers: Any = setting(None, "SD3.5: skip-layer guidance, the transformer blocks its extra prediction "
                              "bypasses, e.g. 7,8,9 (diffusers' skip_guidance_layers)", parse=parse_layers,
                              check=_check_layers, metavar="I,J,...", group="guidance")
    slg_scale: float = setting(2.8, "skip-layer guidance weight (diffusers' skip_layer_guidance_scale)",
                               check=_number("slg_scale"), metavar="S", group="guidance", kind=float)
    slg_steps: Any = setting((0.01, 0.2), "skip-layer guidance acts in the steps i with START N < i < STOP N of N "
                             "steps (diffusers' skip_layer_guidance_start and _stop)",
                             parse=parse_pair("--slg-steps"), check=_check_fractions, metavar="START,STOP",
                             group="guidance")
    classifier: Any = setting(None, "classifier guidance: a converted noisy-image classifier (convert adm-classifier)",
                              check=_check_model("classifier"), metavar="DIR", group="guidance", model=True)
    classifier_scale: Any = setting(None, "classifier guidance weight (guided-diffusion's --classifier_scale)",
                                    check=_number("classifier_scale"), metavar="S", group="guidance", kind=float)
    threshold: Any = setting(None, "pixel-space VP models: clip the data predictions to [-1, 1] (static) or "
                             "threshold them dynamically (Saharia et al.)",
                             check=_one_of("threshold", ("static", "dynamic"), optional=True),
                             choices=("static", "dynamic"), group="guidance")
    threshold_ratio: float = setting(0.995, "dynamic thresholding percentile, in (0, 1]",
                                     check=_number("threshold_ratio", positive=True, high=1.0), group="guidance", kind=float)
    threshold_max: float = setting(1.0, "dynamic thresholding maximum value, >= 1",
                                   check=_number("threshold_max", low=1.0), group="guidance", kind=float)
    # -- text models
    prompts: Any = setting(None, "a prompt (repeat for several: sample i uses prompt i mod P)", flag="--prompt",
                           check=_check_texts("prompts"), metavar="TEXT", group="text models", repeat=True)
    negative_prompts: Any = setting(None, "negative prompt(s) for classifier-free guidance (cycled like the prompts; "
                                    "'' is the empty prompt)",
                                    flag="--negative-prompt", check=_check_texts("negative_prompts", allow_empty=True), metavar="TEXT",
                                    group="text models", repeat=True)
    height: Any = setting(None, "image height in pixels (models that sample any size)",
                          check=_optional_positive_int("height"), group="text models", kind=int)
    width: Any = setting(None, "image width in pixels (models that sample any size)",
                         check=_optional_positive_int("width"), group="text models", kind=int)
    max_sequence_length: Any = setting(None, "T5 tokens per prompt (FLUX.1, SD3; default: the pipeline's: FLUX.1-dev "
                                       "512, schnell and SD3 256); longer prompts are truncated with a warning",
                                       check=_optional_positive_int("max_sequence_length"), metavar="N",
                                       group="text models", kind=int)
    # -- latent models, two stages
    vae: Any = setting(None, "latent models: the converted VAE that decodes the samples (default: the one recorded "
                       "at conversion)", check=_check_model("vae"), metavar="DIR", group="latent models", model=True)
    latents_only: bool = setting(False, "latent models: write the float32 latents instead of decoded images",
                                 check=_check_bool("latents_only"), group="latent models")
    upsampler: Any = setting(None, "two stages: upsample this model's images with a converted upsampler "
                             "(adm-superres)", check=_check_model("upsampler"), metavar="DIR", group="two stages",
                             model=True)
    upsampler_nfe: Any = setting(None, "model calls of the upsampler stage (default: --nfe)",
                                 check=_optional_positive_int("upsampler_nfe"), metavar="N", group="two stages", kind=int)

    def __post_init__(self):
        for f in fields(type(self)):
            if f.check is not None:
                object.__setattr__(self, f.name, f.check(getattr(self, f.name)))

    @classmethod
    def create(cls, **values) -> "Settings":
        """``Settings(**values)`` with a ``ValueError`` naming an unknown setting (the API's keywords)."""
        return _create(cls, values)

    def replace(self, **values) -> "Settings":
        return _create(type(self), {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **values})

    def to_json(self) -> dict:
        """JSON values of every setting (networks as their paths; a loaded Model as null)."""
        out = {}
        for f in fields(type(self)):
            value = getattr(self, f.name)
            if f.model and value is not None and not isinstance(value, str):
                value = None  # an in-memory Model: recorded by its digest in the plan's record
            out[f.name] = _json(value)
        out["options"] = {k: _json(v) for k, v in self.options}
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "Settings":
        """The settings of a manifest's ``settings`` (keys of other runs' records are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        # settings are hashable: JSON's lists are their tuples
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Output:
    """Where a run's images go and how many (``jdiffsample sample``'s other flags)."""

    out: Any = setting(None, "output folder (created; rerun the same command to resume)", check=_check_model("out"),
                       metavar="DIR", group="output")
    num: int = setting(50000, "number of samples", check=_positive_int("num"), metavar="N", group="output", kind=int)
    shard_size: int = setting(1000, "samples per .npz file", check=_positive_int("shard_size"), metavar="N",
                              group="output", kind=int)
    batch: Any = setting(None, "samples per call over this process's devices (default: one micro-batch per "
                         "device); no effect on the images", check=_optional_positive_int("batch"), metavar="N",
                         group="output", kind=int)
    preview: bool = setting(True, "write grid.png, a preview of the first images", check=_check_bool("preview"),
                            group="output")
    export: Any = setting(None, "afterwards, export all samples: PATH.npz (one file) or a folder of PNGs",
                          check=_check_model("export"), metavar="PATH", group="output")
    overwrite: bool = setting(False, "let --export replace an existing file or folder", check=_check_bool("overwrite"),
                              group="output")

    def __post_init__(self):
        Settings.__post_init__(self)


def _create(cls, values: Mapping):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(names)}")
    return cls(**values)


def _json(value):
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


#: the settings that name networks (folders, bundled names or loaded Models)
MODEL_REFERENCES = tuple(f.name for f in fields(Settings) if f.model)

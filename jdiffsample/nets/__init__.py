"""Flax ports of pretrained diffusion networks and their PyTorch weight converters.

Families:

* ``"edm"`` -- NVlabs/edm preconditioned networks (:mod:`jdiffsample.nets.edm`): ``VPPrecond``,
  ``VEPrecond``, ``iDDPMPrecond``, ``EDMPrecond`` around ``SongUNet`` / ``DhariwalUNet``.
* ``"adm"`` -- openai/guided-diffusion ``UNetModel`` (:mod:`jdiffsample.nets.adm`).

A converted network is a directory::

    dst/config.json     family, class_name, constructor kwargs, schedule, versions, source
    dst/variables/      an Orbax checkpoint of the Flax variables {"params": ..., "skip": ...}

Typical use::

    from jdiffsample import nets
    nets.convert_edm("edm-cifar10-32x32-cond-vp.pkl", "ckpt/edm-cifar10")   # once; no torch needed
    module, variables = nets.load("ckpt/edm-cifar10")
    denoise, schedule = nets.to_denoiser(module, variables, nets.load_config("ckpt/edm-cifar10"),
                                         class_labels=labels)
    # denoise(x, t) with x an NHWC batch and t a scalar time of `schedule`

PyTorch files are read by :mod:`jdiffsample.nets.torchfile`, which never imports torch and never
executes code from the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "FAMILIES",
    "CONFIG_NAME",
    "VARIABLES_DIR",
    "save",
    "load",
    "load_config",
    "build",
    "to_denoiser",
    "load_denoiser",
    "convert_edm",
    "convert_adm",
    "random_variables",
]

FAMILIES = ("edm", "adm")
CONFIG_NAME = "config.json"
VARIABLES_DIR = "variables"
FORMAT = "jdiffsample-network"
FORMAT_VERSION = 1

#: Default sampling range of EDM networks (NVlabs/edm generate.py), clipped to each
#: preconditioner's own [sigma_min, sigma_max].
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0
#: ADM diffusion settings assumed when a config gives none (most released models use them).
ADM_DEFAULT_DIFFUSION = dict(noise_schedule="linear", diffusion_steps=1000)


# ---------------------------------------------------------------------------------------------
# model construction and schedules


def build(family: str, class_name: str, kwargs: Mapping[str, Any]):
    """The Flax module for a (family, class_name, kwargs) triple."""
    if family == "edm":
        from jdiffsample.nets import edm

        return edm.build(class_name, kwargs)
    if family == "adm":
        from jdiffsample.nets import adm

        if class_name != "UNetModel":
            raise ValueError(f"unsupported ADM network class {class_name!r} (only UNetModel)")
        return adm.build(kwargs)
    raise ValueError(f"unknown network family {family!r}; expected one of {FAMILIES}")


def _edm_schedule_info(class_name: str, kwargs: Mapping[str, Any]) -> dict:
    """EDM sampling range: generate.py's [0.002, 80] clipped to the network's own range."""
    module = build("edm", class_name, kwargs)
    lo, hi = float(module.sigma_min), float(module.sigma_max)
    return dict(type="VE", sigma_min=max(EDM_SIGMA_MIN, lo), sigma_max=min(EDM_SIGMA_MAX, hi))


def _adm_schedule_info(diffusion: Mapping[str, Any] | None) -> dict:
    d = {**ADM_DEFAULT_DIFFUSION, **(diffusion or {})}
    from jdiffsample.nets import adm

    adm.betas_for(d["noise_schedule"], int(d["diffusion_steps"]))  # validates both
    return dict(type="VPDiscrete", noise_schedule=d["noise_schedule"],
                diffusion_steps=int(d["diffusion_steps"]))


def _schedule_from_info(info: Mapping[str, Any]):
    from jdiffsample import schedules

    kind = info.get("type")
    if kind == "VE":
        return schedules.VE(sigma_min=float(info.get("sigma_min", EDM_SIGMA_MIN)),
                            sigma_max=float(info.get("sigma_max", EDM_SIGMA_MAX)))
    if kind == "VPDiscrete":
        from jdiffsample.nets import adm

        betas = adm.betas_for(info["noise_schedule"], int(info["diffusion_steps"]))
        return schedules.VPDiscrete.from_betas(betas)
    raise ValueError(f"unknown schedule type {kind!r} in config")


# ---------------------------------------------------------------------------------------------
# save / load


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist, module in (("jdiffsample", "jdiffsample"), ("jax", "jax"), ("flax", "flax"),
                         ("orbax-checkpoint", "orbax.checkpoint"), ("numpy", "numpy")):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            import importlib

            out[dist] = getattr(importlib.import_module(module), "__version__", "unknown")
    return out


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save(dst, family: str, class_name: str, kwargs: Mapping[str, Any], variables,
         extra: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write ``variables`` and a ``config.json`` to the directory ``dst``, atomically.

    Everything is written into a temporary sibling directory that is renamed to ``dst`` at the
    end; on any failure (including KeyboardInterrupt) the temporary directory is removed and
    nothing is left at ``dst``.

    Args:
      dst: the checkpoint directory to create. It must not exist unless ``overwrite``.
      family: ``"edm"`` or ``"adm"``.
      class_name, kwargs: the original class and its constructor kwargs (JSON-serialisable).
      variables: Flax variables ``{"params": ..., "skip": ...}`` (NumPy or JAX arrays).
      extra: more entries for ``config.json`` (e.g. ``source``). A ``schedule`` entry overrides
        the default (EDM: ``VE`` over the network's sampling range; ADM: linear betas over 1000
        steps, or ``extra["diffusion"]``).
      overwrite: replace an existing checkpoint at ``dst``.

    Returns:
      ``dst`` as an absolute path.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown network family {family!r}; expected one of {FAMILIES}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with a 'params' collection")
    from jdiffsample.nets.torchfile import json_value

    extra = dict(extra or {})
    reserved = {"format", "format_version", "family", "class_name", "kwargs", "versions"}
    if reserved & set(extra):
        raise ValueError(f"extra may not set {sorted(reserved & set(extra))}")
    if "schedule" in extra:
        schedule = extra.pop("schedule")
    elif family == "edm":
        schedule = _edm_schedule_info(class_name, kwargs)
    else:
        schedule = _adm_schedule_info(extra.get("diffusion"))
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, family=family,
                  class_name=class_name, kwargs=json_value(dict(kwargs)),
                  schedule=json_value(schedule), versions=_versions(), **json_value(extra))
    text = json.dumps(config, indent=1)

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    created = [p for p in reversed(dst.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # a plain mkdir, so the final directory gets the usual (umask) permissions
    try:
        ckptr = _checkpointer()
        try:
            ckptr.save(tmp / VARIABLES_DIR, dict(variables))
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        (tmp / CONFIG_NAME).write_text(text)
        if dst.exists():  # overwrite: move the old checkpoint aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "ckpt")
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # directories this call created, deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return dst


def load_config(dst) -> dict:
    """The ``config.json`` of a converted network, validated."""
    dst = Path(dst)
    path = dst / CONFIG_NAME
    if not dst.is_dir():
        raise ValueError(f"{dst} is not a jdiffsample network checkpoint: no such directory")
    if not path.is_file():
        raise ValueError(
            f"{dst} is not a jdiffsample network checkpoint: it has no {CONFIG_NAME} (create one "
            f"with convert/edm.py or convert/adm.py)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jdiffsample network config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {config.get('format_version')!r} "
                         f"(this jdiffsample reads {FORMAT_VERSION})")
    missing = [k for k in ("family", "class_name", "kwargs", "schedule") if k not in config]
    if missing or config["family"] not in FAMILIES:
        raise ValueError(f"{path}: malformed config (missing {missing} or unknown family)")
    return config


def load(dst) -> tuple[Any, dict]:
    """``(module, variables)`` of a network written by :func:`save` / the converters.

    ``module`` is the Flax module (``module.apply(variables, ...)``); ``variables`` hold JAX
    arrays. Raises ``ValueError`` if ``dst`` is not such a checkpoint.
    """
    import jax
    import jax.numpy as jnp

    config = load_config(dst)
    path = (Path(dst) / VARIABLES_DIR).absolute()
    if not path.is_dir():
        raise ValueError(f"{dst} is not a complete jdiffsample checkpoint: no {VARIABLES_DIR}/")
    module = build(config["family"], config["class_name"], config["kwargs"])
    ckptr = _checkpointer()
    try:
        tree = ckptr.metadata(path).item_metadata.tree
        # Restore onto this process's first device: without a sharding, Orbax would use the
        # saving device recorded in the checkpoint (a CPU-made file then fails on a GPU).
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
        variables = ckptr.restore(path, target)
    except Exception as e:  # orbax raises a variety of types for damaged checkpoints
        raise ValueError(f"{path}: cannot restore the variables ({type(e).__name__}: {e})") from e
    finally:
        ckptr.close()
    return module, jax.tree.map(jnp.asarray, variables)


# ---------------------------------------------------------------------------------------------
# denoisers


_APPLY_CACHE: dict[int, tuple[Any, Callable]] = {}


def _jitted_apply(module) -> Callable:
    """``jax.jit(module.apply)``, shared by all denoisers of one module object (so new labels or
    Skip-Tuned variables reuse the compiled network). Keyed by identity: EDM modules hold dicts
    and are not hashable."""
    hit = _APPLY_CACHE.get(id(module))
    if hit is None or hit[0] is not module:
        import jax

        while len(_APPLY_CACHE) >= 8:
            _APPLY_CACHE.pop(next(iter(_APPLY_CACHE)))
        hit = _APPLY_CACHE[id(module)] = (module, jax.jit(module.apply))
    return hit[1]


def to_denoiser(module, variables, config, class_labels=None) -> tuple[Callable, Any]:
    """Turn a loaded network into the solvers' ``denoise(x, t)`` and its schedule.

    ``x`` is an NHWC batch and ``t`` a scalar time of the returned schedule.

    * EDM preconditioned networks: ``schedule = schedules.VE(...)`` (t is sigma) and
      ``denoise(x, t) = net(x, sigma=t, class_labels)``. ``class_labels`` are one-hot
      ``[B, label_dim]`` or integer labels ``[B]`` (converted to one-hot); ``None`` gives the
      original's all-zero labels.
    * ADM: ``schedule = schedules.VPDiscrete.from_betas(betas)`` and ``denoise`` is
      ``models.from_eps(eps_fn, schedule)``, where ``eps_fn`` calls the network at timestep
      ``schedule.model_time(t)`` (DPM-Solver convention: t_n = (n + 1) / N <-> index n) and keeps
      the epsilon half (first ``in_channels`` channels) of learned-sigma outputs.
      ``class_labels`` are integer labels ``[B]``, required for class-conditional models.

    Args:
      module, variables: from :func:`load` (the variables may be Skip-Tuned).
      config: the dict from :func:`load_config`, or the checkpoint directory.
    """
    import jax
    import jax.numpy as jnp

    if not isinstance(config, Mapping):
        config = load_config(config)
    schedule = _schedule_from_info(config["schedule"])
    apply = _jitted_apply(module)
    family = config["family"]

    if family == "edm":
        labels = None
        if class_labels is not None:
            if not module.label_dim:
                raise ValueError("class_labels given for an unconditional network")
            labels = jnp.asarray(class_labels)
            if labels.ndim == 1 and jnp.issubdtype(labels.dtype, jnp.integer):
                labels = jax.nn.one_hot(labels, module.label_dim, dtype=jnp.float32)
            if labels.ndim != 2 or labels.shape[1] != module.label_dim:
                raise ValueError(f"class_labels must be one-hot [B, {module.label_dim}] or "
                                 f"integer [B], got shape {labels.shape}")

        def denoise(x, t):
            sigma = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
            return apply(variables, x, sigma, labels).astype(x.dtype)

        return denoise, schedule

    from jdiffsample import models

    labels = None
    if module.num_classes is not None:
        if class_labels is None:
            raise ValueError(f"this ADM network is class-conditional ({module.num_classes} "
                             f"classes): pass integer class_labels [B]")
        labels = jnp.asarray(class_labels)
        if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"ADM class_labels must be integer [B], got {labels.shape} "
                             f"{labels.dtype}")
    elif class_labels is not None:
        raise ValueError("class_labels given for an unconditional network")
    channels = module.in_channels
    if module.out_channels not in (channels, 2 * channels):
        raise ValueError(f"cannot read epsilon from {module.out_channels} output channels "
                         f"({channels} input channels)")

    def eps_fn(x, t):
        steps = jnp.broadcast_to(jnp.asarray(schedule.model_time(t), jnp.float32), (x.shape[0],))
        return apply(variables, x, steps, labels)[..., :channels].astype(x.dtype)

    return models.from_eps(eps_fn, schedule), schedule


def load_denoiser(dst, class_labels=None) -> tuple[Callable, Any]:
    """:func:`load` + :func:`to_denoiser` in one call."""
    module, variables = load(dst)
    return to_denoiser(module, variables, load_config(dst), class_labels)


# ---------------------------------------------------------------------------------------------
# converters


def _read_json(path_or_dict, what: str) -> dict:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    try:
        data = json.loads(Path(path_or_dict).read_text())
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path_or_dict}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path_or_dict} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path_or_dict} must hold a JSON object")
    return data


def random_variables(module, *example_args, seed: int = 0) -> dict:
    """Variables for ``module.init(key, *example_args)`` with every parameter random,
    ``N(0, 1 / fan_in)``, and every other collection (Skip-Tuning scales) at one.

    For tests and benchmarks: a freshly initialised network has zero-initialised output layers,
    which would make every sampler return the same images and hide differences.
    """
    import jax

    shapes = jax.eval_shape(module.init, jax.random.key(0), *example_args)
    rng = np.random.default_rng(seed)

    def rand(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 4
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

    return {name: jax.tree.map(rand if name == "params" else (lambda s: np.ones(s.shape, np.float32)),
                               tree) for name, tree in shapes.items()}


def _count(variables) -> tuple[int, int]:
    import jax

    leaves = jax.tree.leaves(variables.get("params", {}))
    return len(leaves), int(sum(np.size(x) for x in leaves))


def _to_device_inplace(tree: dict) -> None:
    """Replace the NumPy leaves of a nested dict by JAX arrays one at a time, so that each host
    copy is freed as soon as it has moved (Orbax writes JAX arrays with far less extra memory)."""
    import jax

    for key, value in tree.items():
        if isinstance(value, dict):
            _to_device_inplace(value)
        else:
            tree[key] = jax.device_put(value)


def convert_edm(src, dst, config=None, *, key=None, overwrite: bool = False) -> dict:
    """Convert an NVlabs/edm network to a jdiffsample checkpoint at ``dst`` (torch not needed).

    Args:
      src: an EDM snapshot pickle (``network-snapshot-*.pkl``, ``edm-*.pkl``; class and kwargs
        are read from it), or a ``torch.save`` state_dict file (then ``config`` is required).
      config: ``{"class_name": ..., "kwargs": {...}}`` (a dict or a JSON file, like the fixtures'
        ``config.json``). With a snapshot pickle its kwargs override the stored ones, and its
        class_name must agree.
      key: for a state_dict file whose top level wraps the state dict (e.g. ``"ema"``).
      overwrite: replace an existing ``dst``.

    Returns:
      ``{"class_name", "kwargs", "dst", "tensors", "parameters", "seconds"}``.
    """
    from jdiffsample.nets import edm, torchfile

    start = time.perf_counter()
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    cfg = _read_json(config, "config") if config is not None else None
    if torchfile.file_kind(src) in ("zip", "legacy"):
        if cfg is None:
            raise ValueError(f"{src} is a state_dict file: a config with class_name and kwargs "
                             f"is required (--kwargs JSON_FILE)")
        state_dict = torchfile.load_state_dict(src, key=key)
        class_name, kwargs = cfg.get("class_name"), cfg.get("kwargs")
        source = dict(kind="state_dict", file=src.name)
    else:
        class_name, kwargs, state_dict = torchfile.load_edm_pickle(src)
        source = dict(kind="edm_pickle", file=src.name)
        if cfg is not None:
            if cfg.get("class_name", class_name) != class_name:
                raise ValueError(f"config class_name {cfg['class_name']!r} disagrees with the "
                                 f"pickle's {class_name!r}")
            kwargs = {**kwargs, **cfg.get("kwargs", {})}
    if not isinstance(class_name, str) or not isinstance(kwargs, Mapping):
        raise ValueError("the config needs a 'class_name' string and a 'kwargs' object")
    kwargs = torchfile.check_edm_class(class_name, kwargs)
    variables = edm.convert_state_dict(class_name, kwargs, state_dict)
    n_tensors = len(state_dict)
    del state_dict  # frees the raw checkpoint before writing
    _to_device_inplace(variables)
    path = save(dst, "edm", class_name, kwargs, variables, extra=dict(source=source),
                overwrite=overwrite)
    _, n_params = _count(variables)
    return dict(class_name=class_name, kwargs=kwargs, dst=str(path), tensors=n_tensors,
                parameters=n_params, seconds=time.perf_counter() - start)


def convert_adm(src, dst, *, preset: str | None = None, config=None, key=None,
                noise_schedule: str | None = None, diffusion_steps: int | None = None,
                overwrite: bool = False) -> dict:
    """Convert an openai/guided-diffusion ``UNetModel`` state_dict (``.pt``) to ``dst``.

    Exactly one of:
      preset: a name in :data:`jdiffsample.nets.adm.PRESETS` (e.g. ``"256x256"``); its
        diffusion settings come from ``adm.DIFFUSION_PRESETS``.
      config: ``{"kwargs": {...}}`` or the kwargs themselves (dict or JSON file; the fixtures'
        ``config.json`` works), optionally with ``"diffusion": {"noise_schedule",
        "diffusion_steps"}`` (default: linear, 1000).

    ``noise_schedule`` / ``diffusion_steps`` override either. ``key`` picks a wrapped state
    dict. Returns the same summary as :func:`convert_edm`.
    """
    from jdiffsample.nets import adm, torchfile

    start = time.perf_counter()
    src = Path(src)
    if (preset is None) == (config is None):
        raise ValueError("give exactly one of preset or config")
    if preset is not None:
        if preset not in adm.PRESETS:
            raise ValueError(f"unknown ADM preset {preset!r}; choose one of "
                             f"{', '.join(adm.PRESETS)}")
        kwargs = dict(adm.PRESETS[preset])
        diffusion = dict(adm.DIFFUSION_PRESETS.get(preset, {}))
        source = dict(kind="state_dict", file=src.name, preset=preset)
    else:
        cfg = _read_json(config, "config")
        if cfg.get("class_name", "UNetModel") != "UNetModel":
            raise ValueError(f"unsupported ADM class {cfg['class_name']!r} (only UNetModel)")
        kwargs = dict(cfg["kwargs"]) if "kwargs" in cfg else {
            k: v for k, v in cfg.items() if k not in ("class_name", "diffusion")}
        diffusion = dict(cfg.get("diffusion") or {})
        source = dict(kind="state_dict", file=src.name)
    if noise_schedule is not None:
        diffusion["noise_schedule"] = noise_schedule
    if diffusion_steps is not None:
        diffusion["diffusion_steps"] = diffusion_steps
    diffusion = {k: v for k, v in diffusion.items() if k in ADM_DEFAULT_DIFFUSION}
    schedule = _adm_schedule_info(diffusion)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    state_dict = torchfile.load_state_dict(src, key=key)
    variables = adm.convert_state_dict(kwargs, state_dict)
    n_tensors = len(state_dict)
    del state_dict  # frees the raw checkpoint before writing
    _to_device_inplace(variables)
    path = save(dst, "adm", "UNetModel", kwargs, variables,
                extra=dict(schedule=schedule, source=source), overwrite=overwrite)
    _, n_params = _count(variables)
    return dict(class_name="UNetModel", kwargs=kwargs, dst=str(path), tensors=n_tensors,
                parameters=n_params, seconds=time.perf_counter() - start)

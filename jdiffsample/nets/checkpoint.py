"""Converted networks on disk: a folder with ``config.json`` and an Orbax checkpoint of the variables.

::

    dst/config.json     format, family, class_name, constructor kwargs, schedule, versions, source
    dst/variables/      the Flax variables {"params": ..., "skip": ...}

:func:`save` writes a folder atomically, :func:`load` reads it back as ``(module, variables)``,
:func:`resolve` finds a folder or a model shipped with the package (``digits``).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jdiffsample.nets import family as families
from jdiffsample.nets.lazy import LazyArray, has_lazy

__all__ = ["CONFIG_NAME", "VARIABLES_DIR", "save", "load", "load_config", "resolve", "bundled", "versions",
           "random_variables", "read_json"]

CONFIG_NAME = "config.json"
VARIABLES_DIR = "variables"
FORMAT = "jdiffsample-network"
FORMAT_VERSION = 1


def versions() -> dict:
    """Versions of the packages that wrote or read a checkpoint."""
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


def read_json(path_or_dict, what: str) -> dict:
    """A JSON object from a file (or a dict as is); ``ValueError`` saying what is wrong."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    try:
        data = json.loads(Path(path_or_dict).read_text())
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path_or_dict}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path_or_dict} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path_or_dict} must hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# bundled models


def _assets():
    return importlib.resources.files("jdiffsample") / "assets"


def bundled() -> list[str]:
    """Names of the networks shipped in the package (``jdiffsample/assets/<name>/config.json``)."""
    assets = _assets()
    if not assets.is_dir():
        return []
    return sorted(p.name for p in assets.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())


def resolve(name_or_dir) -> Path:
    """The checkpoint folder for ``name_or_dir``: an existing folder, else a bundled model.

    ``ValueError`` naming the bundled models when it is neither.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path.absolute()
    name = str(name_or_dir)
    if name in bundled():
        with importlib.resources.as_file(_assets() / name) as found:
            return Path(found)
    names = ", ".join(bundled()) or "none"
    raise ValueError(f"model {name!r} is neither a directory nor a bundled model (bundled: {names})")


# ---------------------------------------------------------------------------------------------
# save / load


#: Bytes Orbax may hold in flight while writing: its default serializes every array at once, one
#: more copy of the whole network (an EDM2-XXL conversion then peaked at 3x its file's size, 2.4x with this).
SAVE_CONCURRENT_GB = 0.5


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB))


def _streaming_checkpointer():
    """A checkpointer that also writes :class:`jdiffsample.nets.lazy.LazyArray` leaves, reading each
    only while it is written, :data:`SAVE_CONCURRENT_GB` of them at most at once (or one larger
    array alone). Its checkpoints are ordinary ones: the leaves are written as NumPy arrays are."""
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    handlers = [(LazyArray, _lazy_handler_class()(int(SAVE_CONCURRENT_GB * 1e9)))]
    handlers += [(ty, th.get_type_handler(ty)) for ty in (jax.Array, np.ndarray, np.number, int, float)]
    return ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=SAVE_CONCURRENT_GB, type_handler_registry=th.create_type_handler_registry(*handlers)))


@functools.cache
def _lazy_handler_class():
    """Orbax's NumPy handler, materializing each lazy leaf just before its write (defined on first
    use: orbax is imported late, for start-up time)."""
    import asyncio
    import weakref

    import tensorstore as ts
    from orbax.checkpoint import type_handlers as th

    class LazyArrayHandler(th.NumpyHandler):
        def __init__(self, limit_bytes: int):
            super().__init__(deepcopy_host_arrays=False)  # a lazy array is read fresh anyway
            self._limit = limit_bytes
            self._loops = weakref.WeakKeyDictionary()  # event loop -> (condition, [bytes in flight])

        async def _open_and_write(self, value, tspec, ts_context):  # NumpyHandler's one write
            need = min(int(value.nbytes), self._limit)
            cond, in_flight = self._loops.setdefault(asyncio.get_running_loop(), (asyncio.Condition(), [0]))
            async with cond:
                await cond.wait_for(lambda: in_flight[0] + need <= self._limit)
                in_flight[0] += need
            try:
                array = await asyncio.to_thread(np.asarray, value)
                store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
                await store.write(array, can_reference_source_data_indefinitely=True)
                del array, store
            finally:
                async with cond:
                    in_flight[0] -= need
                    cond.notify_all()

    return LazyArrayHandler


def save(dst, family: str, class_name: str, kwargs: Mapping[str, Any], variables,
         extra: Mapping[str, Any] | None = None, *, overwrite: bool = False,
         files: Mapping[str, Any] | None = None) -> Path:
    """Write ``variables`` and a ``config.json`` to the folder ``dst``, atomically.

    Everything is written into a temporary sibling folder that is renamed to ``dst`` at the end;
    on any failure (KeyboardInterrupt included) it is removed and nothing is left at ``dst``.

    Args:
      dst: the folder to create; it must not exist unless ``overwrite``.
      family: a name in :func:`jdiffsample.nets.family.names`.
      class_name, kwargs: the original class and its constructor kwargs (JSON values).
      variables: Flax variables ``{"params": ..., ...}`` (NumPy or JAX arrays).
      extra: more entries for ``config.json`` (``source``, ...). A ``schedule`` entry overrides
        the family's default.
      overwrite: replace an existing checkpoint at ``dst``.
      files: more files to copy into the folder, ``{relative path in dst: source file}`` (a text
        model's tokenizer files), copied before the folder appears under its name.

    Returns ``dst`` as an absolute path.
    """
    fam = families.get(family)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with a 'params' collection")
    from jdiffsample.nets.torchfile import json_value

    extra = dict(extra or {})
    reserved = {"format", "format_version", "family", "class_name", "kwargs", "versions"}
    if reserved & set(extra):
        raise ValueError(f"extra may not set {sorted(reserved & set(extra))}")
    if "schedule" not in extra and fam.schedule_info is not None:
        extra["schedule"] = fam.schedule_info(class_name, kwargs, extra)
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, family=family, class_name=class_name,
                  kwargs=json_value(dict(kwargs)), versions=versions(), **json_value(extra))
    text = json.dumps(config, indent=1)

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    created = [p for p in reversed(dst.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # a plain mkdir, so the final folder gets the usual (umask) permissions
    try:
        streaming = has_lazy(variables)
        ckptr = _streaming_checkpointer() if streaming else _checkpointer()
        try:
            if streaming:
                import orbax.checkpoint as ocp

                ckptr.save(tmp / VARIABLES_DIR, args=ocp.args.PyTreeSave(dict(variables)))
            else:
                ckptr.save(tmp / VARIABLES_DIR, dict(variables))
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        (tmp / CONFIG_NAME).write_text(text)
        for relative, source in (files or {}).items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        if dst.exists():  # overwrite: move the old checkpoint aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "ckpt")
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # folders this call created, deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return dst


def load_config(dst) -> dict:
    """The ``config.json`` of a converted network, validated (``ValueError`` otherwise)."""
    dst = Path(dst)
    path = dst / CONFIG_NAME
    if not dst.is_dir():
        raise ValueError(f"{dst} is not a jdiffsample network checkpoint: no such directory")
    if not path.is_file():
        raise ValueError(f"{dst} is not a jdiffsample network checkpoint: it has no {CONFIG_NAME} "
                         f"(create one with 'jdiffsample convert FAMILY SRC DST')")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jdiffsample network config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {config.get('format_version')!r} "
                         f"(this jdiffsample reads {FORMAT_VERSION})")
    missing = [k for k in ("family", "class_name", "kwargs") if k not in config]
    if missing:
        raise ValueError(f"{path}: malformed config (missing {', '.join(missing)})")
    families.get(config["family"])  # a known family
    return config


def restore_variables(dst):
    """The variables of checkpoint ``dst`` as JAX arrays on this process's first device."""
    import jax
    import jax.numpy as jnp

    path = (Path(dst) / VARIABLES_DIR).absolute()
    if not path.is_dir():
        raise ValueError(f"{dst} is not a complete jdiffsample checkpoint: no {VARIABLES_DIR}/")
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
    return jax.tree.map(jnp.asarray, variables)


def load(dst) -> tuple[Any, dict]:
    """``(module, variables)`` of a network written by :func:`save` / the converters.

    ``module`` is the Flax module (``module.apply(variables, ...)``); ``variables`` hold JAX
    arrays. ``ValueError`` if ``dst`` is not such a checkpoint.
    """
    config = load_config(dst)
    module = families.get(config["family"]).build(config["class_name"], config["kwargs"])
    return module, restore_variables(dst)


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

    return {name: jax.tree.map(rand if name == "params" else (lambda s: np.ones(s.shape, np.float32)), tree)
            for name, tree in shapes.items()}


def _to_device_inplace(tree: dict) -> None:
    """Replace the NumPy leaves of a nested dict by JAX arrays one at a time, so that each host
    copy is freed as soon as it has moved (Orbax writes JAX arrays with far less extra memory);
    lazy leaves stay as they are (the save reads them one at a time)."""
    import jax

    for key, value in tree.items():
        if isinstance(value, dict):
            _to_device_inplace(value)
        elif not isinstance(value, LazyArray):
            tree[key] = jax.device_put(value)


def save_converted(dst, family: str, class_name: str, kwargs: Mapping[str, Any], variables: dict, *,
                   tensors: int, started: float, extra: Mapping[str, Any] | None = None,
                   overwrite: bool = False, files: Mapping[str, Any] | None = None) -> dict:
    """:func:`save` for a converter (moving ``variables`` to the device leaf by leaf, in place);
    returns the converter's summary ``{family, class_name, kwargs, dst, tensors, parameters, seconds}``."""
    import time

    import jax

    parameters = int(sum(np.size(x) for x in jax.tree.leaves(variables.get("params", {}))))
    _to_device_inplace(variables)
    path = save(dst, family, class_name, kwargs, variables, extra=extra, overwrite=overwrite, files=files)
    return dict(family=family, class_name=class_name, kwargs=dict(kwargs), dst=str(path), tensors=int(tensors),
                parameters=parameters, seconds=time.perf_counter() - started)

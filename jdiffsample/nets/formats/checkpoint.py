"""Converted networks on disk: a folder with ``config.json`` and an Orbax checkpoint of the variables.

::

    dst/config.json     format, family, class_name, constructor kwargs, schedule, versions, source,
                        a CRC-32 of every array ("checksums") and the weights' digest
    dst/variables/      the Flax variables {"params": ..., "skip": ...}

:func:`write` writes a folder atomically; :func:`restore` reads the variables back and checks every
array against its recorded checksum (a damaged file is one clear error naming the array);
:func:`resolve` finds a folder or a model shipped with the package (``digits``). The digest
identifies the weights (run manifests record it): SHA-256 over each array's path, dtype, shape and
checksum, computed once, at conversion. This module knows nothing of network families.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import time
import uuid
import weakref
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore
from orbax.checkpoint import type_handlers

from jdiffsample.nets.formats.lazy import LazyArray, has_lazy
from jdiffsample.nets.formats.torchfile import json_value

__all__ = ["CONFIG_NAME", "VARIABLES_DIR", "FORMAT", "write", "save_converted", "read_config", "restore",
           "resolve", "bundled", "versions", "read_json", "checksums", "digest", "is_checkpoint", "replace_folder"]

CONFIG_NAME = "config.json"
VARIABLES_DIR = "variables"
FORMAT = "jdiffsample-network"
FORMAT_VERSION = 2  # 2: per-array checksums and the digest of the weights
READABLE_VERSIONS = (1, 2)


def versions() -> dict:
    """Versions of the packages that wrote or read a checkpoint."""
    md = importlib.metadata
    out = {}
    for dist, module in (("jdiffsample", "jdiffsample"), ("jax", "jax"), ("flax", "flax"),
                         ("orbax-checkpoint", "orbax.checkpoint"), ("numpy", "numpy")):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
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
# checksums


def _flat(variables) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` of a nested dict of arrays, paths ``"params/unet/conv_in/kernel"``, sorted."""
    out = []

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for key in node:
                walk(f"{prefix}/{key}" if prefix else str(key), node[key])
        else:
            out.append((prefix, node))

    walk("", variables)
    return sorted(out, key=lambda item: item[0])


def _crc(array: np.ndarray) -> str:
    data = np.ascontiguousarray(array).reshape(-1)
    return f"{zlib.crc32(data.view(np.uint8)) if data.size else 0:08x}"


def _record(a: np.ndarray) -> dict:
    return {"dtype": a.dtype.name, "shape": list(a.shape), "crc32": _crc(a)}


def checksums(variables) -> dict[str, dict]:
    """``{path: {"dtype", "shape", "crc32"}}`` of every array of ``variables`` (nested dicts)."""
    return {path: _record(np.asarray(leaf)) for path, leaf in _flat(variables)}


def digest(sums: Mapping[str, Mapping]) -> str:
    """SHA-256 of the checksum records: identifies the weights (equal digests, equal weights)."""
    return hashlib.sha256(json.dumps(dict(sorted(sums.items())), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# write


#: Bytes Orbax may hold in flight while writing: its default serializes every array at once, one
#: more copy of the whole network (an EDM2-XXL conversion then peaked at 3x its file's size, 2.4x with this).
SAVE_CONCURRENT_GB = 0.5


def _checkpointer():
    return ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB))


def _streaming_checkpointer(handler):
    """A checkpointer that also writes :class:`jdiffsample.nets.formats.lazy.LazyArray` leaves with
    ``handler``, reading each only while it is written, :data:`SAVE_CONCURRENT_GB` of them at most at
    once (or one larger array alone). Its checkpoints are ordinary ones: the leaves are written as
    NumPy arrays are."""
    handlers = [(LazyArray, handler)]
    handlers += [(ty, type_handlers.get_type_handler(ty)) for ty in (jax.Array, np.ndarray, np.number, int, float)]
    return ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=SAVE_CONCURRENT_GB, type_handler_registry=type_handlers.create_type_handler_registry(
            *handlers)))


class _LazyArrayHandler(type_handlers.NumpyHandler):
    """Orbax's NumPy handler, materializing each lazy leaf just before its write. It overrides the
    handler's one write, ``_open_and_write`` (a private method of Orbax: the streaming test of
    ``tests/test_convert_flux.py`` fails if an Orbax release changes it)."""

    def __init__(self, limit_bytes: int):
        super().__init__(deepcopy_host_arrays=False)  # a lazy array is read fresh anyway
        self._limit = limit_bytes
        self._loops = weakref.WeakKeyDictionary()  # event loop -> (condition, [bytes in flight])
        self.records: dict[int, dict] = {}  # id of a lazy leaf -> its checksum record, taken as it is written

    async def _open_and_write(self, value, tspec, ts_context):
        need = min(int(value.nbytes), self._limit)
        cond, in_flight = self._loops.setdefault(asyncio.get_running_loop(), (asyncio.Condition(), [0]))
        async with cond:
            await cond.wait_for(lambda: in_flight[0] + need <= self._limit)
            in_flight[0] += need
        try:
            array = await asyncio.to_thread(np.asarray, value)
            self.records[id(value)] = await asyncio.to_thread(_record, array)
            store = await tensorstore.open(tensorstore.Spec(tspec), create=True, open=True, context=ts_context)
            await store.write(array, can_reference_source_data_indefinitely=True)
            del array, store
        finally:
            async with cond:
                in_flight[0] -= need
                cond.notify_all()


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a folder written by :func:`write` (its ``config.json`` says so)."""
    try:
        return json.loads((Path(path) / CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_replaceable(dst: Path, sources) -> None:
    """``dst`` may be replaced: an empty folder, or a checkpoint holding nothing but what a checkpoint
    holds, that is neither a source of the conversion nor a folder above one."""
    for source in sources:
        source = Path(source).absolute()
        if source == dst or dst in source.parents:
            raise ValueError(f"{dst} holds the source {source}: the conversion cannot replace its own input; "
                             f"choose another destination")
    if not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a folder; --overwrite replaces only a jdiffsample checkpoint "
                         f"folder (or an empty one)")
    entries = sorted(p.name for p in dst.iterdir())
    if not entries:
        return
    if not is_checkpoint(dst):
        raise ValueError(f"{dst} is not a jdiffsample checkpoint (it holds {entries[0]}, ...); --overwrite "
                         f"replaces only a checkpoint folder or an empty one: choose another destination")
    config = json.loads((dst / CONFIG_NAME).read_text())
    ours = {CONFIG_NAME, VARIABLES_DIR, *(Path(f).parts[0] for f in config.get("files", []))}
    foreign = [e for e in entries if e not in ours]
    if foreign:
        raise ValueError(f"{dst} holds files that are not part of its checkpoint ({', '.join(foreign[:3])}); "
                         f"--overwrite would delete them: move them away or choose another destination")


def replace_folder(tmp: Path, dst: Path) -> None:
    """Move the finished folder ``tmp`` to ``dst`` (a sibling), replacing an earlier ``dst`` whole:
    the old folder aside, the new one in, then the old one removed."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def write(dst, config: Mapping[str, Any], variables, *, overwrite: bool = False,
          files: Mapping[str, Any] | None = None, sources=()) -> Path:
    """Write ``variables`` and ``config`` (plus format, versions, checksums and digest) to the folder
    ``dst``, atomically.

    Everything is written into a temporary sibling folder that is renamed to ``dst`` at the end; on
    any failure (KeyboardInterrupt included) it is removed and nothing is left at ``dst``. With
    ``overwrite`` an existing ``dst`` is replaced only if it is a checkpoint (or empty) and not one of
    ``sources`` (the files being converted) or a folder above one; the old folder is moved aside, the
    new one renamed into place, and only then is the old one removed.

    Args:
      dst: the folder to create.
      config: JSON values: ``family``, ``class_name``, ``kwargs`` and whatever else the family records.
      variables: Flax variables ``{"params": ..., ...}`` (NumPy or JAX arrays).
      files: more files to copy into the folder, ``{relative path in dst: source file}``.
      sources: paths the folder must never replace (the conversion's inputs).

    Returns ``dst`` as an absolute path.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with a 'params' collection")
    reserved = {"format", "format_version", "versions", "checksums", "digest", "files"}
    if reserved & set(config):
        raise ValueError(f"config may not set {sorted(reserved & set(config))}")
    body = json_value(dict(config))  # JSON values, checked before anything is written
    dst = Path(dst).absolute()
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists; replace it with --overwrite (overwrite=True)")
        _check_replaceable(dst, sources)
    created = [p for p in reversed(dst.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # a plain mkdir, so the final folder gets the usual (umask) permissions
    try:
        streaming = has_lazy(variables)  # leaves read from the source files one at a time
        handler = _LazyArrayHandler(int(SAVE_CONCURRENT_GB * 1e9))
        ckptr = _streaming_checkpointer(handler) if streaming else _checkpointer()
        try:
            if streaming:
                ckptr.save(tmp / VARIABLES_DIR, args=ocp.args.PyTreeSave(dict(variables)))
            else:
                ckptr.save(tmp / VARIABLES_DIR, dict(variables))
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        sums = {path: handler.records[id(leaf)] if isinstance(leaf, LazyArray) else _record(np.asarray(leaf))
                for path, leaf in _flat(variables)}
        text = json.dumps(dict(format=FORMAT, format_version=FORMAT_VERSION, **body,
                               versions=versions(), files=sorted(files or {}), digest=digest(sums), checksums=sums),
                          indent=1)
        for relative, source in (files or {}).items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        (tmp / CONFIG_NAME).write_text(text)
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # folders this call created, deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return dst


def _to_device_inplace(tree: dict) -> None:
    """Replace the NumPy leaves of a nested dict by JAX arrays one at a time, so that each host
    copy is freed as soon as it has moved (Orbax writes JAX arrays with far less extra memory);
    lazy leaves stay as they are (the save reads them one at a time)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _to_device_inplace(value)
        elif not isinstance(value, LazyArray):
            tree[key] = jax.device_put(value)


def save_converted(dst, family: str, class_name: str, kwargs: Mapping[str, Any], variables: dict, *,
                   tensors: int, started: float, schedule=None, extra: Mapping[str, Any] | None = None,
                   overwrite: bool = False, files: Mapping[str, Any] | None = None, sources=()) -> dict:
    """:func:`write` for a converter (moving ``variables`` to the device leaf by leaf, in place);
    ``schedule`` a :class:`jdiffsample.schedules.Schedule` (diffusion models). Returns the converter's
    summary ``{family, class_name, kwargs, dst, tensors, parameters, seconds}``."""
    parameters = int(sum(np.size(x) for x in jax.tree.leaves(variables.get("params", {}))))
    config = dict(family=family, class_name=class_name, kwargs=dict(kwargs), **dict(extra or {}))
    if schedule is not None:
        config["schedule"] = schedule.to_config()
    _to_device_inplace(variables)
    path = write(dst, config, variables, overwrite=overwrite, files=files, sources=sources)
    return dict(family=family, class_name=class_name, kwargs=dict(kwargs), dst=str(path), tensors=int(tensors),
                parameters=parameters, seconds=time.perf_counter() - started)


def check_destination(dst, overwrite: bool, sources=()) -> None:
    """Refuse early (before minutes of conversion) what :func:`write` would refuse at the end."""
    dst = Path(dst).absolute()
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists; replace it with --overwrite (overwrite=True)")
        _check_replaceable(dst, sources)


# ---------------------------------------------------------------------------------------------
# read


def read_config(dst) -> dict:
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
    if config.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported format_version {config.get('format_version')!r} "
                         f"(this jdiffsample reads {', '.join(map(str, READABLE_VERSIONS))})")
    missing = [k for k in ("family", "class_name", "kwargs") if k not in config]
    if missing:
        raise ValueError(f"{path}: malformed config (missing {', '.join(missing)})")
    return config


def _host_array(x) -> np.ndarray:
    """A (possibly sharded) array on the host, assembled from this process's shards."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    out = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def _verify(dst, variables, sums: Mapping[str, Mapping]) -> None:
    found = dict(_flat(variables))
    if set(found) != set(sums):
        missing = sorted(set(sums) - set(found)) or sorted(set(found) - set(sums))
        raise ValueError(f"{dst}: the variables do not match config.json's checksums (array {missing[0]} is "
                         f"missing or extra); the checkpoint is damaged: convert it again")
    for path, record in sums.items():
        a = _host_array(found[path])
        if a.dtype.name != record["dtype"] or list(a.shape) != list(record["shape"]) or _crc(a) != record["crc32"]:
            raise ValueError(f"{dst}: array {path} does not match its recorded checksum: the checkpoint is "
                             f"damaged; convert it again")


def restore(dst, *, verify: bool = True, shardings=None, host: bool = False):
    """The variables of checkpoint ``dst`` as JAX arrays, each checked against its recorded checksum
    (``ValueError`` naming the first damaged array).

    ``shardings``: a function ``(path, shape) -> jax.sharding.Sharding`` placing each array (default:
    this process's first device); arrays are then read straight into their shards. ``host``: NumPy
    arrays in host memory instead."""
    dst = Path(dst)
    config = read_config(dst)
    path = (dst / VARIABLES_DIR).absolute()
    if not path.is_dir():
        raise ValueError(f"{dst} is not a complete jdiffsample checkpoint: no {VARIABLES_DIR}/")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    ckptr = _checkpointer()
    try:
        tree = ckptr.metadata(path).item_metadata.tree
        # Restore onto explicit shardings: without them Orbax would use the saving device recorded in
        # the checkpoint (a CPU-made file then fails on a GPU).
        if host:
            target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
        else:
            target = jax.tree_util.tree_map_with_path(
                lambda p, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here if shardings is None else shardings(
                    "/".join(str(getattr(k, "key", k)) for k in p), m.shape)), tree)
        variables = ckptr.restore(path, target)
    except Exception as e:  # orbax raises a variety of types for damaged checkpoints
        raise ValueError(f"{path}: cannot restore the variables ({type(e).__name__}: {e}); the checkpoint is "
                         f"damaged: convert it again") from e
    finally:
        ckptr.close()
    variables = jax.tree.map(np.asarray if host else jnp.asarray, variables)
    if verify and config.get("checksums") is not None:
        _verify(dst, variables, config["checksums"])
    return variables

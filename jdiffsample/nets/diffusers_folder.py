"""Read one model folder of a diffusers / transformers checkpoint (``vae/``, ``unet/``,
``text_encoder/``): its ``config.json`` and its weights as NumPy arrays, without torch.

Weights files are looked up in this order, the first that exists wins::

    {stem}.safetensors, {stem}.safetensors.index.json (shards), {bin_stem}.bin,
    {bin_stem}.bin.index.json, then the same with the fp16 variant
    ({stem}.fp16.safetensors, {stem}.safetensors.index.fp16.json, ...)

``stem`` is ``diffusion_pytorch_model`` for diffusers models; transformers models use
``model.safetensors`` but ``pytorch_model.bin`` (``stem="model", bin_stem="pytorch_model"``).
Safetensors files are read by this module (their header checked against the file's size first, so
a truncated file fails before anything is converted; bfloat16 as ``ml_dtypes.bfloat16``);
:func:`lazy_weights` gives :class:`jdiffsample.nets.lazy.LazyArray` s that read one tensor when it
is needed, so that a converter can stream a model larger than the memory. ``.bin`` files are read
with :func:`jdiffsample.nets.torchfile.load_state_dict`, which never executes code from the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jdiffsample.nets import torchfile
from jdiffsample.nets.lazy import LazyArray
from jdiffsample.nets.statedict import listing

__all__ = ["read_config", "read_weights", "weights_file", "lazy_weights", "lazy_safetensors", "read_index",
           "safetensors_header", "SAFETENSORS_DTYPES", "read_model_index", "pipeline_part"]


def read_config(folder) -> dict[str, Any]:
    """The ``config.json`` of ``folder`` as a dict (``ValueError`` if absent or not a JSON object)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json (is this a model folder such as vae/ or unet/?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a {type(config).__name__}, not a JSON object")
    return config


def _candidates(stem: str, bin_stem: str) -> list[str]:
    names = []
    for variant in ("", ".fp16"):
        for base, ext in ((stem, "safetensors"), (bin_stem, "bin")):
            names += [f"{base}{variant}.{ext}", f"{base}.{ext}.index{variant}.json"]
    return names


def weights_file(folder, stem: str = "diffusion_pytorch_model", bin_stem: str | None = None) -> Path:
    """The weights file (or shard index) :func:`read_weights` reads from ``folder``."""
    names = _candidates(stem, bin_stem or stem)
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise ValueError(f"{folder}: no weights file (looked for {', '.join(names)})")


#: safetensors dtype names -> NumPy dtypes (bfloat16 from ml_dtypes, as JAX uses it).
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def safetensors_header(path) -> tuple[dict[str, dict], int]:
    """``({name: {"dtype", "shape", "data_offsets"}}, data_start)`` of a safetensors file, checked
    against the file's size: ``ValueError`` (one line) for a file that is not safetensors, a
    truncated one, a dtype outside :data:`SAFETENSORS_DTYPES` or offsets that do not fit the shapes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: not a safetensors file (bad header length; truncated?)")
            header = json.loads(f.read(n))
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    start, available = 8 + n, size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: malformed safetensors entry {name!r} ({err!r})") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{path}: tensor {name}'s data offsets {begin}..{end} do not fit its shape {shape} {dtype}")
        if end > available:
            raise ValueError(f"{path}: truncated: tensor {name} ends at byte {start + end}, the file has {size}")
    return header, start


def _reader(path: Path, offset: int, nbytes: int, shape: tuple, dtype) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        buffer = np.empty(nbytes, np.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(buffer))
        if got != nbytes:
            raise ValueError(f"{path}: truncated (the file changed after it was checked?)")
        return buffer.view(dtype).reshape(shape)

    return read


def lazy_safetensors(path) -> dict[str, LazyArray]:
    """The tensors of a safetensors file as :class:`LazyArray` s (each read when it is needed);
    the file is checked first (:func:`safetensors_header`)."""
    path = Path(path)
    header, start = safetensors_header(path)
    out = {}
    for name, info in header.items():
        dtype, shape = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
        begin, end = info["data_offsets"]
        out[name] = LazyArray(_reader(path, start + begin, end - begin, shape, dtype), shape, dtype,
                              source=f"{path.name}:{name}")
    return out


def _lazy_file(path: Path) -> dict[str, Any]:
    if path.name.endswith(".safetensors"):
        return lazy_safetensors(path)
    return torchfile.load_state_dict(path)  # .bin: read at once (pickles cannot be read lazily)


def read_index(path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of a shard index ``*.index.json``, checked:
    ``ValueError`` when it is not one or names a file that does not exist."""
    path = Path(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a shard index with a weight_map ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path}: its weight_map is not an object of tensor name -> file name")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise ValueError(f"{path}: shard {shard!r} is not a file name in the folder")
        if not (path.parent / shard).is_file():
            raise ValueError(f"{path}: shard {shard} is missing")
    return weight_map


def lazy_weights(folder, stem: str = "diffusion_pytorch_model", bin_stem: str | None = None) -> dict[str, Any]:
    """All tensors of the model in ``folder``, ``{name: LazyArray}`` in the files' dtypes, nothing
    read yet but the headers (``.bin`` files, which cannot be read lazily, are read at once into
    NumPy arrays). Every file is checked first: ``ValueError`` for a missing or truncated file or
    shard, or a shard index that does not match its shards."""
    path = weights_file(folder, stem, bin_stem)
    if not path.name.endswith(".json"):
        return _lazy_file(path)
    weight_map = read_index(path)
    weights: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _lazy_file(path.parent / shard)
        wrong = sorted(k for k in tensors if weight_map.get(k, shard) != shard)
        if wrong:
            raise ValueError(f"{path}: tensors of {shard} are mapped to other shards ({listing(wrong)})")
        weights.update(tensors)
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise ValueError(f"{path}: tensors named in the index are not in the shards ({listing(missing)})")
    return weights


def read_weights(folder, stem: str = "diffusion_pytorch_model",
                 bin_stem: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of the model in ``folder``, ``{name: array}`` in the file's dtype (see the module
    docstring for which file is read). ``ValueError`` when there is none or it cannot be read."""
    return {k: np.asarray(v) for k, v in lazy_weights(folder, stem, bin_stem).items()}


# ----------------------------------------------------------------------------------------------
# Pipeline folders (model_index.json and its parts)


def read_model_index(src, pipelines, hint: str = "") -> tuple[str, dict[str, Any]]:
    """``(class_name, model_index)`` of the diffusers pipeline folder ``src``, checked: a folder with
    a ``model_index.json`` naming one of ``pipelines`` (``ValueError`` otherwise, ending with
    ``hint``, e.g. which converter reads the other pipelines)."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder (give a diffusers pipeline folder with model_index.json)")
    path = src / "model_index.json"
    if not path.is_file():
        raise ValueError(f"{src} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in pipelines:
        raise ValueError(f"{src}: the pipeline is {name!r}; this converter reads {', '.join(pipelines)}{hint}")
    return name, index


def pipeline_part(src, index: Mapping[str, Any], part: str, classes) -> str:
    """The class of the pipeline part ``part`` (``transformer``, ``vae``, ``text_encoder_2``, ...),
    checked: listed in ``model_index.json`` as one of ``classes``, and its folder present."""
    entry = index.get(part)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise ValueError(f"{src}: model_index.json lists no {part}")
    if entry[1] not in classes:
        raise ValueError(f"{src}: {part} is a {entry[1]}; supported: {', '.join(classes)}")
    if not (Path(src) / part).is_dir():
        raise ValueError(f"{src}: the {part}/ folder is missing")
    return entry[1]

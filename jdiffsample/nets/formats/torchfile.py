"""Read PyTorch checkpoint files without torch and without running code from them.

PyTorch files are pickles, and unpickling can call any importable function. This module
unpickles them with :class:`SafeUnpickler`, whose ``find_class`` resolves only an explicit
allow-list of globals, each mapped to a small stand-in written here (no torch import):

* tensor and parameter rebuilders (``torch._utils._rebuild_tensor_v2`` and friends), which
  turn a storage, offset, size and stride into a NumPy array (a read-only view that honours
  offsets, strides and shared storages);
* storage types (``torch.FloatStorage`` ...), torch dtypes, ``torch.Size``, ``torch.device``;
* ``torch.storage._load_from_bytes``, whose argument is a complete nested legacy
  ``torch.save`` blob: it is read recursively by the same safe reader;
* containers (``collections.OrderedDict``, ``set``, ``torch.nn.ModuleDict`` ...), NumPy scalars
  and dtypes, and ``torch_utils.persistence._reconstruct_persistent_obj``, which here only
  *records* its ``meta`` dict (the embedded ``module_src`` is never executed).

Anything else raises :class:`UnsafeCheckpointError` naming the offending ``module.name``.

Public functions:

* :func:`load_state_dict` -- a ``torch.save`` file (zip format, or the legacy non-zip format)
  holding a state dict, optionally wrapped (``key='state_dict'``, ``key='ema'``...).
* :func:`load_edm_pickle` -- an NVlabs/edm ``network-snapshot-*.pkl`` / ``edm-*.pkl``:
  returns ``(class_name, init_kwargs, state_dict)``.
* :func:`load_pickle` -- any other plain pickle of containers and NumPy arrays (EDM2's reference
  statistics).

Damaged files raise :class:`CheckpointFormatError` with a message naming the problem.
"""

from __future__ import annotations

import io
import mmap as _mmap
import os
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from jdiffsample.nets.formats.torchpickle import (LEGACY_MAGIC, LEGACY_PROTOCOL, CheckpointFormatError, ModuleContainer,
                                                 PersistentObject, SafeUnpickler, Storage, TensorRef,
                                                 UnsafeCheckpointError, safe_load, storage_record)

__all__ = [
    "UnsafeCheckpointError",
    "CheckpointFormatError",
    "SafeUnpickler",
    "load",
    "load_state_dict",
    "check_tensors",
    "load_edm_pickle",
    "load_pickle",
    "check_edm_class",
    "file_kind",
    "read_pickle",
    "module_tensors",
    "json_value",
    "EDM_CLASSES",
]


# ---------------------------------------------------------------------------------------------
# file formats


def _member_data(fobj: io.BufferedReader, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored zip member's data (parsed from its local header)."""
    fobj.seek(info.header_offset)
    header = fobj.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointFormatError(f"zip member {info.filename}: bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _ZipReader:
    """Reads the ``torch.save`` zip format: ``<prefix>/data.pkl`` plus ``<prefix>/data/<key>``."""

    def __init__(self, path, use_mmap: bool):
        self.path = str(path)
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise CheckpointFormatError(
                f"{self.path}: not a valid zip archive ({e}); the file is probably truncated or "
                f"corrupt") from None
        names = self.zip.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointFormatError(
                f"{self.path}: expected exactly one <archive>/data.pkl in the zip, found {pkls}")
        self.prefix = pkls[0][: -len("data.pkl")]
        self.members = {i.filename: i for i in self.zip.infolist()}
        order = self.members.get(self.prefix + "byteorder")
        byteorder = self.zip.read(order).decode().strip() if order else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointFormatError(f"{self.path}: unknown byteorder {byteorder!r}")
        self.byteorder = byteorder
        self.storages: dict[str, Storage] = {}
        self.file = open(path, "rb")
        self.map = None
        if use_mmap and os.path.getsize(path) > 0:
            self.map = _mmap.mmap(self.file.fileno(), 0, access=_mmap.ACCESS_READ)

    def close(self):
        self.zip.close()
        self.file.close()  # the mmap stays valid while arrays reference it

    def load(self):
        where = f"{self.path}:{self.prefix}data.pkl"
        with self.zip.open(self.prefix + "data.pkl") as f:
            return safe_load(f, where, persistent_load=self.persistent_load, load_nested=_load_any)

    def persistent_load(self, pid):
        storage_type, key, numel = storage_record(pid, self.path)
        if key in self.storages:
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        info = self.members.get(name)
        if info is None:
            raise CheckpointFormatError(f"{self.path}: storage {name} is missing from the archive")
        dtype = storage_type.dtype
        need = numel * dtype.itemsize
        if info.file_size < need:
            raise CheckpointFormatError(
                f"{self.path}: storage {name} is {info.file_size} bytes, tensor needs {need} "
                f"({numel} x {dtype})")
        if self.map is not None and info.compress_type == zipfile.ZIP_STORED:
            start = _member_data(self.file, info)
            if start + info.file_size > len(self.map):
                raise CheckpointFormatError(
                    f"{self.path}: storage {name} runs past the end of the file (truncated)")
            raw = memoryview(self.map)[start:start + info.file_size]
            if zlib.crc32(raw) != info.CRC:
                raise CheckpointFormatError(f"{self.path}: storage {name} fails its CRC check")
            buf = raw[:need]
        else:
            try:
                buf = self.zip.read(info)[:need]
            except (zipfile.BadZipFile, zlib.error, OSError) as e:
                raise CheckpointFormatError(f"{self.path}: storage {name}: {e}") from None
        data = np.frombuffer(buf, dtype, count=numel)
        if self.byteorder != sys.byteorder:
            data = data.byteswap()  # a native-order copy
        storage = Storage(dtype, numel, f"storage {name}", data)
        self.storages[key] = storage
        return storage


class _LegacyReader:
    """Reads the legacy (non-zip) ``torch.save`` format.

    Layout: pickles of the magic number, the protocol version and a sys-info dict, then the
    object pickle whose storages are persistent ids, then a pickled list of storage keys,
    then for each key an int64 element count followed by the little-endian raw data.
    """

    def __init__(self, f, where: str, depth: int, memory, use_mmap: bool):
        self.f, self.where, self.depth, self.memory = f, where, depth, memory
        self.use_mmap = use_mmap
        self.storages: dict[str, Storage] = {}
        self.views: list[tuple[Storage, Storage, int]] = []

    def _check_header(self):
        """Magic number, format version, and a sys-info dict (ignored: storage data is always
        written little-endian, whatever the host was)."""
        if self._load() != LEGACY_MAGIC:
            raise CheckpointFormatError(f"{self.where}: bad legacy torch.save magic number")
        version = self._load()
        if version != LEGACY_PROTOCOL:
            raise CheckpointFormatError(f"{self.where}: unsupported legacy version {version!r}")
        self._load()

    def _load(self, **kwargs):
        return safe_load(self.f, self.where, depth=self.depth, load_nested=_load_any, **kwargs)

    def persistent_load(self, pid):
        storage_type, key, numel = storage_record(pid, self.where)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = Storage(storage_type.dtype, numel, f"storage {key}")
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        try:  # an old-style storage view: (view_key, element offset, element count)
            _, offset, size = view
            offset, size = int(offset), int(size)
        except (TypeError, ValueError):
            raise CheckpointFormatError(f"{self.where}: malformed storage view {view!r}") from None
        sub = Storage(storage_type.dtype, size, f"storage {key}[{offset}:{offset + size}]")
        self.views.append((sub, root, offset))
        return sub

    def load(self):
        self._check_header()
        root = self._load(persistent_load=self.persistent_load)
        keys = self._load()
        if not isinstance(keys, list):
            raise CheckpointFormatError(f"{self.where}: malformed storage key list")
        pos = self.f.tell()
        total = self.f.seek(0, io.SEEK_END)
        for key in keys:
            storage = self.storages.get(str(key))
            if storage is None:
                raise CheckpointFormatError(f"{self.where}: storage {key} has no tensor record")
            if pos + 8 > total:
                raise CheckpointFormatError(
                    f"{self.where}: file ends before storage {key} (truncated)")
            self.f.seek(pos)
            (count,) = struct.unpack("<q", self.f.read(8))
            nbytes = count * storage.dtype.itemsize
            if count != storage.numel:
                raise CheckpointFormatError(
                    f"{self.where}: storage {key} is recorded with {count} elements, its tensor "
                    f"record says {storage.numel}")
            if pos + 8 + nbytes > total:
                raise CheckpointFormatError(
                    f"{self.where}: storage {key} is {total - pos - 8} bytes, tensor needs "
                    f"{nbytes} (file truncated)")
            storage.data = self._array(pos + 8, storage)
            pos += 8 + nbytes
        for sub, parent, offset in self.views:
            if parent.data is None or offset < 0 or offset + sub.numel > parent.numel:
                raise CheckpointFormatError(f"{self.where}: {sub.where} lies outside its storage")
            sub.data = parent.data[offset:offset + sub.numel]
        missing = [k for k, s in self.storages.items() if s.data is None]
        if missing:
            raise CheckpointFormatError(f"{self.where}: no data for storages {missing[:5]}")
        return _resolve(root, {})

    def _array(self, start, storage: Storage) -> np.ndarray:
        """The storage's elements (always written little-endian) as a native-order array."""
        dtype, count = storage.dtype, storage.numel
        if self.memory is not None:
            data = np.frombuffer(self.memory, dtype, count=count, offset=start)
        elif self.use_mmap and count:
            data = np.memmap(self.f.name, dtype, mode="r", offset=start, shape=(count,))
            data = data.view(np.ndarray)  # a plain array, still backed by the mapping
        else:
            self.f.seek(start)
            data = np.frombuffer(self.f.read(count * dtype.itemsize), dtype, count=count)
        return data if sys.byteorder == "little" else data.byteswap()


def _resolve(obj, memo: dict):
    """Replace deferred tensors by arrays throughout a loaded object (in place where possible).

    ``memo`` maps ``id(original) -> (original, result)``; keeping the original alive keeps
    its id from being reused while the walk runs.
    """
    if isinstance(obj, TensorRef):
        return obj.materialize()
    if not isinstance(obj, (dict, list, tuple, PersistentObject, ModuleContainer)):
        return obj
    if id(obj) in memo:
        return memo[id(obj)][1]
    memo[id(obj)] = (obj, obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _resolve(v, memo)
    elif isinstance(obj, list):
        obj[:] = [_resolve(v, memo) for v in obj]
    elif type(obj) is tuple:
        result = tuple(_resolve(v, memo) for v in obj)
        memo[id(obj)] = (obj, result)
        return result
    elif isinstance(obj, (PersistentObject, ModuleContainer)):
        obj.state = _resolve(obj.state, memo)
    return obj


# The legacy format opens with pickle(MAGIC): LONG1 with a 10-byte little-endian payload.
_LEGACY_HEAD = b"\x8a\n" + LEGACY_MAGIC.to_bytes(10, "little")


def _kind(head: bytes) -> str:
    """See :func:`file_kind`; ``head`` is the first 32 bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "legacy" if _LEGACY_HEAD in head else "pickle"
    return "unknown"


def file_kind(path) -> str:
    """``'zip'`` (torch.save zip), ``'legacy'`` (legacy torch.save), ``'pickle'`` (any other
    pickle, e.g. an EDM snapshot) or ``'unknown'``, from the first bytes of the file."""
    with open(path, "rb") as f:
        return _kind(f.read(32))


def _load_any(f, *, where: str, depth: int = 0, memory=None, use_mmap: bool = True):
    """Load a torch.save stream (zip or legacy); ``f`` is a seekable binary file."""
    head = f.read(32)
    f.seek(0)
    kind = _kind(head)
    if kind == "zip":
        if memory is not None:
            raise CheckpointFormatError(f"{where}: nested zip storage blobs are not supported")
        reader = _ZipReader(f.name, use_mmap)
        try:
            return reader.load()  # storages are read as they are met: nothing is deferred
        finally:
            reader.close()
    if kind == "legacy":
        reader = _LegacyReader(f, where, depth, memory, use_mmap)
        return reader.load()
    if kind == "pickle":
        raise CheckpointFormatError(
            f"{where}: not a torch.save file (it is a plain pickle; for an EDM snapshot use "
            f"load_edm_pickle)")
    if head.startswith(b"PK"):
        raise CheckpointFormatError(f"{where}: truncated or corrupt zip archive")
    raise CheckpointFormatError(
        f"{where}: not a PyTorch checkpoint (starts with {head[:8]!r}; neither the zip format "
        f"nor a pickle)")


# ---------------------------------------------------------------------------------------------
# public API


def load_pickle(path):
    """A plain pickle of containers, strings, numbers and NumPy arrays (e.g. EDM2's reference
    statistics ``{metric: {'mu': ..., 'sigma': ...}}``), unpickled with :class:`SafeUnpickler`:
    nothing from the file is executed; anything else raises :class:`UnsafeCheckpointError`."""
    where = str(path)
    if file_kind(path) in ("zip", "legacy"):
        raise CheckpointFormatError(f"{where}: a torch.save file, not a plain pickle")
    with open(path, "rb") as f:
        return read_pickle(f, where)


def read_pickle(f, where: str = "pickle"):
    """A plain pickle stream (``pickle.dumps`` of tensors and containers, as inside EDM snapshots),
    read by the safe unpickler; tensors pickled as nested ``torch.save`` blobs are read too."""
    return safe_load(f, where, load_nested=_load_any)


def load(path, *, mmap: bool = True):
    """The whole content of a ``torch.save`` file (tensors as NumPy arrays, containers as dicts and
    lists), read without torch and without running code from it."""
    with open(path, "rb") as f:
        return _load_any(f, where=str(path), use_mmap=mmap)


def check_tensors(sd: Mapping, where: str) -> dict[str, np.ndarray]:
    """``sd`` as ``{name: np.ndarray}``; ``CheckpointFormatError`` naming the first non-tensor."""
    bad = [(k, v) for k, v in sd.items() if not isinstance(v, np.ndarray)]
    if bad:
        k, v = bad[0]
        raise CheckpointFormatError(
            f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor (is this a wrapped "
            f"checkpoint? pass key=...)")
    return {str(k): v for k, v in sd.items()}


def load_state_dict(path, key: str | tuple | list | None = None, *, copy: bool = False,
                    mmap: bool = True) -> dict[str, np.ndarray]:
    """Read a state dict from a ``torch.save`` file without torch and without running code.

    Args:
      path: a file written by ``torch.save`` (zip format, or the legacy format).
      key: if the top level wraps the state dict (``{'state_dict': ...}``, ``{'ema': ...}``),
        the entry to take; a list/tuple of keys descends several levels. Without ``key`` the
        top level must itself be the mapping of names to tensors.
      copy: return independent, writable, C-contiguous arrays. By default arrays are
        read-only views of the file's storages (memory-mapped when possible), so tensors
        that share a storage share memory, and strides and offsets are those of the tensor.
      mmap: memory-map the storages of zip files instead of reading them into memory.

    Returns:
      ``{name: np.ndarray}`` in file order. bfloat16/float8 use ``ml_dtypes`` dtypes.

    Raises:
      UnsafeCheckpointError: the file references a global outside the allow-list.
      CheckpointFormatError: truncated/corrupt file, unsupported content, or not a state dict.
    """
    where = str(path)
    obj = load(path, mmap=mmap)
    if key is not None:
        for k in (key if isinstance(key, (list, tuple)) else (key,)):
            if not isinstance(obj, Mapping) or k not in obj:
                have = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointFormatError(f"{where}: no entry {k!r} (top-level entries: {have})")
            obj = obj[k]
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{where}: holds a {type(obj).__name__}, not a state dict (a mapping of names to "
            f"tensors)")
    if key is None and obj and not any(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointFormatError(
            f"{where}: the top level is not a state dict but wraps one; its entries are "
            f"{list(obj)[:20]}; pass key=... (e.g. key='state_dict' or key='ema')")
    sd = check_tensors(obj, where)
    if copy:
        sd = {k: np.array(v, order="C") for k, v in sd.items()}
    return sd


# Constructor signatures of the supported NVlabs/edm preconditioners: positional parameter
# names (to name any positional init args) and the default backbone.
EDM_CLASSES: dict[str, tuple[tuple[str, ...], str]] = {
    "VPPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d",
                   "beta_min", "M", "epsilon_t", "model_type"), "SongUNet"),
    "VEPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min",
                   "sigma_max", "model_type"), "SongUNet"),
    "iDDPMPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "C_1", "C_2",
                      "M", "model_type"), "DhariwalUNet"),
    "EDMPrecond": (("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min",
                    "sigma_max", "sigma_data", "model_type"), "DhariwalUNet"),
}
EDM_MODEL_TYPES = ("SongUNet", "DhariwalUNet")


def json_value(x):
    """NumPy scalars/arrays and tuples -> plain JSON values, recursively (``TypeError`` names
    anything else)."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Mapping):
        return {str(k): json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_value(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    raise TypeError(f"a {type(x).__name__} is not a JSON value")


def module_tensors(obj, where: str) -> dict[str, np.ndarray]:
    """The ``state_dict()`` of a pickled ``torch.nn.Module`` (read as a :class:`PersistentObject` or
    module container): its parameters and persistent buffers under dotted names."""
    out: dict[str, np.ndarray] = {}
    _module_tensors(obj, "", out, where)
    return out


def _module_tensors(obj, prefix: str, out: dict, where: str):
    """Collect ``state_dict()``-style dotted names from a module's ``__dict__``."""
    state = obj.state if isinstance(obj, (PersistentObject, ModuleContainer)) else None
    if not isinstance(state, Mapping):
        raise CheckpointFormatError(f"{where}: module {prefix or '<root>'} has no state")
    transient = state.get("_non_persistent_buffers_set") or ()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in transient):
                continue
            if not isinstance(value, np.ndarray):
                raise CheckpointFormatError(
                    f"{where}: {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _module_tensors(child, f"{prefix}{name}.", out, where)


def check_edm_class(class_name: str, kwargs: Mapping, where: str = "EDM network") -> dict:
    """Check an EDM class/kwargs pair is supported; return the kwargs as plain JSON values with
    ``model_type`` filled in from the class default when absent."""
    if class_name not in EDM_CLASSES:
        raise CheckpointFormatError(
            f"{where}: unsupported network class {class_name!r} (supported: "
            f"{', '.join(EDM_CLASSES)})")
    try:
        init = json_value(kwargs)
    except TypeError as e:
        raise CheckpointFormatError(f"{where}: unsupported constructor argument ({e})") from None
    init.setdefault("model_type", EDM_CLASSES[class_name][1])
    if init["model_type"] not in EDM_MODEL_TYPES:
        raise CheckpointFormatError(
            f"{where}: unsupported model_type {init['model_type']!r} in {class_name} "
            f"(supported: {', '.join(EDM_MODEL_TYPES)})")
    return init


def load_edm_pickle(path, key: str = "ema") -> tuple[str, dict, dict[str, np.ndarray]]:
    """Read an NVlabs/edm snapshot pickle without executing its embedded source code.

    Args:
      path: ``network-snapshot-*.pkl`` or a released ``edm-*.pkl`` (a plain pickle of a dict
        with ``'ema'`` and other entries, whose networks are ``torch_utils.persistence``
        objects).
      key: the entry holding the network (``'ema'``).

    Returns:
      ``(class_name, init_kwargs, state_dict)``: the preconditioner class (one of
      :data:`EDM_CLASSES`), its constructor keyword arguments as plain JSON-friendly values
      (positional arguments named, ``model_type`` filled in), and the tensors under their
      ``state_dict()`` names (``model.enc.16x16_conv.weight`` ...).
    """
    where = str(path)
    if file_kind(path) in ("zip", "legacy"):
        raise CheckpointFormatError(
            f"{where}: a torch.save file, not an EDM snapshot pickle (use load_state_dict with "
            f"a class_name/kwargs JSON)")
    with open(path, "rb") as f:
        data = safe_load(f, where, load_nested=_load_any)
    net = data
    if isinstance(data, Mapping):
        if key not in data:
            raise CheckpointFormatError(
                f"{where}: no {key!r} entry (top-level entries: {list(data)[:20]})")
        net = data[key]
    if not isinstance(net, PersistentObject):
        raise CheckpointFormatError(
            f"{where}: {key!r} is a {type(net).__name__}, not a torch_utils.persistence object")
    name = net.class_name
    if name not in EDM_CLASSES:
        raise CheckpointFormatError(
            f"{where}: unsupported network class {name!r} (supported: "
            f"{', '.join(EDM_CLASSES)})")
    state = net.state if isinstance(net.state, Mapping) else {}
    args = net.meta_init_args if net.meta_init_args is not None else state.get("_init_args", ())
    kwargs = net.meta_init_kwargs if net.meta_init_kwargs is not None else state.get(
        "_init_kwargs")
    if kwargs is None:
        raise CheckpointFormatError(f"{where}: {name} carries no constructor arguments")
    positional = EDM_CLASSES[name][0]
    args = list(args or ())
    if len(args) > len(positional):
        raise CheckpointFormatError(f"{where}: {name} has {len(args)} positional init args")
    init = check_edm_class(name, {**dict(zip(positional, args)), **dict(kwargs)}, where)
    tensors: dict[str, np.ndarray] = {}
    _module_tensors(net, "", tensors, where)
    return name, init, tensors

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

import collections
import io
import mmap as _mmap
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

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
    "json_value",
    "EDM_CLASSES",
]


class UnsafeCheckpointError(ValueError):
    """The file references a global outside the allow-list (it could run code if unpickled)."""


class CheckpointFormatError(ValueError):
    """The file is truncated, corrupt, or not in a supported format."""


# ---------------------------------------------------------------------------------------------
# dtypes

# Legacy typed storage classes (torch.<Name>Storage) and the NumPy dtype of their elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# torch dtype objects (pickled as GLOBAL 'torch float32' ...), used by _rebuild_tensor_v3.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128), "cdouble": np.dtype(np.complex128),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_NESTING = 2  # _load_from_bytes inside _load_from_bytes inside ... is refused beyond this


# ---------------------------------------------------------------------------------------------
# stand-in objects


class _StorageType:
    """Stand-in for a storage class global such as ``torch.FloatStorage``."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class _DType:
    """Stand-in for a torch dtype global such as ``torch.float32``."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class _TypeToken:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` (only used as an argument)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name


class _Storage:
    """A storage: ``numel`` elements of ``dtype``; ``data`` is a 1-D array once available."""

    def __init__(self, dtype: np.dtype, numel: int, where: str, data: np.ndarray | None = None):
        self.dtype, self.numel, self.where, self.data = dtype, int(numel), where, data


class _TensorRef:
    """A tensor whose storage bytes come later in the file (legacy format)."""

    def __init__(self, storage: _Storage, offset, size, stride, dtype=None):
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def materialize(self) -> np.ndarray:
        return _view(self.storage, self.offset, self.size, self.stride, self.dtype)


class PersistentObject:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` yields here.

    Only records ``meta``: ``class_name``, ``state`` (the object's ``__dict__``), and the size of
    the embedded ``module_src``, which is never executed (and not kept).
    """

    def __init__(self, meta):
        if not isinstance(meta, Mapping):
            raise CheckpointFormatError(
                f"_reconstruct_persistent_obj expects a dict, got {type(meta).__name__}")
        self.type = meta.get("type")
        self.version = meta.get("version")
        self.class_name = meta.get("class_name")
        self.module_src_chars = len(meta.get("module_src") or "")
        self.meta_init_args = meta.get("init_args")
        self.meta_init_kwargs = meta.get("init_kwargs")
        self.state = meta.get("state") or {}

    def __repr__(self):
        return f"PersistentObject({self.class_name!r})"


class _ModuleContainer:
    """Stand-in for ``torch.nn.ModuleDict`` / ``ModuleList`` / ``Sequential`` (NEWOBJ + BUILD)."""

    def __init__(self, *args, **kwargs):
        self.state: dict = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0] or {}
        if not isinstance(state, Mapping):
            raise CheckpointFormatError(f"unexpected module state of type {type(state).__name__}")
        self.state = dict(state)


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` and ``argparse.Namespace`` (the ``args`` of DiT's
    ``train.py`` checkpoints): a dict of the object's attributes, filled by BUILD."""

    def __setstate__(self, state):
        if isinstance(state, Mapping):
            self.update(state)


# ---------------------------------------------------------------------------------------------
# tensor construction


def _view(storage: _Storage, offset, size, stride, dtype=None) -> np.ndarray:
    """Return the read-only view ``storage[offset + sum(i_k * stride_k)]`` of shape ``size``."""
    data = storage.data
    if data is None:
        raise CheckpointFormatError(f"{storage.where}: data never found in the file")
    try:
        offset = int(offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise CheckpointFormatError(
            f"{storage.where}: malformed tensor geometry offset={offset!r} size={size!r} "
            f"stride={stride!r}") from None
    if dtype is not None and dtype != data.dtype:
        # _rebuild_tensor_v3: an untyped (byte) storage reinterpreted as `dtype`.
        if data.nbytes % dtype.itemsize:
            raise CheckpointFormatError(
                f"{storage.where} is {data.nbytes} bytes, not a multiple of {dtype} "
                f"({dtype.itemsize} bytes)")
        data = data.view(dtype)
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise CheckpointFormatError(
            f"{storage.where}: invalid tensor geometry offset={offset} size={size} stride={stride}")
    if 0 in size:
        return np.zeros(size, data.dtype)
    needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if needed > data.size:
        raise CheckpointFormatError(
            f"{storage.where} holds {data.size} elements ({data.nbytes} bytes), but a tensor of "
            f"size {list(size)}, stride {list(stride)}, offset {offset} needs {needed} "
            f"({needed * data.itemsize} bytes)")
    item = data.itemsize
    return np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)


def _tensor(storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(
            f"tensor rebuild got a {type(storage).__name__} where a storage was expected")
    if storage.data is None:
        return _TensorRef(storage, offset, size, stride, dtype)
    return _view(storage, offset, size, stride, dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Stand-in for ``torch._utils._rebuild_tensor`` and ``_rebuild_tensor_v2``."""
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype,
                       *unused):
    """Stand-in for ``torch._utils._rebuild_tensor_v3`` (untyped storage plus a dtype)."""
    if not isinstance(dtype, _DType):
        raise CheckpointFormatError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _is_tensor(x) -> bool:
    return isinstance(x, (np.ndarray, _TensorRef))


def _rebuild_parameter(data, *unused):
    """Stand-in for ``torch._utils._rebuild_parameter`` (and ``..._with_state``)."""
    if not _is_tensor(data):
        raise CheckpointFormatError(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """Stand-in for ``torch._tensor._rebuild_from_type_v2``: plain tensors/parameters only."""
    if not isinstance(new_type, _TypeToken):
        raise UnsafeCheckpointError(f"tensor subclass {new_type!r} is not supported")
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise UnsafeCheckpointError(f"_rebuild_from_type_v2 with rebuild function {func!r}")
    return func(*args)


def _codecs_encode(text, encoding="utf-8", *unused):
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use for ``bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
    """Stand-in for ``numpy.core.multiarray.scalar``: plain dtypes from raw bytes only."""
    if isinstance(data, str):  # a Python 2 str, decoded as latin1 by the unpickler
        data = data.encode("latin1")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError(f"numpy scalar of dtype {dtype!r} (object dtypes refused)")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointFormatError(f"malformed numpy scalar of dtype {dtype}")
    return np.frombuffer(data, dtype, count=1)[0]


def _numpy_reconstruct(subtype, shape, dtype):
    """Stand-in for ``numpy.core.multiarray._reconstruct``: plain ndarrays only."""
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError(f"numpy array of subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_frombuffer(buffer, dtype, shape, order):
    """Stand-in for ``numpy._core.numeric._frombuffer`` (pickle protocol 5): plain dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError(f"numpy array of dtype {dtype!r} (object dtypes refused)")
    if not isinstance(buffer, (bytes, bytearray)) or order not in ("C", "F"):
        raise CheckpointFormatError(f"malformed numpy array buffer ({type(buffer).__name__}, order {order!r})")
    return np.frombuffer(buffer, dtype).reshape(shape, order=order)


def _device(*args):
    """Stand-in for ``torch.device``: the device string."""
    return ":".join(str(a) for a in args)


def _torch_size(*args):
    return tuple(*args)


# ---------------------------------------------------------------------------------------------
# the unpickler


def _allowed_globals() -> dict[str, Any]:
    """The allow-list: ``'module.name' -> stand-in``. Everything else is refused."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
        "_codecs.encode": _codecs_encode,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": _TypeToken("torch.Tensor"),
        "torch._tensor.Tensor": _TypeToken("torch.Tensor"),
        "torch.nn.parameter.Parameter": _TypeToken("torch.nn.Parameter"),
        "torch.Size": _torch_size,
        "torch.device": _device,
        "torch_utils.persistence._reconstruct_persistent_obj": PersistentObject,
        "torch.nn.modules.container.ModuleDict": _ModuleContainer,
        "torch.nn.modules.container.ModuleList": _ModuleContainer,
        "torch.nn.modules.container.Sequential": _ModuleContainer,
        "dnnlib.util.EasyDict": _EasyDict,
        "argparse.Namespace": _EasyDict,
        "numpy.dtype": np.dtype,
        "numpy.ndarray": np.ndarray,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray.scalar"] = _numpy_scalar
        allowed[f"{core}.multiarray._reconstruct"] = _numpy_reconstruct
        allowed[f"{core}.numeric._frombuffer"] = _numpy_frombuffer
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[f"torch.{name}"] = _StorageType(name, dtype)
        allowed[f"torch.cuda.{name}"] = _StorageType(name, dtype)
    allowed["torch.storage.UntypedStorage"] = allowed["torch.UntypedStorage"]
    for name, dtype in _TORCH_DTYPES.items():
        allowed[f"torch.{name}"] = _DType(name, dtype)
    return allowed


_ALLOWED = _allowed_globals()
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals, to stand-ins.

    ``persistent_load`` is a callable for the torch storage records (``('storage', ...)``);
    without one, any persistent id is an error. ``where`` names the stream in messages.
    """

    def __init__(self, file, *, where: str, persistent_load=None, depth: int = 0):
        super().__init__(file, encoding="latin1")  # latin1: py2-era str payloads stay bytes-exact
        self._where = where
        self._pload = persistent_load
        self._depth = depth

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        full = f"{module}.{name}"
        if full == "torch.storage._load_from_bytes":
            return self._load_from_bytes
        try:
            return _ALLOWED[full]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._where} references the global {full}, which is not on the allow-list of "
                f"objects needed to rebuild tensors; refusing to load it (unpickling it with "
                f"pickle or torch.load could execute code)") from None

    def persistent_load(self, pid):
        if self._pload is None:
            raise CheckpointFormatError(
                f"{self._where}: unexpected persistent id {str(pid)[:80]} in a plain pickle")
        return self._pload(pid)

    def _load_from_bytes(self, blob):
        """Stand-in for ``torch.storage._load_from_bytes``: read the nested blob safely."""
        if not isinstance(blob, (bytes, bytearray)):
            raise CheckpointFormatError(
                f"{self._where}: _load_from_bytes got a {type(blob).__name__}")
        if self._depth >= _MAX_NESTING:
            raise CheckpointFormatError(f"{self._where}: storage blobs nested too deeply")
        where = f"{self._where} (nested storage blob)"
        return _load_any(io.BytesIO(blob), where=where, depth=self._depth + 1, memory=blob)


def _safe_load(f, where: str, **kwargs):
    try:
        return SafeUnpickler(f, where=where, **kwargs).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (pickle.UnpicklingError, EOFError, IndexError, KeyError, TypeError, AttributeError,
            ValueError, struct.error, UnicodeDecodeError, MemoryError, zipfile.BadZipFile,
            zlib.error, OSError) as e:
        raise CheckpointFormatError(
            f"{where}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None


def _storage_record(pid, where):
    """Validate a ``('storage', storage_type, key, location, numel[, view])`` persistent id."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        kind = pid[0] if isinstance(pid, tuple) and pid else pid
        raise CheckpointFormatError(
            f"{where}: unsupported persistent record {str(kind)[:60]!r} (only tensor storages "
            f"are supported; whole pickled modules are not)")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType):
        raise CheckpointFormatError(f"{where}: unknown storage type {storage_type!r}")
    if not isinstance(numel, int) or numel < 0:
        raise CheckpointFormatError(f"{where}: invalid storage size {numel!r}")
    return storage_type, str(key), numel


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
        self.storages: dict[str, _Storage] = {}
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
            return _safe_load(f, where, persistent_load=self.persistent_load)

    def persistent_load(self, pid):
        storage_type, key, numel = _storage_record(pid, self.path)
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
        storage = _Storage(dtype, numel, f"storage {name}", data)
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
        self.storages: dict[str, _Storage] = {}
        self.views: list[tuple[_Storage, _Storage, int]] = []

    def _check_header(self):
        """Magic number, format version, and a sys-info dict (ignored: storage data is always
        written little-endian, whatever the host was)."""
        if self._load() != _LEGACY_MAGIC:
            raise CheckpointFormatError(f"{self.where}: bad legacy torch.save magic number")
        version = self._load()
        if version != _LEGACY_PROTOCOL:
            raise CheckpointFormatError(f"{self.where}: unsupported legacy version {version!r}")
        self._load()

    def _load(self, **kwargs):
        return _safe_load(self.f, self.where, depth=self.depth, **kwargs)

    def persistent_load(self, pid):
        storage_type, key, numel = _storage_record(pid, self.where)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _Storage(storage_type.dtype, numel, f"storage {key}")
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        try:  # an old-style storage view: (view_key, element offset, element count)
            _, offset, size = view
            offset, size = int(offset), int(size)
        except (TypeError, ValueError):
            raise CheckpointFormatError(f"{self.where}: malformed storage view {view!r}") from None
        sub = _Storage(storage_type.dtype, size, f"storage {key}[{offset}:{offset + size}]")
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

    def _array(self, start, storage: _Storage) -> np.ndarray:
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
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if not isinstance(obj, (dict, list, tuple, PersistentObject, _ModuleContainer)):
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
    elif isinstance(obj, (PersistentObject, _ModuleContainer)):
        obj.state = _resolve(obj.state, memo)
    return obj


# The legacy format opens with pickle(MAGIC): LONG1 with a 10-byte little-endian payload.
_LEGACY_HEAD = b"\x8a\n" + _LEGACY_MAGIC.to_bytes(10, "little")


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


def load_pickle(path):
    """A plain pickle of containers, strings, numbers and NumPy arrays (e.g. EDM2's reference
    statistics ``{metric: {'mu': ..., 'sigma': ...}}``), unpickled with :class:`SafeUnpickler`:
    nothing from the file is executed; anything else raises :class:`UnsafeCheckpointError`."""
    where = str(path)
    if file_kind(path) in ("zip", "legacy"):
        raise CheckpointFormatError(f"{where}: a torch.save file, not a plain pickle")
    with open(path, "rb") as f:
        return _safe_load(f, where)


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


def _module_tensors(obj, prefix: str, out: dict, where: str):
    """Collect ``state_dict()``-style dotted names from a module's ``__dict__``."""
    state = obj.state if isinstance(obj, (PersistentObject, _ModuleContainer)) else None
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
        data = _safe_load(f, where)
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

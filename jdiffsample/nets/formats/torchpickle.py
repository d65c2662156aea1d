"""PyTorch pickles unpickled without torch and without running code from them.

Unpickling can call any importable function. :class:`SafeUnpickler`'s ``find_class`` resolves only
an explicit allow-list of globals, each mapped to a small stand-in written here: tensor and
parameter rebuilders (a storage, offset, size and stride become a NumPy view), storage types, torch
dtypes, ``torch.Size``, ``torch.device``, containers, NumPy scalars and dtypes, and
``torch_utils.persistence._reconstruct_persistent_obj``, which only *records* its ``meta`` (the
embedded source is never executed). Anything else raises :class:`UnsafeCheckpointError`. The file
formats around these pickles are read by :mod:`jdiffsample.nets.formats.torchfile`.
"""


from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "CheckpointFormatError", "SafeUnpickler", "PersistentObject", "safe_load",
           "storage_record", "Storage", "TensorRef", "ModuleContainer", "LEGACY_MAGIC", "LEGACY_PROTOCOL"]


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

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
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


class Storage:
    """A storage: ``numel`` elements of ``dtype``; ``data`` is a 1-D array once available."""

    def __init__(self, dtype: np.dtype, numel: int, where: str, data: np.ndarray | None = None):
        self.dtype, self.numel, self.where, self.data = dtype, int(numel), where, data


class TensorRef:
    """A tensor whose storage bytes come later in the file (legacy format)."""

    def __init__(self, storage: Storage, offset, size, stride, dtype=None):
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


class ModuleContainer:
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


def _view(storage: Storage, offset, size, stride, dtype=None) -> np.ndarray:
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
    if not isinstance(storage, Storage):
        raise CheckpointFormatError(
            f"tensor rebuild got a {type(storage).__name__} where a storage was expected")
    if storage.data is None:
        return TensorRef(storage, offset, size, stride, dtype)
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
    return isinstance(x, (np.ndarray, TensorRef))


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
        "torch.nn.modules.container.ModuleDict": ModuleContainer,
        "torch.nn.modules.container.ModuleList": ModuleContainer,
        "torch.nn.modules.container.Sequential": ModuleContainer,
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
    without one, any persistent id is an error. ``load_nested(stream, where=, depth=, memory=)``
    reads the complete ``torch.save`` blob of a ``torch.storage._load_from_bytes`` call (the file
    formats' reader; without one such blobs are refused). ``where`` names the stream in messages.
    """

    def __init__(self, file, *, where: str, persistent_load=None, depth: int = 0, load_nested=None):
        super().__init__(file, encoding="latin1")  # latin1: py2-era str payloads stay bytes-exact
        self._where = where
        self._pload = persistent_load
        self._depth = depth
        self._load_nested = load_nested

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
        if self._depth >= _MAX_NESTING or self._load_nested is None:
            raise CheckpointFormatError(f"{self._where}: storage blobs nested too deeply")
        where = f"{self._where} (nested storage blob)"
        return self._load_nested(io.BytesIO(blob), where=where, depth=self._depth + 1, memory=blob)


def safe_load(f, where: str, **kwargs):
    try:
        return SafeUnpickler(f, where=where, **kwargs).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (pickle.UnpicklingError, EOFError, IndexError, KeyError, TypeError, AttributeError,
            ValueError, struct.error, UnicodeDecodeError, MemoryError, zipfile.BadZipFile,
            zlib.error, OSError) as e:
        raise CheckpointFormatError(
            f"{where}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None


def storage_record(pid, where):
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



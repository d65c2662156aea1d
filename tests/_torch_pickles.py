"""Test helpers: write PyTorch-style pickles byte for byte, without torch.

Real checkpoints name globals such as ``torch._utils._rebuild_tensor_v2``; these helpers emit the
same GLOBAL / REDUCE / NEWOBJ / BUILD / BINPERSID opcodes for marker objects, so tests can build
torch.save files (zip and legacy), nested storage blobs, NVlabs/edm persistence snapshots, and
malicious pickles naming any global (``os.system`` ...) without importing what they name.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Global:
    """Pickles as ``GLOBAL module\\nname``; calling it is never needed."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise AssertionError("marker globals are never called")


class Reduce:
    """Pickles as ``func(*args)`` followed, if ``state`` is given, by BUILD(state)."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, tuple(args), state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class NewObj:
    """Pickles as ``cls.__new__(cls, *args)`` (NEWOBJ) then BUILD(state), as protocol 2+ does
    for ordinary objects such as ``torch.nn.ModuleDict``."""

    def __init__(self, cls: Global, state, args=()):
        self.cls, self.state, self.args = cls, state, tuple(args)


class DictObject:
    """Pickles as ``cls.__new__(cls)`` (NEWOBJ) then SETITEMS of ``items``: a dict subclass such as
    ``dnnlib.util.EasyDict``, as protocol 2+ writes it."""

    def __init__(self, cls: Global, items: dict):
        self.cls, self.items = cls, dict(items)


class Storage:
    """A storage; pickled as a persistent id ``('storage', <Type>, key, location, numel)``."""

    def __init__(self, data: np.ndarray, key: str, type_name: str | None = None,
                 location: str = "cpu", numel: int | None = None):
        self.data = np.ascontiguousarray(data).reshape(-1)
        self.key = key
        self.type_name = type_name or _STORAGE_NAMES[self.data.dtype]
        self.location = location
        self.numel = self.data.size if numel is None else numel

    def pid(self, legacy: bool):
        base = ("storage", Global("torch", self.type_name), self.key, self.location, self.numel)
        return base + (None,) if legacy else base


class Writer(pickle._Pickler):
    """Pure-Python pickler that understands the markers above."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, protocol=2, legacy=False):
        super().__init__(file, protocol=protocol)
        self.legacy = legacy
        self.storages: list[Storage] = []

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            if all(s is not obj for s in self.storages):
                self.storages.append(obj)
            return obj.pid(self.legacy)
        return None

    def _save_global_marker(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    def _save_newobj(self, obj):
        self.save(obj.cls)
        self.save(obj.args)
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    def _save_dict_object(self, obj):
        self.save(obj.cls)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.write(pickle.MARK)
        for key, value in obj.items.items():
            self.save(key)
            self.save(value)
        self.write(pickle.SETITEMS)

    dispatch[Global] = _save_global_marker
    dispatch[NewObj] = _save_newobj
    dispatch[DictObject] = _save_dict_object


def dumps(obj, protocol=2) -> bytes:
    buf = io.BytesIO()
    Writer(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# tensors


def tensor(storage, offset=0, size=None, stride=None, *, v2=True):
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    if size is None:
        size = (storage.data.size,) if isinstance(storage, Storage) else ()
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    name = "_rebuild_tensor_v2" if v2 else "_rebuild_tensor"
    args = (storage, offset, tuple(size), tuple(stride))
    if v2:
        args += (False, OrderedDict())
    return Reduce(Global("torch._utils", name), args)


def parameter(t):
    return Reduce(Global("torch._utils", "_rebuild_parameter"), (t, False, OrderedDict()))


def array_tensor(a: np.ndarray, key: str):
    """A contiguous tensor with its own storage holding ``a``."""
    a = np.asarray(a)
    return tensor(Storage(a, key), 0, a.shape)


def legacy_blob(root, storages=None, counts=None) -> bytes:
    """A legacy (non-zip) torch.save stream of ``root``.

    ``counts`` optionally overrides the element counts written before each storage's data.
    """
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001,
                   dict(protocol_version=1001, little_endian=True,
                        type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(header, out, protocol=2)
    w = Writer(out, protocol=2, legacy=True)
    w.dump(root)
    storages = w.storages if storages is None else storages
    pickle.dump([s.key for s in storages], out, protocol=2)
    for i, s in enumerate(storages):
        n = s.data.size if counts is None else counts[i]
        out.write(struct.pack("<q", n))
        out.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def nested_storage(data: np.ndarray, key: str) -> Reduce:
    """A storage as plain ``pickle`` writes it: ``torch.storage._load_from_bytes(blob)``."""
    s = Storage(data, key)
    return Reduce(Global("torch.storage", "_load_from_bytes"), (legacy_blob(s),))


def nested_tensor(a: np.ndarray, key: str, *, as_parameter=True):
    """A tensor as plain ``pickle`` writes it (nested storage blob), e.g. inside EDM snapshots."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    t = tensor(nested_storage(a, key), 0, a.shape)
    return parameter(t) if as_parameter else t


def write_zip(path, root, *, prefix="archive", byteorder="little", data_pkl: bytes | None = None,
              storage_bytes: dict | None = None):
    """A zip-format torch.save file of ``root`` (storages referenced through persistent ids).

    ``storage_bytes`` optionally replaces the bytes written for a storage key (to make damaged
    files); ``data_pkl`` replaces the pickle.
    """
    buf = io.BytesIO()
    w = Writer(buf, protocol=2)
    w.dump(root)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", buf.getvalue() if data_pkl is None else data_pkl)
        z.writestr(f"{prefix}/byteorder", byteorder)
        for s in w.storages:
            order = "<" if byteorder == "little" else ">"
            raw = s.data.astype(s.data.dtype.newbyteorder(order)).tobytes()
            if storage_bytes and s.key in storage_bytes:
                raw = storage_bytes[s.key]
            if raw is not None:
                z.writestr(f"{prefix}/data/{s.key}", raw)
        z.writestr(f"{prefix}/version", "3\n")


# ---------------------------------------------------------------------------------------------
# NVlabs/edm persistence snapshots

EDM_MODULE_SRC = '''"""Stand-in for an embedded training/networks.py (never executed by a safe reader)."""
import torch
from torch_utils import persistence
'''

_BUFFER_NAMES = ("resample_filter", "freqs", "u")


def module_state(params=(), buffers=(), modules=(), **attrs) -> dict:
    """An ``nn.Module.__dict__`` as recent PyTorch versions have it."""
    hooks = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks",
             "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
             "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
             "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
    state = dict(training=False, _parameters=OrderedDict(params), _buffers=OrderedDict(buffers),
                 _non_persistent_buffers_set=set(), _is_full_backward_hook=None,
                 _modules=OrderedDict(modules))
    state.update({h: OrderedDict() for h in hooks})
    state.update(attrs)
    return state


def persistent(class_name: str, state: dict, module_src: str = EDM_MODULE_SRC) -> Reduce:
    """``torch_utils.persistence._reconstruct_persistent_obj(meta)`` as the EDM code writes it."""
    meta = dict(type="class", version=6, module_src=module_src, class_name=class_name,
                state=state)
    return Reduce(Global("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,))


def module_dict(children) -> NewObj:
    return NewObj(Global("torch.nn.modules.container", "ModuleDict"),
                  module_state(modules=children))


def edm_network(class_name: str, init_kwargs: dict, state_dict: dict, *,
                module_src: str = EDM_MODULE_SRC, init_args=(), extra_modules=None,
                tensor_fn=None):
    """A persistent EDM network holding ``state_dict`` under its dotted names.

    ``enc``/``dec`` become ModuleDicts, ``resample_filter``/``freqs``/``u`` buffers, everything
    else parameters; all other modules are persistent objects carrying ``module_src``.
    ``extra_modules`` adds children to the root (for malicious payloads).
    """
    tensor_fn = tensor_fn or (lambda a, key, is_param: nested_tensor(a, key,
                                                                      as_parameter=is_param))
    tree: dict = {}
    for i, (name, value) in enumerate(state_dict.items()):
        *mods, leaf = name.split(".")
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = (np.asarray(value), str(1000 + i))

    def parts(node, path):
        params, buffers, children = [], [], []
        for name, value in node.items():
            if isinstance(value, tuple):
                is_buffer = name in _BUFFER_NAMES
                t = tensor_fn(value[0], value[1], not is_buffer)
                (buffers if is_buffer else params).append((name, t))
            else:
                children.append((name, module(value, path + (name,))))
        return params, buffers, children

    def module(node, path):
        params, buffers, children = parts(node, path)
        if path[-1] in ("enc", "dec"):
            return module_dict(children)
        kind = init_kwargs.get("model_type", "SongUNet") if path == ("model",) else "UNetBlock"
        state = module_state(params, buffers, children, _init_args=(), _init_kwargs={})
        return persistent(kind, state, module_src)

    root_params, root_buffers, children = parts(tree, ())
    children += list((extra_modules or {}).items())
    state = module_state(root_params, root_buffers, children, _init_args=tuple(init_args),
                         _init_kwargs=dict(init_kwargs), sigma_data=np.float64(0.5),
                         use_fp16=False, img_resolution=init_kwargs.get("img_resolution"))
    return persistent(class_name, state, module_src)


def edm_snapshot(net, **extra) -> bytes:
    """The bytes of a ``network-snapshot-*.pkl``: ``pickle.dump(dict(ema=net, ...))``."""
    loss = persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5,
                                      _init_args=(), _init_kwargs={}))
    data = dict(ema=net, loss_fn=loss, augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                    path="datasets/x.zip", use_labels=True, xflip=False))
    data.update(extra)
    return dumps(data, protocol=4)


# ---------------------------------------------------------------------------------------------
# NVlabs/edm2 snapshots


def easydict(**items) -> DictObject:
    return DictObject(Global("dnnlib.util", "EasyDict"), items)


def edm2_snapshot(net, encoder, **extra) -> bytes:
    """The bytes of an EDM2 ``network-snapshot-*.pkl`` / released pickle:
    ``pickle.dump(dnnlib.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=net))``."""
    loss = persistent("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5,
                                       _init_args=(), _init_kwargs=dict(P_mean=-0.4, P_std=1.0)))
    dataset = easydict(class_name="training.dataset.ImageFolderDataset", path="datasets/x.zip",
                       use_labels=True)
    return dumps(easydict(encoder=encoder, dataset_kwargs=dataset, loss_fn=loss, ema=net,
                          **extra), protocol=4)

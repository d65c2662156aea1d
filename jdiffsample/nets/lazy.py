"""Arrays read from disk only when they are needed: the leaves of a streaming conversion.

A :class:`LazyArray` knows a stored tensor's shape and dtype and how to read it (a slice of a
safetensors file, :mod:`jdiffsample.nets.diffusers_folder`); transposes, casts and basic slices of
it are recorded, not computed. ``np.asarray(lazy)`` reads the tensor and applies them, giving a
fresh contiguous array that no one else holds. A converter can so match a whole state dict to a
network's parameters (:func:`jdiffsample.nets.statedict.match` keeps lazy arrays lazy) and hand the
variables to :func:`jdiffsample.nets.checkpoint.save`, which writes the leaves a few at a time
(:data:`jdiffsample.nets.checkpoint.SAVE_CONCURRENT_GB` in flight): the peak memory of a
conversion is then a few tensors, not the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["LazyArray", "is_lazy", "has_lazy"]


class LazyArray:
    """A tensor read by ``read()`` (a NumPy array of ``shape`` and ``dtype``) when converted to an
    array, then transformed by the recorded operations (``transpose``/``.T``, ``astype``, basic
    indexing). Immutable; every operation returns a new :class:`LazyArray`."""

    __slots__ = ("_read", "shape", "dtype", "_ops", "source")

    def __init__(self, read: Callable[[], np.ndarray], shape, dtype, *, source: str = "",
                 ops: tuple = ()):
        self._read = read
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._ops = ops
        self.source = source

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def _with(self, op, shape, dtype) -> LazyArray:
        return LazyArray(self._read, shape, dtype, source=self.source, ops=self._ops + (op,))

    def transpose(self, *axes) -> LazyArray:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        axes = tuple(axes) or tuple(reversed(range(self.ndim)))
        return self._with(("transpose", axes), tuple(self.shape[a] for a in axes), self.dtype)

    @property
    def T(self) -> LazyArray:  # noqa: N802 (NumPy's name)
        return self.transpose()

    def astype(self, dtype, copy: bool = True) -> LazyArray:
        del copy
        return self._with(("astype", np.dtype(dtype)), self.shape, dtype)

    def __getitem__(self, index) -> LazyArray:
        parts = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(p, (slice, int)) or p is Ellipsis for p in parts):
            raise ValueError(f"a LazyArray takes basic indices only (slices, integers), got {index!r}")
        shape = np.broadcast_to(np.empty((), np.int8), self.shape)[index].shape  # checked, for free
        return self._with(("index", index), shape, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._read()
        for op, arg in self._ops:
            if op == "transpose":
                array = array.transpose(arg)
            elif op == "astype":
                array = array.astype(arg)
            else:
                array = array[arg]
        array = np.ascontiguousarray(array)
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype.name}, source={self.source!r})"


def is_lazy(value: Any) -> bool:
    return isinstance(value, LazyArray)


def has_lazy(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a :class:`LazyArray`."""
    return any(isinstance(leaf, LazyArray) for leaf in jax.tree.leaves(tree))

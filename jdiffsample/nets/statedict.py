"""PyTorch state dicts -> Flax variables: one strict matcher for every network family.

A family describes how its Flax parameter paths and layouts correspond to PyTorch's with a
:class:`Layout` (the default covers ``nn.Conv2d``, ``nn.Linear``, norms and embeddings); :func:`match`
then checks a state dict against the shapes the Flax module expects and converts it::

    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)
    variables = statedict.match(abstract, state_dict, what="DiT-XL/2")

Every problem is reported at once, in one line: missing keys, unexpected keys, shape mismatches
and buffers whose values differ from the constants the port recomputes. Parameters come back as
float32 NumPy arrays (or in their own dtype; lazy arrays, :mod:`jdiffsample.nets.lazy`, stay lazy,
their layout change and cast recorded); every other collection of the module (the Skip-Tuning scales ``"skip"``)
is filled with ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jdiffsample.nets.lazy import LazyArray

__all__ = ["Layout", "DEFAULT", "torch_key", "torch_shape", "to_flax", "match", "listing"]

Path = tuple


def torch_key(path: Path) -> str:
    """The PyTorch name of a flattened Flax parameter path (``kernel``/``scale``/``embedding`` ->
    ``weight``; the other leaf names are the same on both sides)."""
    *modules, leaf = path
    return ".".join((*modules, {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)))


def to_flax(path: Path, value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def torch_shape(path: Path, shape: tuple) -> tuple:
    """The PyTorch shape of the tensor that :func:`to_flax` turns into a parameter of ``shape``."""
    shape = tuple(shape)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a family's Flax parameters correspond to PyTorch tensors.

    ``key(path)``: the state-dict name of the Flax path; ``shape(path, flax_shape)``: the PyTorch
    shape that converts to it; ``convert(path, array)``: PyTorch array -> Flax array.
    """

    key: Callable[[Path], str] = torch_key
    shape: Callable[[Path, tuple], tuple] = torch_shape
    convert: Callable[[Path, np.ndarray], np.ndarray] = to_flax


DEFAULT = Layout()


def listing(keys, limit: int = 5) -> str:
    """``"N: a, b, c, ..."`` for an error message."""
    keys = list(keys)
    return f"{len(keys)}: " + ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def _array(value):
    """A NumPy array of ``value``; a :class:`jdiffsample.nets.lazy.LazyArray` stays lazy (converting it
    reads the tensor)."""
    return value if isinstance(value, LazyArray) else np.asarray(value)


def _flatten(tree: Mapping, prefix: Path = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: Mapping) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def match(abstract: Mapping[str, Any], state_dict: Mapping[str, Any], *, layout: Layout = DEFAULT,
          buffers: Mapping[str, tuple] | None = None, ignore: Callable[[str], bool] | None = None,
          what: str = "the network", dtype=np.float32) -> dict:
    """Flax variables from ``state_dict`` (name -> array), checked against ``abstract``.

    Args:
      abstract: ``jax.eval_shape(module.init, ...)`` of the Flax module: its ``"params"`` give the
        expected tensors; every other collection is returned filled with float32 ones.
      state_dict: the original names and arrays (NumPy, or anything ``np.asarray`` takes).
      layout: name and layout correspondence (:class:`Layout`).
      buffers: tensors of the original that the port recomputes, ``{name: (value, rtol)}``: they
        must be present with that value (within ``rtol``) and are dropped.
      ignore: names that are neither parameters nor checked buffers and may be present or not
        (e.g. ``num_batches_tracked``).
      what: the network, for the error message.
      dtype: the parameters' dtype; None keeps each tensor's own floating dtype (a float16 release
        then costs no float32 copy, and a network that computes in float32 casts exactly).

    Raises ``ValueError`` naming every missing key, unexpected key, shape mismatch and differing
    buffer, in one line.
    """
    params = _flatten(abstract["params"])
    expected = {layout.key(path): (path, tuple(layout.shape(path, leaf.shape))) for path, leaf in params.items()}
    buffers = dict(buffers or {})
    shapes = {key: shape for key, (_, shape) in expected.items()}
    shapes.update({key: tuple(np.shape(value)) for key, (value, _) in buffers.items()})
    present = {k for k in state_dict if not (ignore and ignore(k))}
    arrays = {k: _array(state_dict[k]) for k in shapes if k in present}

    missing = sorted(k for k in shapes if k not in present)
    unexpected = sorted(k for k in state_dict if k in present and k not in shapes)
    wrong_shape = [f"{k} {tuple(a.shape)} != {shapes[k]}" for k, a in arrays.items() if tuple(a.shape) != shapes[k]]
    wrong_value = [k for k, (value, rtol) in buffers.items() if k in arrays and arrays[k].shape == np.shape(value)
                   and not np.allclose(arrays[k], value, rtol=rtol, atol=0)]
    problems = [f"{title} ({listing(keys)})" for title, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape),
        ("buffers differing from their constants", wrong_value)) if keys]
    if problems:
        raise ValueError(f"state_dict does not fit {what}: " + "; ".join(problems))

    def cast(a):
        return a if dtype is None and jnp.issubdtype(a.dtype, jnp.floating) else a.astype(dtype or np.float32)

    flat = {path: layout.convert(path, cast(arrays[key])) for key, (path, _) in expected.items()}
    variables = {"params": _unflatten(flat)}
    for name, tree in abstract.items():
        if name != "params":
            variables[name] = _unflatten({p: np.ones(s.shape, np.float32) for p, s in _flatten(tree).items()})
    return variables

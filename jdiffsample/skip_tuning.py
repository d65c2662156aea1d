"""Skip-Tuning (Ma et al., ICML 2024): scale a UNet's long skip connections at sampling time.

The networks in :mod:`jdiffsample.nets` multiply each long skip tensor, where the decoder
concatenates it, by a scalar held in the ``"skip"`` variable collection (all 1.0 after
conversion, which leaves outputs bit-identical). Their names sort in the order the decoder
consumes the skips: the first is the deepest skip (nearest the bottleneck), the last the
outermost one (nearest the input/output layer).

With k + 1 skips, Skip-Tuning sets skip i (i = 0 deepest ... i = k outermost) to::

    rho_i = rho_bottom + i * (rho_top - rho_bottom) / k

The paper keeps ``rho_top = 1`` and tunes ``rho_bottom`` (typically slightly below 1 for
few-step ODE samplers)::

    tuned = skip_tuning.apply(variables, rho_bottom=0.8)
    module.apply(tuned, x, ...)

:func:`apply` is pure and traceable: ``rho_top``/``rho_bottom`` may be JAX arrays, so a sweep
over ``rho_bottom`` can run inside one ``jax.jit`` without recompiling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["scales", "rhos", "apply"]

_COLLECTION = "skip"


def _flatten(tree: Mapping, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """``[(path, leaf)]`` of a nested mapping, paths as tuples of keys."""
    out = []
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, Mapping):
            out.extend(_flatten(value, path))
        else:
            out.append((path, value))
    return out


def _skip_leaves(variables) -> list[tuple[tuple, Any]]:
    """The ``"skip"`` leaves in consumption order (sorted paths), validated."""
    if not isinstance(variables, Mapping):
        raise ValueError(
            f"variables must be a mapping of collections (e.g. {{'params': ..., 'skip': ...}}), "
            f"got {type(variables).__name__}")
    if _COLLECTION not in variables:
        raise ValueError(
            f"variables have no {_COLLECTION!r} collection (found {sorted(variables)}); only "
            f"networks from jdiffsample.nets carry Skip-Tuning scales")
    skip = variables[_COLLECTION]
    if not isinstance(skip, Mapping):
        raise ValueError(f"variables[{_COLLECTION!r}] must be a mapping, got {type(skip).__name__}")
    leaves = sorted(_flatten(skip), key=lambda item: tuple(map(str, item[0])))
    if not leaves:
        raise ValueError(f"variables[{_COLLECTION!r}] is empty: the network has no skip scales")
    for path, leaf in leaves:
        if np.shape(leaf) != ():
            raise ValueError(
                f"skip scale {'/'.join(map(str, path))} has shape {np.shape(leaf)}, expected a "
                f"scalar")
    return leaves


def scales(variables) -> list[tuple[str, float]]:
    """The network's skip scales as ``[(name, value)]`` in decoder consumption order.

    The first entry is the deepest skip (``rho_bottom`` in :func:`apply`), the last the
    outermost (``rho_top``). Nested names are joined with ``/``.
    """
    return [("/".join(map(str, path)), float(leaf)) for path, leaf in _skip_leaves(variables)]


def _check_rho(name: str, value) -> None:
    if isinstance(value, jax.core.Tracer):
        return  # traced: checked by the caller's concrete values, if any
    if isinstance(value, (bool, str, bytes)) or np.ndim(value) != 0:
        raise ValueError(f"{name} must be a real scalar, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real scalar, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")


def rhos(num_skips: int, rho_top=1.0, rho_bottom=1.0):
    """``rho_i = rho_bottom + i (rho_top - rho_bottom) / k`` for ``i = 0 .. k = num_skips - 1``.

    Index 0 is the deepest skip. With a single skip the value is ``rho_bottom``.
    """
    if not isinstance(num_skips, (int, np.integer)) or isinstance(num_skips, bool) or num_skips < 1:
        raise ValueError(f"num_skips must be a positive integer, got {num_skips!r}")
    _check_rho("rho_top", rho_top)
    _check_rho("rho_bottom", rho_bottom)
    k = num_skips - 1
    frac = np.arange(num_skips, dtype=np.float64) / max(k, 1)
    return [rho_bottom + f * (rho_top - rho_bottom) for f in frac]


def apply(variables, rho_top=1.0, rho_bottom=1.0):
    """Return new variables whose skip scales follow the Skip-Tuning schedule.

    The scales are *set* (not multiplied): applying to already-tuned variables gives the same
    result as applying to the originals. Other collections are shared with the input, which is
    not modified. Each scale keeps its dtype.

    Args:
      variables: Flax variables with a ``"skip"`` collection (flat, or nested under submodules).
      rho_top: scale of the outermost skip (nearest the input/output layer); the paper uses 1.
      rho_bottom: scale of the deepest skip.

    Raises:
      ValueError: no (or an empty) ``"skip"`` collection, or a non-finite/non-scalar rho.
    """
    leaves = _skip_leaves(variables)
    values = rhos(len(leaves), rho_top, rho_bottom)
    new_skip: dict = {}
    for (path, leaf), rho in zip(leaves, values):
        node = new_skip
        for key in path[:-1]:
            node = node.setdefault(key, {})
        dtype = getattr(leaf, "dtype", np.float32)
        traced = isinstance(rho, jax.core.Tracer)
        node[path[-1]] = jnp.asarray(rho, dtype) if traced else np.asarray(rho, dtype)
    out = dict(variables)
    out[_COLLECTION] = new_skip
    return out

"""How a network's weights are split over the ``model`` axis of a device mesh.

The generic rule works for every family: each array is split along one dimension whose size ``n``
divides (the largest such dimension; the last of equal ones, so that a dense kernel ``[in, out]``
or a convolution kernel ``[kh, kw, in, out]`` of equal widths is split by output columns), and
replicated where none does. XLA's SPMD partitioner inserts the gathers and reductions the
computation then needs, so the network code stays unchanged. A family may state better rules
(:attr:`jdiffsample.nets.family.Sampling.sharding`): a function ``(path, shape, n) -> axis | None``
tried first, e.g. attention heads and MLP columns (:func:`columns_then_rows`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Callable

import numpy as np
from jax.sharding import PartitionSpec as P

__all__ = ["MODEL_AXIS", "generic_axis", "spec", "specs", "columns_then_rows", "path_names", "HEADS_AND_MLP"]

MODEL_AXIS = "model"


def generic_axis(shape, n: int) -> int | None:
    """The dimension the generic rule splits ``shape`` along over ``n`` devices (None: replicate)."""
    if n <= 1:
        return None
    candidates = [(size, axis) for axis, size in enumerate(shape) if size >= n and size % n == 0]
    return max(candidates)[1] if candidates else None


def spec(path: str, shape, n: int, rule: Callable | None = None) -> P:
    """The ``PartitionSpec`` of one array: the family's ``rule`` if it names an axis that ``n``
    divides, else the generic rule."""
    axis = None
    if rule is not None and n > 1:
        axis = rule(path, tuple(shape), n)
        if axis is not None and (not -len(shape) <= axis < len(shape) or shape[axis] % n):
            axis = None
    if axis is None:
        axis = generic_axis(shape, n)
    if axis is None:
        return P()
    parts = [None] * len(shape)
    parts[axis % len(shape)] = MODEL_AXIS
    return P(*parts)


def path_names(path) -> str:
    """A pytree key path as ``"params/unet/conv_in/kernel"``."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def specs(variables, n: int, rule: Callable | None = None):
    """The ``PartitionSpec`` of every array of ``variables`` (nested dicts), same structure."""
    def walk(prefix, node):
        if isinstance(node, Mapping):
            return {k: walk(f"{prefix}/{k}" if prefix else str(k), v) for k, v in node.items()}
        return spec(prefix, np.shape(node), n, rule)

    return walk("", variables)


def columns_then_rows(columns: str, rows: str) -> Callable:
    """A Megatron-style rule: kernels whose path matches the regular expression ``columns`` (query,
    key, value, MLP input projections) are split along their output features (the heads, the MLP
    hidden units), those matching ``rows`` (attention output, MLP output) along their input
    features, so that each device computes whole heads and whole hidden units."""
    col, row = re.compile(columns), re.compile(rows)

    def rule(path: str, shape: tuple, n: int):
        if len(shape) < 2:
            return -1 if col.search(path) and path.endswith("bias") else None
        if col.search(path):
            return len(shape) - 1
        if row.search(path):
            return len(shape) - 2
        return None

    return rule


#: the transformer families' rule (FLUX.1, SD3, T5): query/key/value and MLP input projections split by
#: output features, attention outputs and MLP outputs by input features (parameters named ``q``,
#: ``k``, ``v``, ``out`` under an ``attn``, ``in``, ``gate``, ``out`` under an ``mlp``)
HEADS_AND_MLP = columns_then_rows(r"attn2?/(context_)?(q|k|v)/(kernel|bias)$|mlp/(in|gate)/(kernel|bias)$",
                                  r"attn2?/(context_)?out/kernel$|mlp/out/kernel$")

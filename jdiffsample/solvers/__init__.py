"""Solvers: pure functions ``solver(denoise, x, ts, schedule, *, key=None, **options) -> x_final``.

Each runs the whole trajectory as one ``lax.scan`` and is registered once in
:mod:`jdiffsample.solvers.registry` with its options, model calls per step, order and whether it
needs a key; ``registry.get(name)`` tells, and every other part of the package asks it.

``sample`` dispatches by name and compiles once per (solver, options, N, shapes). The denoiser is
an argument of the compiled program, not a constant in it: a pytree denoiser (a loaded network
with its variables, labels and guidance scale as leaves, or ``jax.tree_util.Partial(fn, *arrays)``)
runs with other weights, labels or guidance without recompiling. A plain function is a static part
of the program (a new closure compiles anew).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import xla_options
from jdiffsample.solvers import core, registry
# The modules that define and register the solvers (a new solver: one module, and its name here).
from jdiffsample.solvers import amed, ddim, deis, dpmpp, epd, heun, ipndm, pas, sa_solver, unipc  # noqa: F401
from jdiffsample.solvers.registry import Option, get, register

__all__ = ["sample", "register", "get", "names", "partition", "combine", "Option", "SOLVERS"]


class _Solvers(Mapping):
    """``SOLVERS[name]``: the registered solver functions (a live, read-only view of the registry)."""

    def __getitem__(self, name):
        return registry.get(name).fn

    def __iter__(self):
        return iter(registry.names())

    def __len__(self):
        return len(registry.names())


SOLVERS = _Solvers()


def names() -> list[str]:
    """Names of the registered solvers."""
    return registry.names()


# --------------------------------------------------------------------------------------------
# Denoisers as program arguments


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, complex)) and not isinstance(leaf, bool)


class _Static:
    """A non-array leaf (a function, a string) as part of the compiled program's identity."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        try:
            return hash(self.value)
        except TypeError:
            return id(self.value)

    def __eq__(self, other):
        if not isinstance(other, _Static):
            return False
        try:
            return bool(self.value == other.value)
        except Exception:  # noqa: BLE001 (arrays and other values without a plain ==)
            return self.value is other.value


def partition(tree):
    """Split a pytree into its array leaves (traced) and the rest (static, hashable)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = [leaf if _is_array(leaf) else None for leaf in leaves]
    static = (treedef, tuple(None if _is_array(leaf) else _Static(leaf) for leaf in leaves))
    return arrays, static


def combine(arrays, static):
    """Inverse of :func:`partition`."""
    treedef, others = static
    leaves = [a if s is None else s.value for a, s in zip(arrays, others)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


def _run(arrays, x, ts, key, params, *, solver, static, schedule, options, return_trajectory):
    denoise = combine(arrays, static)
    learned = {} if params is None else dict(params=params)
    out = registry.get(solver).fn(denoise, x, ts, schedule, key=key, return_trajectory=return_trajectory,
                                  **learned, **dict(options))
    # A grid that is not strictly decreasing cannot be refused when it is traced (inside a caller's
    # jit): the result is NaN instead of a silently wrong sample.
    return jnp.where(jnp.all(jnp.diff(ts) < 0), out, jnp.nan)


@functools.lru_cache(maxsize=None)
def _jitted(xla: tuple):
    return jax.jit(_run, static_argnames=("solver", "static", "schedule", "options", "return_trajectory"),
                   compiler_options=dict(xla))


def _program():
    """The jitted sampling program, compiled with :func:`jdiffsample.xla_options.compile_options`."""
    return _jitted(tuple(xla_options.compile_options().items()))


def _traced(*trees) -> bool:
    """Whether any array of ``trees`` is a tracer: ``sample`` is then called inside a caller's
    ``jit``, whose compiled program takes no compile options of ours."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def sample(denoise, x, ts, schedule, solver: str = "unipc", key=None, return_trajectory: bool = False,
           params=None, **options):
    """Sample with the named solver, jitted (one compile per solver, options, N and shapes).

    ``denoise``: a function ``(x, t) -> x0_hat`` or a callable pytree (its array leaves are traced
    arguments, so other weights, labels or guidance reuse the compiled program). ``params``: a
    learnable solver's learned parameters (one pytree, traced too; None: its untrained ones).
    Returns the final state, or with ``return_trajectory=True`` all N+1 states (for multistep
    solvers the corrected state at each grid time).
    """
    info = registry.get(solver)
    options = info.resolve(options)
    core.validate(x, ts, schedule, key=key, needs_key=info.needs_key(options), min_steps=info.min_steps(options),
                  noise_start=info.noise_start)
    if params is not None:
        if not info.learnable:
            raise ValueError(f"solver {solver} has no learned parameters; only learnable solvers take params")
        info.learned.check(params, len(ts) - 1, options)
    frozen = tuple(sorted((k, _freeze(v)) for k, v in options.items()))
    arrays, static = partition(denoise)
    program = _jitted(()) if _traced(arrays, x, ts, key, params) else _program()
    return program(arrays, x, ts, key, params, solver=solver, static=static, schedule=schedule, options=frozen,
                   return_trajectory=return_trajectory)

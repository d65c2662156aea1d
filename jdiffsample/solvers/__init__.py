"""Solvers: pure functions ``solver(denoise, x, ts, schedule, *, key=None, **options) -> x_final``.

Each runs the whole trajectory as one ``lax.scan``. NFE for a grid of N steps:

==============  ==========================================================
``ddim``        N
``euler``       N
``heun``        2N (2N - 1 when a VE grid ends at sigma = 0)
``dpmpp``       N
``unipc``       N
``sa_solver``   N
==============  ==========================================================

``sample`` dispatches by name and compiles once per (solver, options, N, shapes).
"""

from __future__ import annotations

import functools
import inspect

import jax
import numpy as np

from jdiffsample.solvers import core
from jdiffsample.solvers.ddim import ddim
from jdiffsample.solvers.dpmpp import dpmpp
from jdiffsample.solvers.heun import euler, heun
from jdiffsample.solvers.sa_solver import sa_solver
from jdiffsample.solvers.unipc import unipc

SOLVERS = {
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp": dpmpp,
    "unipc": unipc,
    "sa_solver": sa_solver,
}

__all__ = ["SOLVERS", "sample", "nfe", *SOLVERS]


def nfe(solver: str, n_steps: int, final_zero: bool = False) -> int:
    """Model calls of ``solver`` on a grid of ``n_steps`` steps."""
    _solver_fn(solver)
    if solver == "heun":
        return 2 * n_steps - (1 if final_zero else 0)
    return n_steps


def _solver_fn(name: str):
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


_POSITIONAL = ("denoise", "x", "ts", "schedule", "key", "return_trajectory")


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


@functools.partial(jax.jit, static_argnames=("solver", "denoise", "schedule", "options", "return_trajectory"))
def _run(x, ts, key, *, solver, denoise, schedule, options, return_trajectory):
    return SOLVERS[solver](denoise, x, ts, schedule, key=key, return_trajectory=return_trajectory, **dict(options))


def sample(denoise, x, ts, schedule, solver: str = "unipc", key=None, return_trajectory: bool = False, **options):
    """Sample with the named solver, jitted (one compile per solver, options, N and shapes).

    Returns the final state, or with ``return_trajectory=True`` all N+1 states (for multistep
    solvers the corrected state at each grid time).
    """
    fn = _solver_fn(solver)
    core.validate(x, ts, schedule, key=key)
    frozen = tuple(sorted((k, _freeze(v)) for k, v in options.items()))
    try:
        hash(frozen)
    except TypeError as err:
        raise ValueError(f"solver options must be hashable values: {err}") from None
    allowed = [p for p in inspect.signature(fn).parameters if p not in _POSITIONAL]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {solver!r}; allowed: {allowed}")
    return _run(
        x, ts, key, solver=solver, denoise=denoise, schedule=schedule, options=frozen,
        return_trajectory=return_trajectory,
    )

"""Time grids: 1-D arrays of N+1 strictly decreasing times, from ``t_start`` (noise) to ``t_end``.

All grids are computed in float64 NumPy and returned as such; solvers cast them to the state's
dtype. ``t_start``/``t_end`` default to the schedule's ``t_max``/``t_min``.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from jdiffsample.schedules import Schedule, float64

__all__ = ["logsnr", "uniform_t", "quadratic_t", "karras", "get", "GRIDS"]


def _endpoints(schedule: Schedule, t_start, t_end):
    t_start = schedule.t_max if t_start is None else float(t_start)
    t_end = schedule.t_min if t_end is None else float(t_end)
    if not t_start > t_end:
        raise ValueError(f"t_start ({t_start}) must be larger than t_end ({t_end})")
    schedule.check_times([t_start, t_end])
    return t_start, t_end


def _check_n(n_steps) -> int:
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    return int(n_steps)


def _host():
    """Grids are host constants: evaluate eagerly in float64, even when called inside a trace."""
    stack = contextlib.ExitStack()
    stack.enter_context(float64())
    stack.enter_context(jax.ensure_compile_time_eval())
    return stack


def _lam(schedule, t):
    with _host():
        return float(schedule.lam(np.float64(t)))


def _t(schedule, lam):
    with _host():
        return np.asarray(schedule.t_from_lam(np.asarray(lam, dtype=np.float64)), dtype=np.float64)


def _pin_ends(ts, t_start, t_end):
    ts = np.array(ts, dtype=np.float64)
    ts[0], ts[-1] = t_start, t_end
    return ts


def logsnr(schedule: Schedule, n_steps: int, t_start=None, t_end=None) -> np.ndarray:
    """Uniform in half-log-SNR lambda (DPM-Solver's and UniPC's 'logSNR' grid)."""
    n = _check_n(n_steps)
    t_start, t_end = _endpoints(schedule, t_start, t_end)
    lams = np.linspace(_lam(schedule, t_start), _lam(schedule, t_end), n + 1)
    return _pin_ends(_t(schedule, lams), t_start, t_end)


def uniform_t(schedule: Schedule, n_steps: int, t_start=None, t_end=None) -> np.ndarray:
    """Uniform in t."""
    n = _check_n(n_steps)
    t_start, t_end = _endpoints(schedule, t_start, t_end)
    return np.linspace(t_start, t_end, n + 1)


def quadratic_t(schedule: Schedule, n_steps: int, t_start=None, t_end=None) -> np.ndarray:
    """Uniform in sqrt(t) (DPM-Solver's 'time_quadratic'): denser near the data."""
    n = _check_n(n_steps)
    t_start, t_end = _endpoints(schedule, t_start, t_end)
    return _pin_ends(np.linspace(np.sqrt(t_start), np.sqrt(t_end), n + 1) ** 2, t_start, t_end)


def karras(
    schedule: Schedule, n_steps: int, t_start=None, t_end=None, rho: float = 7.0, final_zero: bool = False
) -> np.ndarray:
    """EDM / Karras et al. grid: uniform in sigma_edm^(1/rho), sigma_edm = sigma / alpha.

    With ``final_zero=True`` (VE only) the ``n_steps`` points run from ``t_start`` to ``t_end`` and a
    final 0 is appended, exactly as EDM's sampler does; otherwise N+1 points span the range.
    """
    n = _check_n(n_steps)
    t_start, t_end = _endpoints(schedule, t_start, t_end)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if final_zero and not schedule.is_ve:
        raise ValueError("final_zero=True needs a VE schedule: only there can a grid end at sigma = 0")
    points = n if final_zero else n + 1
    if points == 1:
        s = np.array([np.exp(-_lam(schedule, t_start))])
    else:
        s_max, s_min = np.exp(-_lam(schedule, t_start)), np.exp(-_lam(schedule, t_end))
        ramp = np.linspace(0.0, 1.0, points)
        s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    ts = _t(schedule, -np.log(s))
    ts = _pin_ends(ts, t_start, t_end) if points > 1 else np.array([t_start])
    return np.append(ts, 0.0) if final_zero else ts


GRIDS = {"logsnr": logsnr, "uniform": uniform_t, "quadratic": quadratic_t, "karras": karras}


def get(name: str, schedule: Schedule, n_steps: int, **kwargs) -> np.ndarray:
    """A grid by name: 'logsnr', 'uniform', 'quadratic' or 'karras'."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {sorted(GRIDS)}")
    return GRIDS[name](schedule, n_steps, **kwargs)

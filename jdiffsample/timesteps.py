"""Time grids: 1-D arrays of N+1 strictly decreasing times, from ``t_start`` (noise) to ``t_end``.

All grids are computed in float64 NumPy and returned as such; solvers cast them to the state's
dtype. ``t_start``/``t_end`` default to the schedule's ``t_max``/``t_min``. ``ays`` returns the
published Align Your Steps grids (fixed noise ranges); grids searched with a model (GITS) or a bound
are in :mod:`jdiffsample.optimize`. ``flow_match`` gives the times of diffusers' flow-matching
scheduler (``FlowMatchEulerDiscreteScheduler``: SD3, Flux) from its config.

A flow grid may start at t = 1 (alpha = 0, lambda = -inf): uniform in t, quadratic and ``flow_match``
grids can; grids spaced in lambda or sigma / alpha (logsnr, karras) cannot, and say so.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import jax
import numpy as np

from jdiffsample.schedules import Schedule, float64

__all__ = ["logsnr", "uniform_t", "quadratic_t", "karras", "ays", "AYS_SIGMAS", "flow_match", "flow_match_sigmas",
           "get", "GRIDS"]


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
        lam = float(schedule.lam(np.float64(t)))
    if not math.isfinite(lam):
        raise ValueError(f"a grid spaced in lambda or sigma / alpha cannot reach t = {t} on {schedule!r}, where "
                         "lambda is infinite: use uniform_t, quadratic_t or flow_match, or end the range inside")
    return lam


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

    With ``final_zero=True`` (schedules with ``zero_end``, e.g. VE, flows) the ``n_steps`` points run from
    ``t_start`` to ``t_end`` and a final 0 is appended, exactly as EDM's sampler does; otherwise N+1
    points span the range.
    """
    n = _check_n(n_steps)
    t_start, t_end = _endpoints(schedule, t_start, t_end)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if final_zero and not schedule.zero_end:
        raise ValueError(f"final_zero=True needs a schedule whose grids may end at sigma = 0 (zero_end: VE, "
                         f"flows); {schedule!r} has none")
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


# Align Your Steps (Sabour, Fidler & Kreis, ICML 2024): the published 10-step schedules as EDM noise
# levels sigma / alpha, from NVIDIA's quickstart guide
# (https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html, as reproduced in ComfyUI's
# AlignYourStepsScheduler). Stable Diffusion 1.5 and SDXL publish training-step indices,
# [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0] and [999, 845, 730, 587, 443, 310, 193, 116, 53,
# 13, 0]; these sigmas are exactly Stable Diffusion's (scaled-linear betas 0.00085 to 0.012, 1000
# steps) at those indices. Stable Video Diffusion's are continuous EDM sigmas.
AYS_SIGMAS = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "svd": (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
_AYS_RTOL = 1e-3


def ays(schedule: Schedule, n_steps: int, *, model: str) -> np.ndarray:
    """Align Your Steps: the published schedule of ``model`` ('sd15', 'sdxl', 'svd'; see ``AYS_SIGMAS``).

    At its native 10 steps the grid is the published one; for more steps the noise levels are
    interpolated linearly in log sigma over a uniform index, as the authors recommend
    (``loglinear_interp`` in their guide), which keeps the grid strictly decreasing. Fewer than 10
    steps would drop optimized levels: ``ValueError``, as for a schedule whose noise range is not the
    model's (the grid's first and last sigma / alpha must be the schedule's at ``t_max`` and ``t_min``
    to 1e-3: e.g. ``VPDiscrete`` with Stable Diffusion's betas, ``VE(0.002, 700)`` for SVD). The
    times are ``t_from_lam(-log sigma)`` with the ends pinned to ``t_max``/``t_min``. The grid ends at
    sigma_min, as in NVIDIA's own example (ComfyUI and diffusers' ``AysSchedules`` replace that last
    level by 0).
    """
    if model not in AYS_SIGMAS:
        raise ValueError(f"no published Align Your Steps schedule for {model!r}; choose one of {sorted(AYS_SIGMAS)}")
    published = np.asarray(AYS_SIGMAS[model], np.float64)
    native = len(published) - 1
    n = _check_n(n_steps)
    if n < native:
        raise ValueError(f"Align Your Steps publishes {native}-step schedules; log-linear interpolation refines "
                         f"them to n_steps >= {native}, got {n}")
    with _host():
        ends = np.exp(-np.asarray(schedule.lam(np.asarray([schedule.t_max, schedule.t_min], np.float64))))
    if not np.allclose(ends, published[[0, -1]], rtol=_AYS_RTOL, atol=0.0):
        raise ValueError(f"the Align Your Steps schedule of {model!r} spans sigma {published[0]:g} to "
                         f"{published[-1]:g}; {schedule!r} spans {ends[0]:.6g} to {ends[-1]:.6g} "
                         "(it is for another model)")
    log_sigma = np.interp(np.linspace(0.0, 1.0, n + 1), np.linspace(0.0, 1.0, native + 1), np.log(published))
    return _pin_ends(_t(schedule, -log_sigma), schedule.t_max, schedule.t_min)


# --------------------------------------------------------------------------------------------
# diffusers' flow-matching grids


_FLOW_PIPELINES = ("sd3", "flux")
_FLOW_UNSUPPORTED = {"invert_sigmas": "Mochi's inverted sigmas", "stochastic_sampling": None}
_SEQ_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5)


def _flow_shift_mu(config: Mapping, pipeline: str, image_seq_len, mu):
    """mu of the resolution-dependent shift: given, or the pipelines' ``calculate_shift`` (linear in
    the number of image tokens from (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift))."""
    if mu is not None:
        return float(mu)
    if image_seq_len is None:
        raise ValueError("this scheduler config shifts with the image size (use_dynamic_shifting): pass "
                         "image_seq_len (the number of image tokens) or mu")
    get = {**_SEQ_DEFAULTS, "max_shift": 1.15 if pipeline == "flux" else 1.16, **{
        k: v for k, v in config.items() if v is not None}}.get
    slope = (get("max_shift") - get("base_shift")) / (get("max_image_seq_len") - get("base_image_seq_len"))
    return image_seq_len * slope + (get("base_shift") - slope * get("base_image_seq_len"))


def _flow_shifted(config: Mapping, sigmas, mu):
    """The scheduler's time shift of ``sigmas``, in their dtype (as diffusers computes it)."""
    f = sigmas.dtype.type
    if config.get("use_dynamic_shifting", False):
        if config.get("time_shift_type", "exponential") == "exponential":
            return f(math.exp(mu)) / (f(math.exp(mu)) + (f(1) / sigmas - f(1)))
        return f(mu) / (f(mu) + (f(1) / sigmas - f(1)))
    shift = float(config.get("shift", 1.0))
    return f(shift) * sigmas / (f(1) + f(shift - 1.0) * sigmas)


def _flow_respaced(config: Mapping, sigmas, n):
    """``shift_terminal`` and the karras / exponential / beta respacings of the scheduler."""
    terminal = config.get("shift_terminal")
    if terminal:
        if n < 2:
            raise ValueError("shift_terminal needs at least 2 steps (diffusers divides by 0 at 1 step)")
        f = sigmas.dtype.type
        one_minus = f(1) - sigmas
        sigmas = f(1) - one_minus / (one_minus[-1] / f(1.0 - terminal))
    lo, hi = float(sigmas[-1]), float(sigmas[0])
    if config.get("use_karras_sigmas", False):
        ramp = np.linspace(0.0, 1.0, n)
        sigmas = (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0
    elif config.get("use_exponential_sigmas", False):
        sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    elif config.get("use_beta_sigmas", False):
        from scipy import stats  # optional dependency, only for these configs

        sigmas = np.array([lo + ppf * (hi - lo) for ppf in stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), 0.6, 0.6)])
    return sigmas


def flow_match_sigmas(config: Mapping, n_steps: int, *, image_seq_len: int | None = None, mu: float | None = None,
                      pipeline: str | None = None) -> np.ndarray:
    """The N + 1 sigmas (the last 0) diffusers' ``FlowMatchEulerDiscreteScheduler`` steps through for
    ``n_steps`` steps, from its config dict (``scheduler/scheduler_config.json``), to the last bit.

    ``pipeline`` says which base sigmas are shifted: 'sd3' (``StableDiffusion3Pipeline`` and any
    pipeline that passes none: the scheduler's own, uniform from its first to its last training sigma,
    themselves shifted once at construction) or 'flux' (``FluxPipeline``'s linspace(1, 1 / N, N));
    by default 'flux' for configs with ``use_dynamic_shifting`` and 'sd3' otherwise. The shift is the
    config's static ``shift``, or with ``use_dynamic_shifting`` e^mu ('exponential') or mu ('linear'),
    mu linear in ``image_seq_len``, the number of image tokens: (H / 16) (W / 16) for Flux
    (8x VAE, 2x2 packing), (h / p) (w / p) latent patches for SD3. Then ``shift_terminal`` and the
    karras / exponential / beta respacings apply, as in the scheduler. Values are float32 ones (the
    scheduler's tensors), as float64. ``invert_sigmas`` (Mochi) is not a grid of this package:
    ``ValueError``.
    """
    n = _check_n(n_steps)
    config = dict(config)
    for key, what in _FLOW_UNSUPPORTED.items():
        if what and config.get(key):
            raise ValueError(f"{key}=True ({what}) is not supported")
    pipeline = pipeline or ("flux" if config.get("use_dynamic_shifting") else "sd3")
    if pipeline not in _FLOW_PIPELINES:
        raise ValueError(f"pipeline must be one of {_FLOW_PIPELINES}, got {pipeline!r}")
    if config.get("use_dynamic_shifting"):
        mu = _flow_shift_mu(config, pipeline, image_seq_len, mu)
    train = int(config.get("num_train_timesteps", 1000))
    if pipeline == "flux":  # the pipeline's sigmas, cast to float32 by the scheduler
        sigmas = _flow_shifted(config, np.linspace(1.0, 1.0 / n, n).astype(np.float32), mu)
    else:
        # The scheduler's construction: its training sigmas (float32), shifted unless dynamic; then
        # set_timesteps spaces N points from the first to the last of them (float64) and shifts again.
        own = np.linspace(1, train, train, dtype=np.float32)[::-1] / np.float32(train)
        if not config.get("use_dynamic_shifting"):
            own = _flow_shifted(config, own, None)
        sigmas = _flow_shifted(config, np.linspace(float(own[0]) * train, float(own[-1]) * train, n) / train, mu)
    sigmas = _flow_respaced(config, sigmas, n).astype(np.float32)
    return np.append(sigmas.astype(np.float64), 0.0)


def flow_match(schedule: Schedule, n_steps: int, config: Mapping, *, image_seq_len: int | None = None,
               mu: float | None = None, pipeline: str | None = None) -> np.ndarray:
    """The times of ``schedule`` (a ``RectifiedFlow``) at :func:`flow_match_sigmas`: the grid a
    diffusers flow pipeline samples on (from t = 1, pure noise, for its usual configs, to 0).

    ``schedule.sigma(t)`` equals the scheduler's sigmas to rounding (t = 1 and 0 exactly); the
    schedule's own ``shift`` only reparametrizes t. ``ValueError`` when those sigmas do not decrease
    strictly (no solver steps through a repeated time).
    """
    if not schedule.noise_start:
        raise ValueError(f"flow_match needs a flow schedule (RectifiedFlow), got {schedule!r}")
    sigmas = flow_match_sigmas(config, n_steps, image_seq_len=image_seq_len, mu=mu, pipeline=pipeline)
    if not np.all(np.diff(sigmas) < 0) or sigmas[0] > 1:
        raise ValueError(f"this config gives sigmas that do not decrease strictly from at most 1: {sigmas}")
    shift = float(schedule.shift)
    ts = sigmas / (shift - (shift - 1.0) * sigmas)
    ts[sigmas == 1.0] = 1.0
    schedule.check_times(ts)
    return ts


GRIDS = {"logsnr": logsnr, "uniform": uniform_t, "quadratic": quadratic_t, "karras": karras}


def get(name: str, schedule: Schedule, n_steps: int, **kwargs) -> np.ndarray:
    """A grid by name: 'logsnr', 'uniform', 'quadratic' or 'karras'."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {sorted(GRIDS)}")
    return GRIDS[name](schedule, n_steps, **kwargs)

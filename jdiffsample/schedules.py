"""Noise schedules: x_t = alpha(t) x0 + sigma(t) eps.

Every schedule exposes, as jit- and grad-friendly functions of a time array ``t``:

* ``alpha(t)``, ``sigma(t)``;
* ``lam(t) = log alpha - log sigma`` (half-log-SNR, increasing towards the data);
* ``t_from_lam(lam)``, the exact inverse of ``lam``;
* ``t_min``/``t_max``: the valid time domain (also the default sampling range);
* ``model_time(t)``: the time value the underlying network was trained with.

Solvers work in lambda, so a schedule only needs these few methods. Schedules are frozen dataclasses
(hashable, so they can be static arguments of ``jax.jit``).

``VE`` is the EDM convention: ``t`` is the noise level sigma itself and alpha = 1. ``RectifiedFlow`` is
flow matching: alpha = 1 - sigma. On schedules with ``zero_end`` (VE, flows) a grid may end at t = 0,
where sigma = 0 and lambda = +inf; solvers treat that last step specially, so ``lam(0)`` is never needed.
On schedules with ``noise_start`` (flows) a grid may start at t = 1, where alpha = 0 and lambda = -inf
(pure noise); solvers take the limit of that first step, so ``lam(1)`` is never needed either.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Schedule", "VPLinear", "VPCosine", "VPDiscrete", "VE", "RectifiedFlow", "get", "float64", "from_config",
           "guided_diffusion_betas", "diffusers_betas"]


def float64():
    """Context manager that enables float64 in JAX for host-side precomputation (grids, checks)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # JAX < 0.8

    return enable_x64()


def _vp_log_alpha_from_lam(lam):
    # For VP (alpha^2 + sigma^2 = 1): alpha^2 = sigmoid(2 lam).
    return -0.5 * jnp.logaddexp(0.0, -2.0 * lam)


class Schedule:
    """Base class. Subclasses define ``log_alpha``, ``t_from_lam`` and the domain."""

    t_min: float
    t_max: float
    is_ve: bool = False
    zero_end: bool = False  # a grid may end at t = 0, where sigma = 0 (VE, flows)
    noise_start: bool = False  # a grid may start at t = 1, where alpha = 0: pure noise (flows)

    def log_alpha(self, t):
        raise NotImplementedError

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def log_sigma(self, t):
        # VP: sigma = sqrt(1 - alpha^2), computed without cancellation near t = 0.
        return 0.5 * jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def lam(self, t):
        return self.log_alpha(t) - self.log_sigma(t)

    def t_from_lam(self, lam):
        raise NotImplementedError

    def model_time(self, t):
        """The time value the network expects (identity unless the model is discrete-time)."""
        return t

    def edm_sigma(self, t):
        """sigma / alpha = exp(-lam): the EDM / VE noise level of time ``t``."""
        return jnp.exp(-self.lam(t))

    def prior_std(self, t):
        """Standard deviation of the starting noise at time ``t``: 1 for VP schedules and flows (data
        of unit scale: x_t ~ N(0, alpha^2 + sigma^2) = N(0, 1), as DPM-Solver and diffusers start),
        sigma for VE (EDM's sigma_max * noise)."""
        return self.sigma(t) if self.is_ve else jnp.ones_like(jnp.asarray(t))

    def to_config(self) -> dict:
        """The schedule as JSON values (``config.json``'s ``schedule``); :func:`from_config` inverts it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, **fields}

    def check_times(self, ts) -> None:
        """Raise ``ValueError`` if any of the (concrete) times lies outside the domain."""
        ts = np.asarray(ts, dtype=np.float64)
        lo, hi = self.t_min, self.t_max
        tol = 1e-6 * max(1.0, abs(hi))
        bad = (ts < lo - tol) | (ts > hi + tol) | ~np.isfinite(ts)
        if bad.any():
            raise ValueError(
                f"time {ts[bad][0]!r} is outside the domain of {self!r}: "
                f"times must lie in [{lo}, {hi}]"
            )


@dataclasses.dataclass(frozen=True)
class VPLinear(Schedule):
    """Continuous VP SDE of ScoreSDE: beta(t) linear from ``beta_min`` to ``beta_max`` on [0, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_from_lam(self, lam):
        # Solve 0.25 db t^2 + 0.5 b0 t = L with L = -log_alpha > 0, in the cancellation-free form.
        big_l = -_vp_log_alpha_from_lam(lam)
        db, b0 = self.beta_max - self.beta_min, self.beta_min
        return 2.0 * big_l / (0.5 * b0 + jnp.sqrt(0.25 * b0**2 + db * big_l))


@dataclasses.dataclass(frozen=True)
class VPCosine(Schedule):
    """Improved-DDPM cosine schedule in continuous time, alpha^2 = cos^2((t+s)/(1+s) pi/2) / c0.

    ``t_max`` stops short of 1, where alpha vanishes (0.9946 as in DPM-Solver).
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946

    def _log_alpha0(self):
        return math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t):
        return jnp.log(jnp.cos((t + self.s) / (1.0 + self.s) * jnp.pi / 2.0)) - self._log_alpha0()

    def t_from_lam(self, lam):
        log_alpha = _vp_log_alpha_from_lam(lam)
        angle = jnp.arccos(jnp.exp(log_alpha + self._log_alpha0()))
        return angle * 2.0 * (1.0 + self.s) / jnp.pi - self.s


@dataclasses.dataclass(frozen=True, eq=False)
class VPDiscrete(Schedule):
    """A discrete-time VP model (DDPM, ADM, LDM) given its ``alphas_cumprod`` over N training steps.

    Continuous time follows DPM-Solver: training step n (0-based) sits at t_n = (n + 1) / N and
    log alpha is interpolated linearly in t between them, so t lies in [1/N, 1]. The network is
    called with ``model_time(t) = N t - 1`` (the training index, fractional in between). A grid may
    end at t = 0 (alpha = 1, sigma = 0), as diffusers' multistep schedulers do by default
    (``final_sigmas_type='zero'``): the last step then returns the data prediction.
    """

    alphas_cumprod: np.ndarray
    zero_end = True

    def __post_init__(self):
        a = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if a.ndim != 1 or a.size < 2:
            raise ValueError("alphas_cumprod must be a 1-D array with at least 2 entries")
        if not (np.all(a > 0) and np.all(a < 1) and np.all(np.diff(a) < 0)):
            raise ValueError("alphas_cumprod must lie in (0, 1) and decrease strictly")
        object.__setattr__(self, "alphas_cumprod", a)

    @classmethod
    def from_betas(cls, betas) -> "VPDiscrete":
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array of values in (0, 1)")
        return cls(np.cumprod(1.0 - betas))

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """DDPM's linear betas (as diffusers' ``beta_schedule='linear'``)."""
        return cls.from_betas(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))

    @classmethod
    def from_diffusers(cls, scheduler_config) -> "VPDiscrete":
        """The schedule of a diffusers scheduler config (``beta_schedule``, ``trained_betas``,
        ``rescale_betas_zero_snr``: :func:`diffusers_betas`)."""
        abar = np.cumprod(1.0 - diffusers_betas(scheduler_config))
        if scheduler_config.get("rescale_betas_zero_snr"):
            # Lin et al. (2024): sqrt(alpha_bar) shifted and scaled to end at 0; diffusers' samplers
            # then stand 2**-24 in for the last alpha_bar, and so does this schedule.
            s = np.sqrt(abar)
            s = (s - s[-1]) * s[0] / (s[0] - s[-1])
            abar = s**2
            abar[-1] = 2.0**-24
        return cls(abar)

    def to_config(self) -> dict:
        return {"type": "VPDiscrete", "alphas_cumprod": self.alphas_cumprod.tolist()}

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.size)

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 1.0 / self.num_steps

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return 1.0

    def _tables(self):
        n = self.num_steps
        t_grid = np.arange(1, n + 1, dtype=np.float64) / n
        return jnp.asarray(t_grid), jnp.asarray(0.5 * np.log(self.alphas_cumprod))

    def log_alpha(self, t):
        t_grid, log_alpha = self._tables()
        t = jnp.asarray(t)
        inside = jnp.interp(t, t_grid.astype(t.dtype), log_alpha.astype(t.dtype))
        return jnp.where(t > 0, inside, jnp.zeros_like(inside))  # t = 0: the data, alpha = 1

    def t_from_lam(self, lam):
        t_grid, log_alpha = self._tables()
        lam = jnp.asarray(lam)
        # log alpha decreases in t: interpolate on the reversed (increasing) table.
        return jnp.interp(
            _vp_log_alpha_from_lam(lam), log_alpha[::-1].astype(lam.dtype), t_grid[::-1].astype(lam.dtype)
        )

    def model_time(self, t):
        return self.num_steps * t - 1.0

    def check_times(self, ts) -> None:
        ts = np.asarray(ts, dtype=np.float64)
        super().check_times(ts[:-1] if ts.size > 1 and ts[-1] == 0 else ts)
        if ts.size and ts[-1] < 0:
            raise ValueError(f"time {ts[-1]!r} is outside the domain of {self!r}: times must lie in "
                             f"[{self.t_min}, {self.t_max}] (or end at 0)")

    def __eq__(self, other):
        return isinstance(other, VPDiscrete) and np.array_equal(self.alphas_cumprod, other.alphas_cumprod)

    def __hash__(self):
        return hash(self.alphas_cumprod.tobytes())

    def __repr__(self):
        return f"VPDiscrete(num_steps={self.num_steps})"


@dataclasses.dataclass(frozen=True)
class VE(Schedule):
    """Variance-exploding / EDM schedule: ``t`` is the noise level sigma and alpha = 1.

    ``sigma_min``/``sigma_max`` are the default sampling range (EDM: 0.002 and 80). Any t >= 0 is
    valid; t = 0 may only be the final point of a grid.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    is_ve = True
    zero_end = True

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.sigma_min

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t))

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t))

    def log_sigma(self, t):
        return jnp.log(t)

    def sigma(self, t):
        return jnp.asarray(t)

    def lam(self, t):
        return -jnp.log(t)

    def t_from_lam(self, lam):
        return jnp.exp(-jnp.asarray(lam))

    def edm_sigma(self, t):
        return jnp.asarray(t)

    def check_times(self, ts) -> None:
        ts = np.asarray(ts, dtype=np.float64)
        if not np.all(np.isfinite(ts)) or np.any(ts < 0):
            raise ValueError(f"VE times are noise levels sigma and must be finite and >= 0, got {ts}")
        if np.any(ts[:-1] == 0):
            raise ValueError("a VE grid may reach sigma = 0 only at its last point")


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Schedule):
    """Flow matching / rectified flow: x_t = (1 - sigma) x0 + sigma eps with sigma = sigma(t).

    ``shift`` is the SD3/Flux time shift, sigma(t) = shift t / (1 + (shift - 1) t) (1: sigma = t), so
    lambda(t) = log((1 - t) / t) - log(shift): the shift only moves lambda by a constant, and
    ``t_from_lam`` is the exact inverse t = 1 / (1 + shift e^lambda).

    Valid times are 0 <= t <= 1. t = 1 (pure noise: alpha = 0, lambda = -inf, ``noise_start``) may
    only start a grid, as it does in diffusers' flow pipelines: every solver takes the limit of its
    first step there (see :mod:`jdiffsample.solvers.core`), and the starting state is the noise itself
    (``prior_std`` 1). t = 0 (sigma = 0) may only end a grid; that step returns the data prediction, as
    for ``VE``. The default sampling range [``t_min``, ``t_max``] = [1e-3, 1 - 1e-3] is symmetric in
    lambda (+-6.9 - log(shift)), which grids uniform in lambda need; ``t_max = 1`` is allowed for grids
    that start at the noise (uniform in t, or diffusers' flow sigmas). 1e-3 is also diffusers' last
    nonzero flow time (1 / num_train_timesteps). ``model_time`` is sigma(t),
    the shifted noise level flow networks are trained with (diffusers' SD3/Flux pipelines pass
    1000 sigma). In float32, a time t near 1 fixes alpha = 1 - sigma only to about 6e-8 / (1 - t)
    relative; the noise-prediction solvers (DEIS, iPNDM), which divide by alpha, feel it most.
    """

    shift: float = 1.0
    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3
    zero_end = True
    noise_start = True

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if not 0.0 < self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")

    def log_alpha(self, t):
        t = jnp.asarray(t)
        return jnp.log1p(-t) - jnp.log1p((self.shift - 1.0) * t)

    def log_sigma(self, t):
        t = jnp.asarray(t)
        return math.log(self.shift) + jnp.log(t) - jnp.log1p((self.shift - 1.0) * t)

    def lam(self, t):
        t = jnp.asarray(t)
        return jnp.log1p(-t) - jnp.log(t) - math.log(self.shift)

    def t_from_lam(self, lam):
        return jax.nn.sigmoid(-(jnp.asarray(lam) + math.log(self.shift)))

    def model_time(self, t):
        return self.sigma(t)

    def check_times(self, ts) -> None:
        ts = np.asarray(ts, dtype=np.float64)
        if not np.all(np.isfinite(ts)) or np.any(ts < 0) or np.any(ts > 1):
            raise ValueError(f"flow times must lie in [0, 1], got {ts}")
        if np.any(ts[:-1] == 0):
            raise ValueError("a flow grid may reach t = 0 (sigma = 0) only at its last point")
        if np.any(ts[1:] == 1):
            raise ValueError("a flow grid may start at t = 1 (alpha = 0, pure noise) but not reach it later")


# ---------------------------------------------------------------------------------------------
# Named beta schedules and configs


def guided_diffusion_betas(name: str, num_steps: int) -> np.ndarray:
    """guided-diffusion's named beta schedules, float64 of shape [num_steps].

    * ``"linear"``: evenly spaced from ``1e-4 * 1000/T`` to ``0.02 * 1000/T`` (inclusive).
    * ``"cosine"``: ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` with
      ``abar(t) = cos((t + 0.008) / 1.008 * pi/2) ** 2`` (Nichol & Dhariwal, 2021).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"the number of diffusion steps must be a positive integer, got {num_steps!r}")
    if name == "linear":
        scale = 1000.0 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def diffusers_betas(config) -> np.ndarray:
    """float64 betas of a diffusers scheduler config: ``trained_betas``, or ``beta_schedule`` over
    ``num_train_timesteps`` from ``beta_start`` to ``beta_end``."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return guided_diffusion_betas("cosine", n)
    raise ValueError(f"scheduler beta_schedule={kind!r} is not supported; allowed: "
                     f"{', '.join(DIFFUSERS_BETA_SCHEDULES)} or trained_betas")


_TYPES = {"VPLinear": VPLinear, "VPCosine": VPCosine, "VE": VE, "RectifiedFlow": RectifiedFlow}


def from_config(config) -> Schedule:
    """The schedule of a ``config.json`` ``schedule`` entry (:meth:`Schedule.to_config`).

    ``VPDiscrete`` also reads the forms earlier checkpoints recorded: guided-diffusion's
    ``noise_schedule``/``diffusion_steps`` and a diffusers scheduler's beta settings.
    """
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"a schedule config must be a JSON object with a 'type', got {config!r}")
    kind, rest = config["type"], {k: v for k, v in config.items() if k != "type"}
    try:
        if kind == "VPDiscrete":
            if "alphas_cumprod" in rest:
                return VPDiscrete(np.asarray(rest["alphas_cumprod"], np.float64))
            if "noise_schedule" in rest:
                return VPDiscrete.from_betas(guided_diffusion_betas(rest["noise_schedule"],
                                                                   int(rest.get("diffusion_steps", 1000))))
            return VPDiscrete.from_diffusers(rest)
        if kind not in _TYPES:
            raise ValueError(f"unknown schedule type {kind!r}; known: {', '.join([*_TYPES, 'VPDiscrete'])}")
        cls = _TYPES[kind]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in rest.items() if k in names})
    except (TypeError, ValueError) as err:
        raise ValueError(f"the schedule config {_short(config)} is invalid: {err}") from None


def _short(config) -> str:
    text = str(config)
    return text if len(text) < 120 else text[:117] + "..."


_NAMES = {"vp-linear": VPLinear, "vp-cosine": VPCosine, "ve": VE, "edm": VE, "flow": RectifiedFlow}


def get(name: str) -> Schedule:
    """A schedule by name: 'vp-linear', 'vp-cosine', 've' (alias 'edm'), 'flow' (rectified flow, shift 1),
    or 'vp-discrete' (DDPM linear)."""
    if name == "vp-discrete":
        return VPDiscrete.linear()
    if name not in _NAMES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted([*_NAMES, 'vp-discrete'])}")
    return _NAMES[name]()

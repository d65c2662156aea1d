"""DEIS and iPNDM: convergence orders on the Gaussian mixture, identities, gradients, agreement with
diffusers' ``DEISMultistepScheduler`` and ``IPNDMScheduler`` (float64), and input errors.

Orders are slopes of log error against log N, the error measured against SA-Solver(4, 4) with tau =
0 on a much finer grid (an independent configuration of the core).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiffsample
from jdiffsample import schedules, solvers, timesteps
from jdiffsample.solvers import core

from conftest import require


pytestmark = pytest.mark.usefixtures("float64")


def _reference(den, x, ts, schedule):
    return jdiffsample.sample(den, x, ts, schedule, solver="sa_solver", tau=0.0, predictor_order=4,
                              corrector_order=4, lower_order_final=False)


def _slope(den, x, ref, schedule, grid, steps, solver, **options):
    errors = [float(jnp.sqrt(jnp.mean((jdiffsample.sample(den, x, grid(n), schedule, solver=solver, **options)
                                       - ref) ** 2))) for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


# ------------------------------------------------------------------------------------------------
# Convergence orders


@pytest.fixture(scope="module")
def vp_problem(mixture):
    with schedules.float64():
        sch = schedules.VPLinear()
        den = mixture.denoiser(sch)
        x = mixture.sample_marginal(jax.random.key(1), 4, sch.t_max, sch, dtype=jnp.float64)
        return sch, den, x, _reference(den, x, timesteps.logsnr(sch, 1000), sch)


@pytest.mark.parametrize("variant,order", [("tab", 2), ("tab", 3), ("logrho", 2), ("logrho", 3), ("rhoab", 3)])
def test_deis_convergence_order(vp_problem, variant, order):
    """Measured on VP-linear logSNR grids of 64 and 256 steps: 1.96/2.94 (tAB), 1.98/3.25 (log-rho,
    still slightly above its asymptote), 2.86 (rhoAB). Order 1 is DDIM (``test_identities``)."""
    sch, den, x, ref = vp_problem
    slope, errors = _slope(den, x, ref, sch, lambda n: timesteps.logsnr(sch, n), [64, 256], "deis",
                           order=order, variant=variant, lower_order_final=False)
    assert abs(slope - order) < 0.3, (errors, slope)


@pytest.fixture(scope="module")
def ve_windows(mixture):
    """EDM coordinates on two sigma windows, with references; grids uniform in sigma = rho."""
    with schedules.float64():
        sch = schedules.VE()
        den = mixture.denoiser(sch)
        out = {}
        for start, end in [(10.0, 0.5), (3.0, 0.3)]:
            x = mixture.sample_marginal(jax.random.key(1), 4, start, sch, dtype=jnp.float64)
            out[start] = (x, _reference(den, x, timesteps.logsnr(sch, 4000, start, end), sch), end)
        return sch, den, out


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_order_on_grids_uniform_in_rho(ve_windows, order):
    """Where its fixed coefficients are the exact ones (steps equal in rho), iPNDM-p converges at
    order p once the warm-up's share is small: from sigma = 10, where the noise prediction barely
    changes, measured 1.95 / 2.92 / 3.84 from 128 to 512 steps (order 1 is DDIM)."""
    sch, den, windows = ve_windows
    x, ref, end = windows[10.0]
    slope, errors = _slope(den, x, ref, sch, lambda n: np.linspace(10.0, end, n + 1), [128, 512], "ipndm",
                           order=order)
    assert abs(slope - order) < 0.3, (errors, slope)


def test_ipndm_warm_up_caps_the_asymptotic_order_at_two(ve_windows):
    """The first step is Euler (order 1), whose O(h^2) local error is never corrected: the asymptotic
    global order of iPNDM-4 with warm-up is 2. From sigma = 3 it shows by 256-512 steps (measured
    slope 1.98; 3.6 at 32-64 steps)."""
    sch, den, windows = ve_windows
    x, ref, end = windows[3.0]
    slope, errors = _slope(den, x, ref, sch, lambda n: np.linspace(3.0, end, n + 1), [256, 512], "ipndm", order=4)
    assert abs(slope - 2) < 0.3, (errors, slope)


def test_ipndm_fixed_coefficients_are_second_order_on_other_grids(vp_problem):
    """On logSNR grids (geometric in rho) the equal-step coefficients are off by O(h) relative, so
    iPNDM-4 is second order (measured 2.02); iPNDM_v's actual-step coefficients restore order 4
    (measured 3.7 from 64 to 256 steps)."""
    sch, den, x, ref = vp_problem
    grid = lambda n: timesteps.logsnr(sch, n)  # noqa: E731
    fixed, errors = _slope(den, x, ref, sch, grid, [64, 256], "ipndm", order=4)
    assert abs(fixed - 2) < 0.3, (errors, fixed)
    variable, errors = _slope(den, x, ref, sch, grid, [64, 256], "ipndm", order=4, variable_step=True)
    assert abs(variable - 4) < 0.4, (errors, variable)


# ------------------------------------------------------------------------------------------------
# Identities


def test_identities(mixture):
    ve = schedules.VE()
    den = mixture.denoiser(ve)
    x = mixture.sample_marginal(jax.random.key(2), 4, 80.0, ve, dtype=jnp.float64)
    ts, uniform = jnp.asarray(timesteps.karras(ve, 12)), jnp.linspace(80.0, 0.5, 13)
    cases = dict(
        ddim=("ddim", ts, {}),
        tab1=("deis", ts, dict(order=1, variant="tab")),
        logrho1=("deis", ts, dict(order=1, variant="logrho")),
        ipndm1=("ipndm", ts, dict(order=1)),
        tab=("deis", ts, dict(variant="tab")),
        rhoab=("deis", ts, dict(variant="rhoab")),
        ipndm_v3=("ipndm", ts, dict(order=3, variable_step=True)),
        rhoab3=("deis", ts, dict(order=3, variant="rhoab", lower_order_final=False)),
        ipndm_uniform=("ipndm", uniform, {}),
        ipndm_v_uniform=("ipndm", uniform, dict(variable_step=True)),
    )
    out = jax.jit(lambda x: {k: solvers.SOLVERS[s](den, x, t, ve, **o) for k, (s, t, o) in cases.items()})(x)
    close = lambda a, b: np.testing.assert_allclose(out[a], out[b], rtol=1e-10, atol=1e-10)  # noqa: E731
    for name in ("tab1", "logrho1", "ipndm1"):  # order 1 is DDIM whatever the interpolation variable
        close(name, "ddim")
    close("tab", "rhoab")  # on VE, t = sigma = rho: tAB (quadrature) is rhoAB (closed form)
    close("ipndm_v3", "rhoab3")  # iPNDM_v is DEIS rhoAB without lower final orders
    close("ipndm_uniform", "ipndm_v_uniform")  # on a grid uniform in rho the fixed coefficients are exact


# ------------------------------------------------------------------------------------------------
# Agreement with diffusers (float64, same sigma grid, the same analytic denoiser)


@pytest.fixture(scope="module")
def agreement(mixture):
    """The mixture's posterior mean D(x, s) in VE coordinates and a batch at sigma = s."""
    with schedules.float64():
        den = jax.jit(mixture.denoiser(schedules.VE()))
    return den, lambda s: mixture.sample_marginal(jax.random.key(1), 4, s, schedules.VE(), dtype=jnp.float64)


def _relative(ours, reference):
    assert np.all(np.isfinite(reference))
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@pytest.mark.parametrize("order,n_steps", [(1, 8), (2, 8), (3, 8), (3, 15)])
def test_deis_logrho_matches_diffusers(agreement, order, n_steps):
    """diffusers' DEIS (log-rho, noise prediction) on its own sigma grid, in VP coordinates with a
    'sample' model; lower final orders below 15 steps on both sides. Measured: <= 7e-15."""
    torch = require("torch")
    diffusers = require("diffusers")
    den, start = agreement
    scheduler = diffusers.DEISMultistepScheduler(solver_order=order, prediction_type="sample", lower_order_final=True)
    scheduler.set_timesteps(n_steps)
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    s = scheduler.sigmas.numpy()
    alpha = 1.0 / np.sqrt(1.0 + s**2)
    x = start(s[0])
    state = torch.from_numpy(np.asarray(x) * alpha[0])
    for i, timestep in enumerate(scheduler.timesteps):
        x0 = np.array(den(jnp.asarray(state.numpy() / alpha[i]), s[i]))
        state = scheduler.step(torch.from_numpy(x0), timestep, state).prev_sample
    assert state.dtype == torch.float64
    ours = jdiffsample.sample(den, x, jnp.asarray(s), schedules.VE(), solver="deis", order=order, variant="logrho")
    assert _relative(ours, state.numpy() / alpha[-1]) < 1e-6


@pytest.mark.parametrize("n_steps", [3, 10])
def test_ipndm_matches_diffusers(agreement, n_steps):
    """diffusers' IPNDMScheduler with ``trained_betas`` = the VP sigmas of an EDM grid (its betas are
    the VP sigma of each grid point) and a v-prediction model; its tables are set in float64. The grid
    ends at sigma_min > 0 (into sigma = 0 the two differ by definition, see the module). Measured:
    <= 5e-15."""
    torch = require("torch")
    diffusers = require("diffusers")
    den, start = agreement
    s = timesteps.karras(schedules.VE(), n_steps)
    alpha, sigma = 1.0 / np.sqrt(1.0 + s**2), s / np.sqrt(1.0 + s**2)
    scheduler = diffusers.IPNDMScheduler(trained_betas=sigma.tolist())
    scheduler.set_timesteps(n_steps)
    scheduler.betas, scheduler.alphas = torch.from_numpy(sigma), torch.from_numpy(alpha)
    x = start(s[0])
    state = torch.from_numpy(np.asarray(x) * alpha[0])
    for i, timestep in enumerate(scheduler.timesteps):
        x_vp = state.numpy()
        x0 = np.array(den(jnp.asarray(x_vp / alpha[i]), s[i]))
        v = alpha[i] * (x_vp - alpha[i] * x0) / sigma[i] - sigma[i] * x0
        state = scheduler.step(torch.from_numpy(v), timestep, state).prev_sample
    assert state.dtype == torch.float64
    ours = jdiffsample.sample(den, x, jnp.asarray(s), schedules.VE(), solver="ipndm", order=4)
    assert _relative(ours, state.numpy() / alpha[-1]) < 1e-6


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("solver,options,message", [
    ("deis", dict(order=4), "option order of solver deis must be one of 1, 2, 3, got 4"),
    ("deis", dict(variant="bh2"), "option variant of solver deis must be one of 'tab', 'rhoab', 'logrho'"),
    ("ipndm", dict(order=5), "option order of solver ipndm must be one of 1, 2, 3, 4, got 5"),
    ("ipndm", dict(lower_order_final=True), "unknown option"),
])
def test_bad_options(mixture, solver, options, message):
    sch = schedules.VPLinear()
    with pytest.raises(ValueError, match=message):
        jdiffsample.sample(mixture.denoiser(sch), jnp.zeros((2, 16)), jnp.asarray([0.9, 0.5, 0.1]), sch, solver,
                           **options)


def test_noise_prediction_plans_are_deterministic(mixture):
    sch = schedules.VPLinear()
    plan = core.Plan((1, 2), (0, 0), prediction="noise")
    with pytest.raises(ValueError, match="ODE only"):
        core.multistep(mixture.denoiser(sch), jnp.zeros((2, 16)), jnp.asarray([0.9, 0.5, 0.1]), sch, plan,
                       jnp.ones(2), key=jax.random.key(0))

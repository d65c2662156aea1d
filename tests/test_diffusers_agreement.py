"""jdiffsample's multistep solvers agree with diffusers' schedulers to 1e-12 (float64).

diffusers serves only as a test-time reference. Both sides integrate the same analytic denoiser (a
Gaussian-mixture posterior mean) on the same sigma grid, the one the diffusers scheduler builds for
DDPM's linear betas:

* diffusers works in VP coordinates, x_vp = alpha x_ve with alpha = 1 / sqrt(1 + s^2) for the EDM
  sigma s, and its model is called with ``prediction_type='sample'``: it returns D(x_vp / alpha, s);
* jdiffsample runs on ``schedules.VE()`` with ``ts`` = the scheduler's sigmas and denoises with D.

The data-prediction updates are invariant under x -> x / alpha, so the final states agree once
diffusers' result is divided by the alpha of the last sigma (1 when that sigma is 0).

Two harness details keep diffusers in float64. Its ``sigmas`` (float32 after ``set_timesteps``)
are converted to float64: the same values, hence the same grid, but coefficients no longer rounded
to float32. And ``DPMSolverMultistepScheduler.step`` casts the state to float32 before updating it
(an upcast meant for half-precision models; it alone leaves differences of up to about 4e-7), so
``_helpers.float64_dpm_solver`` hands diffusers' own update functions the float64 state instead.

The tolerance is what float64 leaves: measured differences are at most 2e-15 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import float64_dpm_solver
from conftest import require

torch = require("torch")
diffusers = require("diffusers")

import jdiffsample  # noqa: E402
from jdiffsample import schedules, testing  # noqa: E402

RTOL = 1e-12
BATCH, DIM = 4, 8


@pytest.fixture(autouse=True)
def x64():
    """Run every test with float64 enabled in JAX (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def mixture():
    """A 3-component Gaussian mixture in dimension 8: its posterior mean is the denoiser."""
    return testing.GaussianMixture.random(jax.random.key(0), DIM, n_components=3)


@pytest.fixture(scope="module")
def denoise(mixture):
    """The exact posterior mean D(x, s) in VE coordinates (jitted once for both sides)."""
    return jax.jit(mixture.denoiser(schedules.VE()))


def _run_pair(scheduler, denoise, mixture, solver, **options):
    """Sample with ``scheduler`` (diffusers) and with jdiffsample's ``solver`` on its grid.

    Returns (ours, reference): both final states in VE coordinates, float64.
    """
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    s = scheduler.sigmas.numpy()
    alpha = 1.0 / np.sqrt(1.0 + s**2)
    x_ve = mixture.sample_marginal(jax.random.key(1), BATCH, s[0], schedules.VE(), dtype=jnp.float64)

    sample = torch.from_numpy(np.asarray(x_ve) * alpha[0])
    for i, timestep in enumerate(scheduler.timesteps):
        x0 = np.array(denoise(jnp.asarray(sample.numpy() / alpha[i]), s[i]))
        sample = scheduler.step(torch.from_numpy(x0), timestep, sample).prev_sample
    assert sample.dtype == torch.float64
    reference = sample.numpy() / alpha[-1]

    ours = jdiffsample.sample(denoise, x_ve, jnp.asarray(s), schedules.VE(), solver=solver, **options)
    assert ours.dtype == jnp.float64
    return np.asarray(ours), reference


def _relative_difference(ours, reference):
    """max |ours - reference| / max |reference|."""
    assert np.all(np.isfinite(reference))
    return np.max(np.abs(ours - reference)) / np.max(np.abs(reference))


def _assert_close(ours, reference):
    rel = _relative_difference(ours, reference)
    assert rel < RTOL, f"max relative difference {rel:.3e}"


def _strictly_decreasing(scheduler):
    s = scheduler.sigmas.numpy()
    assert np.all(np.diff(s) < 0), s


# --------------------------------------------------------------------------------------------
# UniPC


def _unipc(order, variant, n_steps, final_sigmas_type="sigma_min"):
    scheduler = diffusers.UniPCMultistepScheduler(
        solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
        prediction_type="sample", final_sigmas_type=final_sigmas_type,
    )
    scheduler.set_timesteps(n_steps)
    _strictly_decreasing(scheduler)
    return scheduler


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(denoise, mixture, order, variant):
    """UniPC lowers the final orders for any N (unlike DPM-Solver), so one grid size suffices."""
    ours, reference = _run_pair(_unipc(order, variant, 8), denoise, mixture, "unipc", order=order, variant=variant)
    _assert_close(ours, reference)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_final_sigma_zero_matches_diffusers(denoise, mixture, order):
    """Into sigma = 0, diffusers' bh2 first-order step and ours both return the data prediction.

    (bh1 is not compared here: diffusers computes (-inf) * 0 = NaN on that step.)
    """
    scheduler = _unipc(order, "bh2", 8, final_sigmas_type="zero")
    assert scheduler.sigmas[-1] == 0
    ours, reference = _run_pair(scheduler, denoise, mixture, "unipc", order=order, variant="bh2")
    _assert_close(ours, reference)


def test_harness_tells_variants_apart(denoise, mixture):
    """The comparison is sensitive: bh1 and bh2 (which differ only by the order-2 shortcut) differ
    by far more than the tolerance."""
    ours_bh2, _ = _run_pair(_unipc(2, "bh2", 8), denoise, mixture, "unipc", order=2, variant="bh2")
    _, reference_bh1 = _run_pair(_unipc(2, "bh1", 8), denoise, mixture, "unipc", order=2, variant="bh1")
    assert _relative_difference(ours_bh2, reference_bh1) > 1e3 * RTOL


# --------------------------------------------------------------------------------------------
# DPM-Solver++


@pytest.mark.parametrize(
    "n_steps,final_sigmas_type", [(14, "sigma_min"), (15, "sigma_min"), (8, "zero"), (15, "zero")]
)
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_matches_diffusers(denoise, mixture, order, n_steps, final_sigmas_type):
    """2M midpoint and 3M (halved second difference); the final orders drop only below 15 steps.

    With a final sigma of 0 diffusers always ends with a first-order step, which returns the data
    prediction, as our step into sigma = 0 does.
    """
    scheduler = float64_dpm_solver()(
        solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        prediction_type="sample", final_sigmas_type=final_sigmas_type,
    )
    scheduler.set_timesteps(n_steps)
    _strictly_decreasing(scheduler)
    ours, reference = _run_pair(scheduler, denoise, mixture, "dpmpp", order=order)
    _assert_close(ours, reference)


# --------------------------------------------------------------------------------------------
# SA-Solver


@pytest.mark.parametrize("predictor_order,corrector_order", [(1, 1), (2, 2), (3, 3), (3, 4), (4, 4)])
def test_sa_solver_tau0_matches_diffusers(denoise, mixture, predictor_order, corrector_order):
    """tau = 0 (the ODE); diffusers always uses the order-2 rescaled coefficients: few_steps=True.

    With the default 'linspace' spacing the grid ends at the sigma of training step 0, distinct from
    the one before it (only karras/exponential/beta/flow sigmas duplicate the last sigma), and every
    step but the last is corrected at the start of the next ``step()`` call, as in our PEC loop.
    """
    scheduler = diffusers.SASolverScheduler(
        predictor_order=predictor_order, corrector_order=corrector_order, tau_func=lambda t: 0,
        algorithm_type="data_prediction", lower_order_final=True, prediction_type="sample",
    )
    scheduler.set_timesteps(10)
    _strictly_decreasing(scheduler)
    ours, reference = _run_pair(
        scheduler, denoise, mixture, "sa_solver", predictor_order=predictor_order,
        corrector_order=corrector_order, tau=0.0, few_steps=True,
    )
    _assert_close(ours, reference)

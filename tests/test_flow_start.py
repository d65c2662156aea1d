"""Sampling a flow from t = 1 (sigma = 1, alpha = 0: pure noise), as diffusers' flow pipelines do.

Every solver takes the limit of its first step there (lambda = -inf); the references are diffusers'
schedulers in float64 on the same sigmas (``FlowMatchEulerDiscreteScheduler``, the sampler of
FluxPipeline and StableDiffusion3Pipeline; ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` with flow sigmas, which compute the same limits from their infinite
lambda), finite differences of the gradients, convergence orders against a fine-grid solution, and the
mixture's exact moments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_grad_wrt_times, float64_dpm_solver, float64_flow_match_euler, run_scheduler
from conftest import require

import jdiffsample
from jdiffsample import models, schedules, solvers, timesteps
from jdiffsample.solvers import core, registry

pytestmark = pytest.mark.usefixtures("float64")

SHIFT = 3.0
SCH = schedules.RectifiedFlow(shift=SHIFT)


@pytest.fixture(scope="module")
def flow(mixture):
    """The mixture as a flow model (velocity, jitted; and as a denoiser) and pure noise at t = 1."""
    with schedules.float64():
        velocity = jax.jit(mixture.velocity(SCH))
        x = mixture.sample_marginal(jax.random.key(1), 4, 1.0, SCH, dtype=jnp.float64)
        return velocity, models.from_velocity(velocity, SCH), x


def _relative(ours, reference):
    assert np.all(np.isfinite(reference))
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def _times(sigmas):
    """The RectifiedFlow(SHIFT) times of flow sigmas (sigma = 1 is t = 1)."""
    return sigmas / (SHIFT - (SHIFT - 1) * sigmas)


def test_the_noise_start(mixture):
    assert float(SCH.alpha(1.0)) == 0.0 and float(SCH.sigma(1.0)) == 1.0 and float(SCH.prior_std(1.0)) == 1.0
    x = mixture.sample_marginal(jax.random.key(2), 3, 1.0, SCH, dtype=jnp.float64)
    wide = schedules.RectifiedFlow(shift=SHIFT, t_max=1.0)
    ts = timesteps.uniform_t(wide, 4, t_end=0.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0
    for grid in (timesteps.logsnr, timesteps.karras):
        with pytest.raises(ValueError, match="lambda is infinite"):
            grid(wide, 4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        jdiffsample.sample(mixture.denoiser(SCH), x, jnp.asarray([0.9, 1.0, 0.5]), SCH, "ddim")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        jdiffsample.sample(mixture.denoiser(SCH), x, jnp.asarray([1.5, 0.5]), SCH, "ddim")


# ------------------------------------------------------------------------------------------------
# diffusers from sigma = 1


def test_flow_match_euler_from_one(flow):
    """FlowMatchEulerDiscreteScheduler(shift=3) with its own grid, which starts at sigma = 1: our
    Euler and DDIM (the first step's limit x_1 = sigma_1 x_0 + alpha_1 D(x_0)); Heun's first step from
    there is that Euler step. Measured: <= 1e-15."""
    torch = require("torch")
    velocity, den, x = flow
    scheduler = float64_flow_match_euler()(shift=SHIFT)
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas.to(torch.float64).numpy()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    ts = jnp.asarray(_times(sigmas))
    reference = run_scheduler(scheduler, velocity, x, ts)
    euler = jdiffsample.sample(den, x, ts, SCH, "euler", return_trajectory=True)
    assert _relative(euler[-1], reference) < 1e-12
    assert _relative(jdiffsample.sample(den, x, ts, SCH, "ddim"), reference) < 1e-12
    heun = jdiffsample.sample(den, x, ts, SCH, "heun", return_trajectory=True)
    np.testing.assert_allclose(heun[:2], euler[:2], rtol=1e-14, atol=1e-14)
    assert np.array_equal(heun[0], x)


@pytest.mark.parametrize("order,algorithm", [(1, "dpmsolver++"), (2, "dpmsolver++"), (3, "dpmsolver++"),
                                             (2, "sde-dpmsolver++")])
def test_dpm_solver_from_one(flow, order, algorithm):
    """DPMSolverMultistepScheduler with flow sigmas (its grid stops at sigma = 0.999; the first is set
    to 1 here), final sigma 0. From lambda = -inf it computes e^{-h} = 0 and later drops the
    differences that involve the first point (1 / r = 0), the limits we take (at order 3 the exact
    second-order weights, as ours). The SDE variant is ours with eta = 1, given our noise (its order 3
    is not: diffusers' third-order sde-dpmsolver++ weights D2 by (1 - e^{-2h} - 2h) / (2h)^2 - 1/2
    where k-diffusion's dpmpp_3m_sde, and ours, have 1/2 - (e^{-2h} - 1 + 2h) / (2h)^2).
    Measured: <= 1e-15."""
    torch = require("torch")
    velocity, den, x = flow
    scheduler = float64_dpm_solver()(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT,
                                     solver_order=order, algorithm_type=algorithm, final_sigmas_type="zero")
    scheduler.set_timesteps(8)
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    scheduler.sigmas[0] = 1.0
    ts = jnp.asarray(_times(scheduler.sigmas.numpy()))
    key = jax.random.key(5)
    sde = algorithm.startswith("sde")
    noise = (lambda i: core.normal(key, i, x.shape, jnp.float64)) if sde else None
    reference = run_scheduler(scheduler, velocity, x, ts, noise)
    ours = jdiffsample.sample(den, x, ts, SCH, "dpmpp", order=order, eta=1.0 if sde else 0.0, key=key if sde else None)
    assert _relative(ours, reference) < 1e-12


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_from_one(flow, order):
    """UniPCMultistepScheduler (flow sigmas, bh2) moves a first sigma of 1 to 1 - 1e-6 (float32:
    0.99999899); set back to 1 it computes the limits we take for orders 1 and 2 (measured <= 8e-16)
    and NaN for order 3 (its 3x3 system holds lambda = -inf). Where it starts, 1e-6 below 1, the second
    step still extrapolates with a node at lambda = -13.8: ours from 1 differs from that by 1e-5 to 1e-4
    relative (measured 1.5e-5 at order 3), where on its own grid we agree to 1e-15 (test_flow.py)."""
    torch = require("torch")
    diffusers = require("diffusers")
    velocity, den, x = flow

    def scheduler():
        s = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                              flow_shift=SHIFT, solver_order=order, solver_type="bh2",
                                              final_sigmas_type="zero")
        s.set_timesteps(10)
        s.sigmas = s.sigmas.to(torch.float64)
        return s

    own = scheduler()
    assert 0 < 1 - own.sigmas[0] < 1.1e-6
    from_below = run_scheduler(own, velocity, x, _times(own.sigmas.numpy()))
    at_one = scheduler()
    at_one.sigmas[0] = 1.0
    ts = jnp.asarray(_times(at_one.sigmas.numpy()))
    ours = jdiffsample.sample(den, x, ts, SCH, "unipc", order=order, variant="bh2")
    if order < 3:
        assert _relative(ours, run_scheduler(at_one, velocity, x, ts)) < 1e-12
    else:
        assert not np.all(np.isfinite(run_scheduler(at_one, velocity, x, ts)))
    assert _relative(ours, from_below) < 3e-4


# ------------------------------------------------------------------------------------------------
# Every solver: gradients, model calls, convergence, the distribution


GRAD_CASES = [("heun", {}), ("sa_solver", dict(tau=0.5)), ("deis", dict(variant="tab")), ("deis", dict(variant="logrho"))]


@pytest.mark.parametrize("solver,options", GRAD_CASES, ids=str)
def test_gradients_from_one(mixture, solver, options):
    """The grid stays differentiable: with respect to the interior times the gradient equals finite
    differences, and with respect to the first (t = 1) and last (t = 0) it is finite. (The model's time
    is held below 0.999 here: the mixture's own derivative in t is -inf at t = 1, where its alpha'
    is.) One case per kind of first step: Heun's, corrected and stochastic (SA-Solver: bh1's exact
    limit, the noise's), noise-prediction with a polynomial in t (the node at t = 1 kept) and in
    lambda (dropped)."""
    inner = mixture.denoiser(SCH)
    den = lambda y, t: inner(y, jnp.minimum(t, 0.999))  # noqa: E731
    x = mixture.sample_marginal(jax.random.key(1), 3, 1.0, SCH, dtype=jnp.float64)
    ts0 = jnp.asarray(timesteps.uniform_t(schedules.RectifiedFlow(t_max=1.0), 5, t_end=0.0))
    target = mixture.sample(jax.random.key(9), 3, dtype=jnp.float64)
    key = jax.random.key(3) if registry.get(solver).needs_key(options) else None
    check_grad_wrt_times(lambda ts: solvers.SOLVERS[solver](den, x, ts, SCH, key=key, **options), ts0, target,
                         ends=True)


def test_heun_from_one_costs_one_call_less(mixture):
    """Heun's first step from the noise is an Euler step, as its last into sigma = 0: 2N - 2 model
    calls here, as the registry counts them; the grid for an NFE follows."""
    calls = []
    inner = mixture.denoiser(SCH)

    def den(y, t):
        jax.debug.callback(lambda: calls.append(1))
        return inner(y, t)

    x = mixture.sample_marginal(jax.random.key(1), 2, 1.0, SCH, dtype=jnp.float64)
    info = registry.get("heun")
    jax.block_until_ready(solvers.SOLVERS["heun"](den, x, jnp.asarray([1.0, 0.7, 0.4, 0.0]), SCH))
    assert len(calls) == 4 == info.nfe(3, final_zero=True, first_noise=True)
    assert info.nfe(3, False, first_noise=True) == 5 and info.nfe(3, True) == 5 and info.nfe(3) == 6
    assert info.nfe(1, True, first_noise=True) == 1 and registry.get("unipc").nfe(3, True, True) == 3
    assert info.steps_for_nfe(5, zero_end=True, first_noise=True) == (3, False)
    assert info.steps_for_nfe(6, zero_end=True, first_noise=True) == (4, True)
    assert info.steps_for_nfe(5, zero_end=True) == (3, True)


@pytest.fixture(scope="module")
def fine(flow):
    """Grids from t = 1 whose steps all shrink like 1 / N: uniform in t down to 0.5, uniform in lambda
    below; the reference is SA-Solver(4, 4) on 4000 steps."""
    _, den, x = flow

    def grid(n):
        return np.concatenate([np.linspace(1.0, 0.5, n // 2 + 1), timesteps.logsnr(SCH, n // 2, 0.5, 1e-3)[1:]])

    with schedules.float64():
        ref = jdiffsample.sample(den, x, grid(4000), SCH, "sa_solver", tau=0.0, predictor_order=4,
                                 corrector_order=4, lower_order_final=False)
    return grid, ref


@pytest.mark.parametrize("solver,options,order", [
    ("heun", {}, 2),
    ("unipc", dict(order=2, variant="bh2", lower_order_final=False), 3),
    ("deis", dict(order=3, variant="logrho", lower_order_final=False), 3),
], ids=str)
def test_convergence_order_from_one(flow, fine, solver, options, order):
    """The limits keep each method's order (a wrong one costs it): slopes from 64 to 256 steps,
    measured 2.02 (Heun), 2.97 (UniPC-2 bh2), 2.92 (DEIS log-rho 3, which drops its node at
    lambda = -inf)."""
    _, den, x = flow
    grid, ref = fine
    errors = [float(jnp.sqrt(jnp.mean((jdiffsample.sample(den, x, grid(n), SCH, solver, **options) - ref) ** 2)))
              for n in (64, 256)]
    slope = -np.log(errors[1] / errors[0]) / np.log(4)
    assert abs(slope - order) < 0.3, (errors, slope)


def test_samples_from_pure_noise_have_the_mixture_moments(mixture):
    """From N(0, I) at t = 1 (the exact start) to t = 0 with UniPC-3 (bh1, whose first corrector takes
    the exact limit) on 30 steps."""
    n = 20000
    x = jax.random.normal(jax.random.key(7), (n, mixture.dim), jnp.float64)
    ts = timesteps.uniform_t(schedules.RectifiedFlow(shift=SHIFT, t_max=1.0), 30, t_end=0.0)
    out = np.asarray(jdiffsample.sample(mixture.denoiser(SCH), x, ts, SCH, "unipc"))
    mean, cov = mixture.mean(), mixture.covariance()
    assert np.all(np.abs(out.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n) + 0.01)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(np.cov(out.T) - cov) < 5 * se_cov + 0.02)

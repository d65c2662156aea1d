"""Schedules, grids and denoiser adapters against closed forms and diffusers' tables."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

from jdiffsample import guidance, models, schedules, testing, timesteps


@pytest.fixture(autouse=True)
def float64():
    with schedules.float64():
        yield


ALL = [schedules.VPLinear(), schedules.VPCosine(), schedules.VPDiscrete.linear(), schedules.VE()]


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_lambda_inverse_and_grad(sch):
    t = jnp.linspace(sch.t_min, sch.t_max, 101)
    lam = sch.lam(t)
    assert bool(jnp.all(jnp.diff(lam) < 0))  # lambda decreases with t
    np.testing.assert_allclose(sch.t_from_lam(lam), t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lam, jnp.log(sch.alpha(t)) - jnp.log(sch.sigma(t)), rtol=1e-10, atol=1e-10)
    if not sch.is_ve:
        np.testing.assert_allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, 1.0, rtol=1e-12)
    grads = jax.vmap(jax.grad(lambda x: sch.t_from_lam(sch.lam(x))))(t[1:-1])
    np.testing.assert_allclose(grads, 1.0, rtol=1e-6)


def test_vp_linear_closed_form():
    sch = schedules.VPLinear(0.1, 20.0)
    t = np.linspace(1e-3, 1, 7)
    log_mean_coeff = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1  # ScoreSDE's marginal
    np.testing.assert_allclose(sch.alpha(t), np.exp(log_mean_coeff), rtol=1e-12)


def test_vp_cosine_closed_form():
    sch = schedules.VPCosine()
    t = np.linspace(1e-3, 0.99, 7)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(sch.alpha(t) ** 2, f(t) / f(0.0), rtol=1e-10)


def test_vp_discrete_matches_diffusers_tables():
    diffusers = require("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double().numpy()
    sch = schedules.VPDiscrete.linear()
    n = np.arange(1000)
    np.testing.assert_allclose(sch.alpha((n + 1) / 1000.0) ** 2, ref, rtol=1e-6)
    np.testing.assert_allclose(sch.model_time((n + 1) / 1000.0), n, atol=1e-9)


def test_vp_discrete_validation():
    with pytest.raises(ValueError, match="decrease strictly"):
        schedules.VPDiscrete(np.array([0.5, 0.9]))
    with pytest.raises(ValueError, match="betas"):
        schedules.VPDiscrete.from_betas(np.array([0.1, 1.5]))


@pytest.mark.parametrize("sch", ALL, ids=repr)
@pytest.mark.parametrize("grid", sorted(timesteps.GRIDS))
def test_grids_decrease_with_exact_endpoints(sch, grid):
    ts = timesteps.get(grid, sch, 10)
    assert ts.shape == (11,)
    assert np.all(np.diff(ts) < 0)
    assert ts[0] == sch.t_max and ts[-1] == sch.t_min


def test_logsnr_grid_is_uniform_in_lambda():
    sch = schedules.VPCosine()
    lam = np.asarray(sch.lam(timesteps.logsnr(sch, 9)))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-8)


def test_karras_grid_is_edm():
    ts = timesteps.karras(schedules.VE(), 18, final_zero=True)
    i = np.arange(18)
    edm = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM's formula
    np.testing.assert_allclose(ts[:-1], edm, rtol=1e-12)
    assert ts[-1] == 0.0
    with pytest.raises(ValueError, match="VE"):
        timesteps.karras(schedules.VPLinear(), 5, final_zero=True)


def test_grid_errors():
    sch = schedules.VPLinear()
    with pytest.raises(ValueError, match="positive integer"):
        timesteps.logsnr(sch, 0)
    with pytest.raises(ValueError, match="larger than"):
        timesteps.logsnr(sch, 5, t_start=0.1, t_end=0.5)
    with pytest.raises(ValueError, match="outside the domain"):
        timesteps.uniform_t(sch, 5, t_start=2.0)
    with pytest.raises(ValueError, match="unknown grid"):
        timesteps.get("cosine", sch, 5)


@pytest.mark.parametrize("sch", [schedules.VPLinear(), schedules.VPCosine()], ids=repr)
def test_adapters_round_trip(sch):
    gmm = testing.GaussianMixture.random(jax.random.key(0), 6, 3)
    exact = gmm.denoiser(sch)
    x = gmm.sample_marginal(jax.random.key(1), 5, 0.4, sch, dtype=jnp.float64)
    t = jnp.asarray(0.4)
    x0 = exact(x, t)
    a, s = sch.alpha(t), sch.sigma(t)
    eps = (x - a * x0) / s
    v = a * eps - s * x0
    np.testing.assert_allclose(models.from_eps(lambda x, t: eps, sch)(x, t), x0, rtol=1e-10)
    np.testing.assert_allclose(models.from_v(lambda x, t: v, sch)(x, t), x0, rtol=1e-10)
    np.testing.assert_allclose(models.from_x0(exact)(x, t), x0, rtol=1e-12)
    # EDM preconditioned view: D(x / alpha; sigma / alpha) is the same posterior mean.
    edm_view = gmm.denoiser(schedules.VE())
    np.testing.assert_allclose(models.from_edm(edm_view, sch)(x, t), x0, rtol=1e-8)
    # Guidance: scale 1 is the conditional model, 0 the unconditional one, 2 extrapolates past it.
    other = gmm.denoiser(schedules.VE())  # another denoiser, nonzero, unlike the conditional one
    u = other(x, t)
    assert np.abs(u).min() > 1e-3 and np.abs(u - x0).min() > 1e-3
    np.testing.assert_allclose(guidance.guided(exact, other, 1.0)(x, t), x0, rtol=1e-12)
    np.testing.assert_allclose(guidance.guided(exact, other, 0.0)(x, t), u, rtol=1e-12)
    np.testing.assert_allclose(guidance.guided(exact, other, 2.0)(x, t), 2 * x0 - u, rtol=1e-10)


def test_gaussian_mixture_denoiser_is_the_posterior_mean():
    # Monte Carlo: E[x0 | x_t] by importance weighting exact samples near one x_t.
    sch = schedules.VPLinear()
    gmm = testing.GaussianMixture(np.array([0.3, 0.7]), np.array([[-1.0], [2.0]]), np.array([0.2, 0.5]))
    t = jnp.asarray(0.3)
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    x0 = np.asarray(gmm.sample(jax.random.key(0), 400000, dtype=jnp.float64))[:, 0]
    xt = 0.5
    w = np.exp(-0.5 * (xt - a * x0) ** 2 / s**2)
    mc = float(np.sum(w * x0) / np.sum(w))
    exact = float(gmm.denoiser(sch)(jnp.array([[xt]]), t)[0, 0])
    assert abs(mc - exact) < 0.01
    assert math.isclose(float(gmm.mean()[0]), 0.3 * -1 + 0.7 * 2)

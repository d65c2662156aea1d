"""Tests for jdiffsample.optimize: the error bound of Xue et al. (2024), its minimizer, learned grids."""

import contextlib
import io
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiffsample import cli, learn, optimize, sample, schedules, testing, timesteps

SCHEDULES = {
    "vp-linear": schedules.VPLinear(),
    "vp-cosine": schedules.VPCosine(),
    "vp-discrete": schedules.VPDiscrete.linear(),
    "ve": schedules.VE(),
}


def _lams(schedule, ts):
    with schedules.float64():
        return np.asarray(schedule.lam(jnp.asarray(ts, jnp.float64)), np.float64)


# --------------------------------------------------------------------------------------------
# An independent NumPy evaluation of the bound: Lagrange weights by Gauss-Legendre quadrature


_GL_X, _GL_W = np.polynomial.legendre.leggauss(40)


def numpy_bound(lams, order=3, p=1, trunc=None, paper=False, ve=False):
    """The bound of Xue et al. as the authors' code computes it (or the paper's equation), in NumPy.

    Step s integrates e^lam times the Lagrange interpolant through its k_s = min(order, s + 1, N - s)
    latest nodes; the weight of node i is the quadrature of e^lam times its basis polynomial.
    """
    lams = np.asarray(lams, np.float64)
    n = len(lams) - 1
    trunc = (3 if n <= 6 else 0) if trunc is None else trunc
    if ve:
        err = np.exp(-p * lams)
    else:
        sigma, alpha = 1 / np.sqrt(1 + np.exp(2 * lams)), 1 / np.sqrt(1 + np.exp(-2 * lams))
        err = sigma**p / alpha
    steps = np.arange(n)
    k = np.minimum(np.minimum(order, steps + 1), n - steps)
    node = np.maximum(steps[:, None] - 2 + np.arange(3), 0)  # [N, 3]: slots for nodes s-2, s-1, s
    active = np.arange(3) >= 3 - k[:, None]
    lo, hi = lams[:-1, None], lams[1:, None]
    u = 0.5 * (hi - lo) * _GL_X + 0.5 * (hi + lo)  # [N, Q] quadrature points of each step
    lam_node = lams[node]
    basis = np.ones((n, 3, len(_GL_X)))
    for j in range(3):
        for m in range(3):
            if m != j:
                use = (active[:, m] & active[:, j])[:, None]
                denom = np.where(use, lam_node[:, j, None] - lam_node[:, m, None], 1.0)
                basis[:, j] *= np.where(use, (u - lam_node[:, m, None]) / denom, 1.0)
    w = 0.5 * (hi - lo) * np.sum(_GL_W * np.exp(u)[:, None, :] * basis, axis=-1)
    terms = np.where(active, err[node] * w, 0.0)
    separate = ((steps == 0) | (steps == n - 1)) & (not paper)
    rss = ~separate & (steps < trunc) & (not paper)
    into_totals = ~separate & ~rss
    totals = np.bincount(node[into_totals].ravel(), terms[into_totals].ravel(), minlength=n)
    return (np.sum(np.abs(terms[separate])) + np.sum(np.sqrt(np.sum(terms[rss] ** 2, axis=1)))
            + np.sum(np.abs(totals)))


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_objective_matches_numpy(n):
    rng = np.random.default_rng(n)
    cases = [
        dict(), dict(p=2), dict(order=2), dict(order=1), dict(trunc=0), dict(trunc=3), dict(trunc=n),
        dict(paper=True), dict(p=2, ve=True), dict(ve=True, paper=True, order=2),
    ]
    with schedules.float64():
        for case in cases:
            lams = np.sort(rng.uniform(-5.0, 5.0, n + 1))
            lams += 0.05 * np.arange(n + 1)  # keep the gaps away from 0
            kwargs = {k: v for k, v in case.items() if k != "ve"}
            got = float(optimize.surrogate_objective(
                lams, schedule=schedules.VE() if case.get("ve") else None, **kwargs
            ))
            np.testing.assert_allclose(got, numpy_bound(lams, **case), rtol=1e-9, err_msg=str(case))


def test_objective_is_differentiable():
    lams = np.linspace(-5.0, 4.5, 9)
    with schedules.float64():
        grad = jax.grad(lambda l: optimize.surrogate_objective(l))(jnp.asarray(lams))
        step = 1e-6
        fd = [
            (numpy_bound(lams + step * e) - numpy_bound(lams - step * e)) / (2 * step) for e in np.eye(len(lams))
        ]
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-6, atol=1e-6)


def test_objective_rejects_bad_arguments():
    with pytest.raises(ValueError, match="trunc"):
        optimize.surrogate_objective(np.linspace(0, 1, 6), trunc=2, paper=True)
    with pytest.raises(ValueError, match="order"):
        optimize.surrogate_objective(np.linspace(0, 1, 6), order=4)


# --------------------------------------------------------------------------------------------
# optimize_timesteps


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_optimized_grid_is_valid_for_every_schedule(name):
    schedule = SCHEDULES[name]
    for init, t_start, t_end in [("logsnr", None, None), ("karras", 0.8 * schedule.t_max, 2.0 * schedule.t_min)]:
        base = timesteps.get(init, schedule, 5, t_start=t_start, t_end=t_end)
        res = optimize.optimize_timesteps(schedule, 5, t_start, t_end, init=init)
        assert res.ts.shape == (6,) and np.all(np.diff(res.ts) < 0)
        assert res.ts[0] == base[0] and res.ts[-1] == base[-1]
        assert np.all(np.diff(res.lams) > 0)
        np.testing.assert_allclose(_lams(schedule, res.ts), res.lams, atol=1e-6)
        assert res.objective < res.init_objective


def test_ve_grid_matches_the_reference_implementation():
    """EDM endpoints, p = 1, N = 5: the authors' optimum as reproduced in the reference notes."""
    res = optimize.optimize_timesteps(schedules.VE(), 5)
    np.testing.assert_allclose(res.ts, [80.0, 3.063, 1.114, 0.374, 0.0723, 0.002], rtol=2e-3)
    np.testing.assert_allclose([res.init_objective, res.objective], [428.6, 102.2], rtol=1e-3)


def test_first_order_optimum_is_uniform_logsnr():
    """For order 1 and p = 1 the bound is sum_s (e^{h_s} - 1), convex with its minimum at equal gaps."""
    schedule = schedules.VPLinear()
    res = optimize.optimize_timesteps(schedule, 5, order=1, init="karras")
    np.testing.assert_allclose(res.lams, _lams(schedule, timesteps.logsnr(schedule, 5)), atol=1e-5)


def scipy_reference(schedule, n, init):
    """The authors' method: trust-constr, finite differences, linear monotonicity constraint."""
    from scipy.optimize import LinearConstraint, minimize

    lams0 = _lams(schedule, timesteps.get(init, schedule, n))

    def fun(inner):
        return numpy_bound(np.concatenate([lams0[:1], inner, lams0[-1:]]), ve=schedule.is_ve)

    diff = np.zeros((n, n - 1))
    diff[np.arange(n - 1), np.arange(n - 1)] = 1.0
    diff[np.arange(1, n), np.arange(n - 1)] = -1.0
    lower = np.zeros(n)
    lower[0], lower[-1] = lams0[0], -lams0[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "delta_grad == 0.0" from the quasi-Newton update
        out = minimize(fun, lams0[1:-1], method="trust-constr",
                       constraints=[LinearConstraint(diff, lower, np.full(n, np.inf))])
    return out.fun


@pytest.mark.parametrize("name,n,init", [("vp-linear", 5, "uniform"), ("ve", 5, "karras"), ("vp-cosine", 8, "logsnr")])
def test_as_low_as_scipy_trust_constr(name, n, init):
    schedule = SCHEDULES[name]
    ours = optimize.optimize_timesteps(schedule, n, init=init)
    assert ours.objective <= scipy_reference(schedule, n, init) * (1 + 1e-6)
    with schedules.float64():  # the reported objective is the bound of the returned grid
        assert float(optimize.surrogate_objective(ours.lams, schedule=schedule)) == pytest.approx(ours.objective)


def test_jaxopt_method_reaches_the_same_grid():
    """``method='jaxopt'`` runs jaxopt.ProjectedGradient itself: the grid and the iteration count of
    the default lax loop (which follows it iterate for iterate, tests/test_performance.py)."""
    ours = optimize.optimize_timesteps(schedules.VPLinear(), 6, init="uniform")
    theirs = optimize.optimize_timesteps(schedules.VPLinear(), 6, init="uniform", method="jaxopt")
    np.testing.assert_allclose(theirs.lams, ours.lams, rtol=0, atol=1e-9)
    assert theirs.iterations == ours.iterations and theirs.objective == pytest.approx(ours.objective, rel=1e-9)


def test_optimize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method 'scipy'; choose 'pg' or 'jaxopt'"):
        optimize.optimize_timesteps(schedules.VPLinear(), 5, method="scipy")
    with pytest.raises(ValueError, match="init"):
        optimize.optimize_timesteps(schedules.VPLinear(), 5, init="sigmoid")
    with pytest.raises(ValueError, match="min_gap"):
        optimize.optimize_timesteps(schedules.VPLinear(), 5, min_gap=5.0)


def test_cli_prints_the_grid_as_json():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["steps", "--schedule", "ve", "--nfe", "5"]) == 0
    got = json.loads(out.getvalue())
    assert len(got["times"]) == 6 and got["times"][0] == 80.0 and got["times"][-1] == 0.002
    assert got["settings"]["trunc"] == 3 and got["objective"] == pytest.approx(102.2, rel=1e-3)


# --------------------------------------------------------------------------------------------
# On a Gaussian mixture: the bound's grids and learned grids against a fine-grid reference


REFERENCE_STEPS = 300


@pytest.fixture(scope="module")
def mixture_setup():
    """VP-linear, a 64-d mixture of 8 components; training and held-out noises; the reference solution
    of the held-out ones (UniPC-3 on REFERENCE_STEPS logSNR steps)."""
    schedule = schedules.VPLinear()
    keys = jax.random.split(jax.random.key(0), 3)
    mixture = testing.GaussianMixture.random(keys[0], 64, 8)
    with schedules.float64():
        denoise = mixture.denoiser(schedule)
        train, held = (mixture.sample_marginal(k, 128, 1.0, schedule, dtype=jnp.float64) for k in keys[1:])
        reference = sample(denoise, held, timesteps.logsnr(schedule, REFERENCE_STEPS), schedule, "unipc", order=3)
    return schedule, denoise, train, held, reference


def _rmse(setup, ts):
    schedule, denoise, _, held, reference = setup
    with schedules.float64():
        out = sample(denoise, held, jnp.asarray(ts), schedule, "unipc", order=3)
        return float(jnp.sqrt(jnp.mean(jnp.square(out - reference))))


@pytest.mark.parametrize("n", [5, 6, 8, 10])
def test_bound_grid_beats_logsnr_on_mixture(mixture_setup, n):
    schedule = mixture_setup[0]
    optimized = optimize.optimize_timesteps(schedule, n).ts
    assert _rmse(mixture_setup, optimized) < _rmse(mixture_setup, timesteps.logsnr(schedule, n))


def test_learned_grid_beats_both_on_held_out_noise(mixture_setup, capsys):
    schedule, denoise, train, held, _ = mixture_setup
    n = 6
    logsnr = timesteps.logsnr(schedule, n)
    with schedules.float64():
        res = learn.learn_timesteps(
            denoise, schedule, "unipc", train, logsnr, holdout=held, teacher_steps=REFERENCE_STEPS, maxiter=20,
            log_every=10, verbose=True, order=3,
        )
    assert "held-out mse" in capsys.readouterr().out
    assert np.all(np.diff(res.ts) < 0) and res.ts[0] == logsnr[0] and res.ts[-1] == logsnr[-1]
    assert res.train_error < res.init_train_error and res.holdout_error < res.init_holdout_error
    assert [h[0] for h in res.history] == [0, 10, 20]
    learned = _rmse(mixture_setup, res.ts)
    assert learned < _rmse(mixture_setup, optimize.optimize_timesteps(schedule, n).ts)
    assert learned < _rmse(mixture_setup, logsnr)


def test_learned_loss_gradient_matches_finite_differences():
    schedule = schedules.VPLinear()
    mixture = testing.GaussianMixture.random(jax.random.key(1), 8, 3)
    with schedules.float64():
        denoise = mixture.denoiser(schedule)
        noise = mixture.sample_marginal(jax.random.key(2), 4, 1.0, schedule, dtype=jnp.float64)
        target = mixture.sample(jax.random.key(3), 4, dtype=jnp.float64)
        ts = jnp.asarray(timesteps.logsnr(schedule, 5))

        @jax.jit
        @jax.value_and_grad
        def loss(inner):
            grid = jnp.concatenate([ts[:1], inner, ts[-1:]])
            return learn.learned_loss(grid, denoise, schedule, "unipc", noise, target, order=3)

        inner = ts[1:-1]
        grad = np.asarray(loss(inner)[1])
        fd = []
        for e in np.eye(len(inner)):
            step = 1e-6 * e * np.asarray(inner)
            fd.append((float(loss(inner + step)[0]) - float(loss(inner - step)[0])) / (2 * np.sum(step)))
    np.testing.assert_allclose(grad, fd, rtol=1e-5)

"""Solver core: convergence orders, closed forms, stochastic moments, transforms and input errors.

References are independent of the code under test: the exact Gaussian-mixture posterior mean and
moments, a fine-grid solution by a different solver configuration, finite differences, and
coefficient values from the research notes' own NumPy scripts.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import check_grad_wrt_times

import jdiffsample
from jdiffsample import schedules, solvers, testing, timesteps
from jdiffsample.solvers import core, registry


pytestmark = pytest.mark.usefixtures("float64")


def _gmm(dim=64, k=4, seed=0, var=(0.2, 0.6)):
    return testing.GaussianMixture.random(jax.random.key(seed), dim, k, var_range=var)


# ------------------------------------------------------------------------------------------------
# Convergence order

# (solver, options, (lowest, highest) global order). Warm-up starts every multistep method at order 1
# (UniPC: order 1 plus its corrector), which caps the asymptotic order at 3 for UniPC-3 and
# SA-Solver(3, 3), whose nominal order is 4: the measured slope must lie in that range. DPM-Solver++
# (3M) as the other libraries compute it is second order.
ORDER_CASES = [
    ("ddim", {}, (1, 1)),
    ("euler", {}, (1, 1)),
    ("heun", {}, (2, 2)),
    ("dpmpp", dict(order=2), (2, 2)),
    ("dpmpp", dict(order=3, lower_order_final=False), (2, 2)),
    ("unipc", dict(order=1, lower_order_final=False), (2, 2)),
    ("unipc", dict(order=2, lower_order_final=False), (3, 3)),
    ("unipc", dict(order=3, lower_order_final=False, variant="bh2"), (3, 4)),
    ("sa_solver", dict(tau=0.0, predictor_order=3, corrector_order=3, lower_order_final=False), (3, 4)),
]


@pytest.fixture(scope="module")
def order_problem():
    with schedules.float64():
        sch = schedules.VPLinear()
        gmm = testing.GaussianMixture.random(jax.random.key(0), 64, 4, spread=0.5, var_range=(0.2, 0.6))
        den = gmm.denoiser(sch)
        x0 = gmm.sample_marginal(jax.random.key(1), 4, sch.t_max, sch, dtype=jnp.float64)
        ref = jdiffsample.sample(
            den, x0, timesteps.logsnr(sch, 800), sch, solver="sa_solver", tau=0.0,
            predictor_order=4, corrector_order=4, lower_order_final=False,
        )
        # Cross-checks: EDM's Heun (separate code, second order) and UniPC-3 on the same fine grid.
        heun = jdiffsample.sample(den, x0, timesteps.logsnr(sch, 800), sch, solver="heun")
        assert float(jnp.max(jnp.abs(ref - heun))) < 2e-4
        unipc = jdiffsample.sample(
            den, x0, timesteps.logsnr(sch, 800), sch, solver="unipc", order=3, lower_order_final=False
        )
        assert float(jnp.max(jnp.abs(ref - unipc))) < 1e-6
        return sch, den, x0, ref


@pytest.mark.parametrize("solver,options,expected", ORDER_CASES, ids=lambda v: str(v))
def test_convergence_order(order_problem, solver, options, expected):
    sch, den, x0, ref = order_problem
    steps = [32, 45, 64, 90]
    errors = []
    for n in steps:
        x = jdiffsample.sample(den, x0, timesteps.logsnr(sch, n), sch, solver=solver, **options)
        errors.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    lowest, highest = expected
    assert lowest - 0.3 < slope < highest + 0.3, (errors, slope)


# ------------------------------------------------------------------------------------------------
# Coefficients


def test_moments_match_quadrature():
    z = np.array([1e-6, 1e-3, 0.3, 0.99, 1.0, 1.01, 2.5, 10.0])
    g = np.asarray(core.moments(jnp.asarray(z), 5))
    u = np.linspace(0.0, 1.0, 200001)
    for i, zi in enumerate(z):
        for k in range(5):
            ref = np.trapezoid(np.exp(-zi * (1 - u)) * u**k, u)
            assert abs(g[i, k] - ref) < 1e-9 * max(1.0, abs(ref)) + 1e-10


def test_moments_float32_accuracy():
    z = np.geomspace(1e-4, 20, 50)
    with schedules.float64():
        ref = np.asarray(core.moments(jnp.asarray(z, jnp.float64), 4))
    with jax.enable_x64(False):
        got = np.asarray(core.moments(jnp.asarray(z, jnp.float32), 4))
    assert got.dtype == np.float32
    assert np.max(np.abs(got - ref) / np.abs(ref)) < 2e-5


def _weights(lam_nodes, lam_s, lam_t, order, tau_sq):
    """Data-prediction Adams weights in VP coordinates from the core's pieces."""
    h = lam_t - lam_s
    z = (1 + tau_sq) * h
    r = (jnp.asarray(lam_nodes) - lam_s) / h
    g = core.moments(z, len(lam_nodes))
    alpha_t = jnp.sqrt(jax.nn.sigmoid(2 * lam_t))
    return alpha_t * z * core.node_weights(r, order, g)


def test_golden_weights_from_notes():
    # EDM sigmas 6.0, 2.5, 1.1 -> 0.45 (VP coordinates); values from the research notes' scripts.
    lam = lambda s: -math.log(s)  # noqa: E731
    pred = _weights([lam(1.1), lam(2.5), lam(6.0)], lam(1.1), lam(0.45), 3, 0.0)
    np.testing.assert_allclose(pred, [1.1645827173, -0.8969746116, 0.2712546019], rtol=1e-8)
    corr = _weights([lam(0.45), lam(1.1), lam(2.5), lam(6.0)], lam(1.1), lam(0.45), 4, 1.0)
    np.testing.assert_allclose(corr, [0.39188891, 0.5070033115, -0.1732087751, 0.0336230961], rtol=1e-7)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("tau_sq", [0.0, 0.49, 1.0])
def test_weights_integrate_polynomials_exactly(order, tau_sq):
    # The weights integrate every polynomial of degree < order in lambda exactly against the kernel.
    lam_s, lam_t = 0.3, 0.9
    nodes = [0.3, -0.1, -0.6, -1.4][:order]
    w = np.asarray(_weights(nodes, lam_s, lam_t, order, tau_sq))
    c, alpha_t = 1 + tau_sq, math.sqrt(1 / (1 + math.exp(-2 * lam_t)))
    grid = np.linspace(lam_s, lam_t, 400001)
    for degree in range(order):
        f = lambda lam: (lam - 0.2) ** degree  # noqa: E731
        exact = c * alpha_t * np.trapezoid(np.exp(-c * (lam_t - grid)) * f(grid), grid)
        assert abs(w @ f(np.asarray(nodes)) - exact) < 1e-8


# ------------------------------------------------------------------------------------------------
# Special cases and identities


def test_euler_is_ddim_and_unipc1_without_corrector_is_ddim():
    sch = schedules.VE()
    gmm = _gmm(dim=16)
    den = gmm.denoiser(sch)
    x = gmm.sample_marginal(jax.random.key(2), 8, 80.0, sch, dtype=jnp.float64)
    ts = timesteps.karras(sch, 12)
    a = jdiffsample.sample(den, x, ts, sch, solver="ddim")
    b = jdiffsample.sample(den, x, ts, sch, solver="euler")
    c = jdiffsample.sample(den, x, ts, sch, solver="unipc", order=1, corrector=False)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", [schedules.VE(), schedules.RectifiedFlow(shift=3.0)], ids=["ve", "flow"])
@pytest.mark.parametrize("solver", registry.names())
def test_final_sigma_zero_returns_data_prediction(solver, schedule):
    """Every registered solver: a last step into sigma = 0 returns the data prediction of the last
    model call, which every solver makes at the last nonzero time. The denoiser returns a marker K
    exactly there (the mixture's posterior mean elsewhere), so the output must be K. On VE (EDM's
    Karras grid) and on a flow, from t = 1 (the noise: a first step that takes its limit) to t = 0;
    the learned solvers, which refuse t = 1, from the schedule's t_max."""
    gmm = _gmm(dim=16)
    inner = gmm.denoiser(schedule)
    if schedule.is_ve:
        ts = timesteps.karras(schedule, 8, final_zero=True)
    else:
        start = 1.0 if registry.get(solver).noise_start else schedule.t_max
        ts = timesteps.uniform_t(schedules.RectifiedFlow(shift=3.0, t_max=start), 8, t_end=0.0)
    x = gmm.sample_marginal(jax.random.key(3), 8, ts[0], schedule, dtype=jnp.float64)
    marker = jax.random.normal(jax.random.key(4), x.shape, jnp.float64)

    def den(y, t):
        return jnp.where(t == ts[-2], marker, inner(y, t))

    options = registry.get(solver).deterministic()
    traj = jdiffsample.sample(den, x, ts, schedule, solver=solver, return_trajectory=True, **options)
    assert traj.shape == (9, *x.shape)
    np.testing.assert_allclose(traj[-1], marker, rtol=1e-12, atol=1e-12)
    assert bool(jnp.all(jnp.isfinite(traj)))
    assert float(jnp.max(jnp.abs(traj[-2] - marker))) > 0.1  # the state before the last step is not K


def test_ddim_eta1_matches_ddpm_posterior_step():
    # One DDIM(eta=1) step with a constant denoiser: the output law is the exact DDPM posterior.
    sch = schedules.VPLinear()
    x0_const = jnp.full((1, 3), 0.7)
    den = lambda x, t: jnp.broadcast_to(x0_const, x.shape)  # noqa: E731
    n = 200000
    x = jnp.zeros((n, 3))
    ts = jnp.array([0.8, 0.5])
    out = solvers.SOLVERS["ddim"](den, x, ts, sch, eta=1.0, key=jax.random.key(0))
    a_s, s_s, a_t, s_t = (float(f(t)) for t in (0.8, 0.5) for f in (sch.alpha, sch.sigma))
    # DDPM posterior q(x_t | x_s = 0, x0): mean a_t (1 - SNR_s/SNR_t) x0, variance s_t^2 (1 - SNR_s/SNR_t).
    snr_ratio = (a_t * s_s) ** 2 / (a_s * s_t) ** 2  # SNR_t / SNR_s
    mean = a_t * (1 - 1 / snr_ratio) * 0.7
    var = s_t**2 * (1 - 1 / snr_ratio)
    assert abs(float(out.mean()) - mean) < 5 * math.sqrt(var / (3 * n))
    assert abs(float(out.var()) - var) < 0.01 * var


# ------------------------------------------------------------------------------------------------
# Stochastic samplers reproduce the data distribution


@pytest.mark.parametrize(
    "solver,options",
    [
        ("sa_solver", dict(tau=1.0)),
        ("sa_solver", dict(predictor_order=2, corrector_order=2)),  # the paper's default tau window
        ("ddim", dict(eta=1.0)),  # first order: its variance bias is 15% at 40 steps, 2% at 400
        ("heun", dict(s_churn=20.0, s_tmin=0.05, s_tmax=1.0)),
    ],
    ids=str,
)
def test_stochastic_moments(solver, options):
    sch = schedules.VPLinear()
    gmm = _gmm(dim=4, k=3, seed=5, var=(0.3, 0.8))
    den = gmm.denoiser(sch)
    n = 20000
    x = gmm.sample_marginal(jax.random.key(7), n, sch.t_max, sch, dtype=jnp.float64)
    ts = timesteps.logsnr(sch, 400 if solver == "ddim" else 40)
    out = np.asarray(jdiffsample.sample(den, x, ts, sch, solver=solver, key=jax.random.key(11), **options))
    mean, cov = gmm.mean(), gmm.covariance()
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(out.mean(0) - mean) < 5 * se_mean + 0.01), (out.mean(0), mean)
    emp = np.cov(out.T)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(emp - cov) < 5 * se_cov + 0.02), (emp, cov)


def test_per_sample_keys_do_not_depend_on_batching():
    sch = schedules.VPLinear()
    gmm = _gmm(dim=8)
    den = gmm.denoiser(sch)
    x = gmm.sample_marginal(jax.random.key(1), 6, sch.t_max, sch, dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(3), 6)
    ts = timesteps.logsnr(sch, 6)
    full = jdiffsample.sample(den, x, ts, sch, solver="sa_solver", key=keys)
    part = jdiffsample.sample(den, x[2:5], ts, sch, solver="sa_solver", key=keys[2:5])
    np.testing.assert_allclose(full[2:5], part, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# jit / vmap / grad


ALL = [
    ("ddim", {}),
    ("euler", {}),
    ("heun", {}),
    ("dpmpp", dict(order=3)),
    ("unipc", dict(order=3)),
    ("sa_solver", dict(tau=0.0)),
    ("deis", dict(variant="tab")),  # the quadrature moments
    ("ipndm", dict(variable_step=True)),
]


@pytest.mark.parametrize("solver,options", ALL, ids=str)
def test_compiles_once_per_configuration(solver, options):
    sch = schedules.VPLinear()
    gmm = _gmm(dim=8)
    inner = gmm.denoiser(sch)
    traces = []

    def den(x, t):
        traces.append(1)
        return inner(x, t)

    x = gmm.sample_marginal(jax.random.key(1), 4, sch.t_max, sch, dtype=jnp.float64)
    counts = []
    for n_extra in range(3):  # new grid values and new states, same configuration: no new trace
        ts = timesteps.logsnr(sch, 6, t_end=1e-3 * (1 + n_extra))
        jdiffsample.sample(den, x + n_extra, ts, sch, solver=solver, **options)
        counts.append(len(traces))
    assert counts[0] > 0 and counts[0] == counts[1] == counts[2]
    jdiffsample.sample(den, x, timesteps.logsnr(sch, 7), sch, solver=solver, **options)
    assert len(traces) > counts[-1]  # another N is another program


@pytest.mark.parametrize("solver,options", ALL, ids=str)
def test_vmap_matches_loop(solver, options):
    sch = schedules.VPLinear()
    gmm = _gmm(dim=8)
    den = gmm.denoiser(sch)
    xs = gmm.sample_marginal(jax.random.key(1), 6, sch.t_max, sch, dtype=jnp.float64).reshape(3, 2, 8)
    ts = jnp.asarray(timesteps.logsnr(sch, 5))
    fn = lambda x: solvers.SOLVERS[solver](den, x, ts, sch, **options)  # noqa: E731
    batched = jax.jit(jax.vmap(fn))(xs)
    single = jax.jit(fn)  # one compile for the three unbatched runs
    for i in range(3):
        np.testing.assert_allclose(batched[i], single(xs[i]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver,options", ALL, ids=str)
@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.VE()], ids=["vp", "ve-zero"])
def test_grad_wrt_times_matches_finite_differences(solver, options, schedule):
    gmm = _gmm(dim=8)
    den = gmm.denoiser(schedule)
    x = gmm.sample_marginal(jax.random.key(1), 3, schedule.t_max, schedule, dtype=jnp.float64)
    if schedule.is_ve:
        ts0 = jnp.asarray(timesteps.karras(schedule, 6, final_zero=True))
    else:
        ts0 = jnp.asarray(timesteps.logsnr(schedule, 6))
    target = gmm.sample(jax.random.key(9), 3, dtype=jnp.float64)

    check_grad_wrt_times(lambda ts: solvers.SOLVERS[solver](den, x, ts, schedule, **options), ts0, target)


# ------------------------------------------------------------------------------------------------
# Memory: the scan carry holds a fixed number of states


def test_carry_size_does_not_grow_with_steps():
    sch = schedules.VPLinear()
    den = _gmm(dim=8).denoiser(sch)
    x = jnp.zeros((2, 8))

    def carry_leaves(n):
        jaxpr = jax.make_jaxpr(lambda x: solvers.SOLVERS["unipc"](den, x, jnp.asarray(timesteps.logsnr(sch, n)), sch))(x)
        scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
        return [e.params["num_carry"] for e in scans], [v.aval.shape for e in scans for v in e.outvars]

    small, big = carry_leaves(5), carry_leaves(50)
    assert small[0] == big[0]
    assert all(len(s) < 5 and (s[:1] != (50,)) for s in big[1])  # no per-step stacked outputs


# ------------------------------------------------------------------------------------------------
# Bad input


def _setup():
    sch = schedules.VPLinear()
    return sch, _gmm(dim=4).denoiser(sch), jnp.zeros((2, 4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ts=[0.5, 0.8, 0.1]), "strictly decreasing"),
        (dict(ts=[0.5]), "at least 2"),
        (dict(ts=[1.5, 0.5, 0.1]), "outside the domain"),
        (dict(ts=[0.9, 0.5, 0.0]), "outside the domain"),
        (dict(solver="unipc", order=4), "option order of solver unipc must be one of 1, 2, 3, got 4"),
        (dict(solver="dpmpp", order=0), "option order of solver dpmpp must be one of 1, 2, 3, got 0"),
        (dict(solver="sa_solver", predictor_order=5), "predictor_order"),
        (dict(solver="sa_solver", corrector_order=0), "corrector_order"),
        (dict(solver="sa_solver", tau=1.0), "pass key"),
        (dict(solver="ddim", eta=0.5), "pass key"),
        (dict(solver="heun", s_churn=10.0), "pass key"),
        (dict(solver="ddim", eta=1.5), "option eta of solver ddim must be a number in [0.0, 1.0], got 1.5"),
        (dict(solver="unipc", order=2.0), "option order of solver unipc must be one of 1, 2, 3, got 2.0"),
        (dict(solver="unipc", corrector="yes"), "option corrector of solver unipc must be true or false"),
        (dict(solver="unipc", variant="bh3"), "variant"),
        (dict(solver="nope"), "unknown solver"),
        (dict(solver="unipc", orderr=2), "unknown option"),
    ],
)
def test_bad_input_errors(kwargs, message):
    sch, den, x = _setup()
    ts = kwargs.pop("ts", [0.9, 0.5, 0.1])
    solver = kwargs.pop("solver", "ddim")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        jdiffsample.sample(den, x, jnp.asarray(ts), sch, solver=solver, **kwargs)


def test_bad_input_direct_call_and_ve_zero_in_the_middle():
    sch, den, x = _setup()
    with pytest.raises(ValueError, match="strictly decreasing"):
        solvers.SOLVERS["unipc"](den, x, jnp.asarray([0.5, 0.5, 0.1]), sch)
    ve = schedules.VE()
    with pytest.raises(ValueError, match="only at its last point"):
        ve.check_times(np.asarray([1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="one key per sample"):
        jdiffsample.sample(den, x, jnp.asarray([0.9, 0.1]), sch, solver="sa_solver",
                           key=jax.random.split(jax.random.key(0), 3))

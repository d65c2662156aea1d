"""The learnable solvers AMED, EPD and PAS: the authors' samplers step for step (recorded, see
tests/data/README.md), exact reductions to their base solvers, gradients through the scan against
finite differences, one compiled program for new parameters, labels and noises, and the refusals
of bad parameters and parameter files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiffsample
from jdiffsample import models, schedules, solver_params, solvers, testing, timesteps
from jdiffsample.learn_solver import LearnedSolver
from jdiffsample.solvers import registry
from jdiffsample.solvers.amed import per_sample_times
from jdiffsample.solvers.pas import eligible

pytestmark = pytest.mark.usefixtures("float64")

DATA = Path(__file__).parent / "data" / "learned_solvers.npz"


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


@pytest.fixture(scope="module")
def recorded():
    data = dict(np.load(DATA))
    mixture = testing.GaussianMixture(data["gmm_weights"], data["gmm_means"], data["gmm_variances"])
    return data, mixture


def _amed_case(data, case):
    afs, scale_dir, scale_time = data[case + "__options"]
    net = {}
    for layer in ("map", "enc0", "enc1", "r", "scale_dir", "scale_time"):
        if case + f"__{layer}_kernel" in data:
            net[layer] = dict(kernel=data[case + f"__{layer}_kernel"], bias=data[case + f"__{layer}_bias"])
        else:  # their predictor has no head for a zero bound; a zero head gives scale 1
            net[layer] = dict(kernel=np.zeros((20, 1)), bias=np.zeros(1))
    return "amed", dict(form="network", afs=bool(afs), scale_dir=scale_dir, scale_time=scale_time), net


def _epd_case(data, case):
    points, afs, scale_dir, scale_time = data[case + "__options"]
    weights = np.exp(data[case + "__weight_s"])
    params = dict(r=_sigmoid(data[case + "__r_params"]), weights=weights / weights.sum(axis=1, keepdims=True),
                  scale_dir=1 + scale_dir * (2 * _sigmoid(0.5 * data[case + "__scale_dir_params"]) - 1),
                  scale_time=1 + scale_time * (2 * _sigmoid(0.5 * data[case + "__scale_time_params"]) - 1))
    return "epd", dict(points=int(points), afs=bool(afs), scale_dir=scale_dir, scale_time=scale_time), params


def _pas_case(data, case):
    pca, xt, order = data[case + "__options"]
    base = case.split("_")[1]
    options = dict(base=base, order=int(order), pca=int(pca), xt=bool(xt))
    if base == "deis":
        options["variant"] = "rhoab"  # their coefficients: 3-node Adams in sigma
    return "pas", options, dict(coordinates=data[case + "__coordinates"], corrected=data[case + "__corrected"])


CASES = {"amed_afs": _amed_case, "amed_plain": _amed_case, "epd_afs": _epd_case, "epd_three": _epd_case,
         "pas_ddim": _pas_case, "pas_ipndm": _pas_case, "pas_deis": _pas_case}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_authors_sampler_step_by_step(recorded, case):
    """With the authors' parameters (EPD's raw values mapped as their predictor maps them), every
    state on the grid equals their sampler's to 1e-6 relative (measured: 5e-12 or less)."""
    data, mixture = recorded
    solver, options, params = CASES[case](data, case)
    schedule = schedules.VE()
    denoise = mixture.denoiser(schedule)
    if solver == "amed":  # a time per sample
        denoise = per_sample_times(denoise)
    ts = data[case + "__t_steps"]
    x = jnp.asarray(data["latents"]) * ts[0]
    ours = np.asarray(jdiffsample.sample(denoise, x, ts, schedule, solver, params=params, return_trajectory=True,
                                         **options))
    theirs = data[case + "__traj"]
    assert ours.shape == theirs.shape
    for k in range(len(ts)):
        assert np.abs(ours[k] - theirs[k]).max() <= 1e-6 * np.abs(theirs[k]).max(), k


# ------------------------------------------------------------------------------------------------
# Reductions


def _problem(mixture, schedule, n=4):
    x = mixture.sample_marginal(jax.random.key(1), n, schedule.t_max, schedule, dtype=jnp.float64)
    return mixture.denoiser(schedule), x


@pytest.mark.parametrize("solver,options,base,base_options", [
    ("amed", {}, "euler", {}),
    ("amed", dict(form="network", scale_time=0.1), "euler", {}),
    ("epd", dict(points=3), "euler", {}),
    ("pas", dict(base="ipndm", order=4), "ipndm", dict(order=4)),
    ("pas", dict(base="deis", order=3, pca=2), "deis", dict(order=3, lower_order_final=False)),
], ids=str)
def test_neutral_parameters_are_the_base_solver(mixture, solver, options, base, base_options):
    """AMED with r = 0 and scales 1, EPD with one point of weight 1 at r = 0, PAS with no step
    corrected: the base solver on the same grid, to rounding (a VE grid ending at sigma = 0: its
    last step returns the data prediction in both)."""
    schedule = schedules.VE()
    denoise, x = _problem(mixture, schedule)
    ts = timesteps.karras(schedule, 5, final_zero=True)
    info = registry.get(solver)
    assert info.learned.base(info.resolve(options))[0] == base
    if options.get("form") == "network":
        denoise = per_sample_times(denoise)
    neutral = info.learned.neutral(len(ts) - 1, info.resolve(options))
    ours = jdiffsample.sample(denoise, x, ts, schedule, solver, params=neutral, **options)
    reference = jdiffsample.sample(mixture.denoiser(schedule), x, ts, schedule, base, **base_options)
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


def test_epd_two_points_at_the_ends_are_heun(mixture):
    """Two points at r = 0 and 1 with weights 1/2: EDM's Heun (the trapezoid on the Euler predictor)."""
    schedule = schedules.VE()
    denoise, x = _problem(mixture, schedule)
    ts = timesteps.karras(schedule, 6)
    n = len(ts) - 1
    params = dict(r=np.tile([0.0, 1.0], (n, 1)), weights=np.full((n, 2), 0.5), scale_dir=np.ones((n, 2)),
                  scale_time=np.ones((n, 2)))
    np.testing.assert_allclose(jdiffsample.sample(denoise, x, ts, schedule, "epd", params=params),
                               jdiffsample.sample(denoise, x, ts, schedule, "heun"), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Gradients and compilation


def _perturbed(info, n, options, key):
    """The untrained parameters moved inside their ranges (r off 0 and 1, PAS corrected where it can)."""
    params = info.learned.init(n, options)
    if info.name == "pas":
        params = dict(coordinates=jnp.zeros((n, options["pca"])).at[:, 0].set(1.0),
                      corrected=jnp.asarray(eligible(n, options["pca"], options["xt"]), jnp.float64))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    moved = [a + 0.05 * jax.random.normal(k, jnp.shape(a)) for a, k in zip(leaves, keys)]
    return info.learned.project(jax.tree.unflatten(tree, moved), options)


@pytest.mark.parametrize("solver,options", [
    ("amed", dict(form="network", afs=True, scale_dir=0.1, scale_time=0.1)),
    ("epd", dict(points=2)),
    ("pas", dict(base="ipndm", pca=3, relative=True)),
], ids=str)
def test_gradients_through_the_scan_match_finite_differences(mixture, solver, options):
    """d loss / d params along a random direction equals central differences (float64)."""
    schedule = schedules.VE()
    denoise, x = _problem(mixture, schedule, n=3)
    if options.get("form") == "network":
        denoise = per_sample_times(denoise)
    ts = timesteps.logsnr(schedule, 3)
    info = registry.get(solver)
    resolved = info.resolve(options)
    params = _perturbed(info, 3, resolved, jax.random.key(2))
    target = mixture.sample(jax.random.key(9), 3, dtype=jnp.float64)
    fixed = {"corrected"} if solver == "pas" else set()

    def loss(p):
        return jnp.mean((info.fn(denoise, x, ts, schedule, params=p, **options) - target) ** 2)

    direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(5), jnp.shape(a)), params)
    direction = {k: (jax.tree.map(jnp.zeros_like, v) if k in fixed else v) for k, v in direction.items()}
    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one program: the gradient, and the losses below
    grad = value_and_grad(params)[1]
    along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    eps = 1e-6
    step = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, params, direction)  # noqa: E731
    fd = (float(value_and_grad(step(1.0))[0]) - float(value_and_grad(step(-1.0))[0])) / (2 * eps)
    assert np.isfinite(along) and abs(fd) > 1e-8
    assert abs(along - fd) <= 1e-6 * max(1.0, abs(fd)), (along, fd)


def test_new_parameters_labels_and_noises_reuse_the_program(mixture):
    """Parameters, a pytree denoiser's arrays (labels here) and the starting noise are arguments of
    the compiled sampling program: new values run the same program, and give other samples."""
    schedule = schedules.VE()
    ts = timesteps.logsnr(schedule, 4)
    inner = mixture.denoiser(schedule)

    def labelled(labels, y, t):  # a conditional stand-in: the label shifts the prediction
        return inner(y, t) + 0.1 * labels[:, None]

    for solver, options in (("amed", {}), ("epd", {}), ("pas", dict(base="ipndm", pca=2))):
        info = registry.get(solver)
        outs, sizes = [], []
        for seed in range(3):
            params = _perturbed(info, 4, info.resolve(options), jax.random.key(seed))
            x = jax.random.normal(jax.random.key(10 + seed), (3, 16), jnp.float64) * 80
            denoise = jax.tree_util.Partial(labelled, jnp.asarray([seed, 2.0, 1.0 - seed]))
            outs.append(jdiffsample.sample(denoise, x, ts, schedule, solver, params=params, **options))
            sizes.append(solvers._program()._cache_size())
        assert sizes[0] == sizes[1] == sizes[2], (solver, sizes)
        assert not np.allclose(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------
# Bad input


def _learned(solver, options, ts, params):
    return LearnedSolver(solver=solver, options=registry.get(solver).resolve(options), params=params, ts=ts,
                         loss="mse", teacher="heun", teacher_steps=10, train_error=0.1, holdout_error=0.1,
                         init_train_error=1.0, init_holdout_error=1.0, iterations=1, history=(), seconds=1.0,
                         model_calls=dict(teacher=20, student=5, total=25))


def test_parameter_files_are_refused_elsewhere(mixture, tmp_path):
    schedule = schedules.VE()
    ts = timesteps.logsnr(schedule, 3)
    model = dict(means=mixture.means, weights=mixture.weights)
    info = registry.get("amed")
    params = info.learned.init(3, info.resolve(dict(afs=True)))
    path = tmp_path / "amed.json"
    solver_params.save(path, _learned("amed", dict(afs=True), ts, params), model=model, schedule=schedule)
    loaded = solver_params.load_params(path, model, "amed", 5, schedule)
    np.testing.assert_array_equal(loaded["r"], params["r"])
    assert solver_params.read(path).options["afs"] is True

    other_model = dict(means=mixture.means + 1, weights=mixture.weights)
    for args, message in [
        ((model, "amed", 6, schedule), "was trained for NFE 5 (3 steps), not 6"),
        ((model, "epd", 5, schedule), "holds parameters of solver amed, not epd"),
        ((model, "amed", 5, schedules.VE(sigma_max=40.0)), "was trained on the schedule VE"),
        ((other_model, "amed", 5, schedule), "was trained for another model"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            solver_params.load_params(path, *args)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="trained with amed options afs=True, not afs=False"):
        solver_params.load_params(path, model, "amed", 5, schedule, options=dict(afs=False))

    record = json.loads(path.read_text())
    record["params"]["r"] = [0.5, 1.5, 0.5]
    (tmp_path / "range.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"amed parameter r must lie in \[0.0, 1.0\]"):
        solver_params.load_params(tmp_path / "range.json", model, "amed", 5, schedule)
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "bytes.json").write_bytes(b"\x00\x01not json")
    for name in ("other.json", "bytes.json"):
        with pytest.raises(ValueError, match="is not a jdiffsample solver-parameter file"):
            solver_params.load_params(tmp_path / name, model, "amed", 5, schedule)


def test_bad_parameters_and_too_few_steps(mixture):
    schedule = schedules.VE()
    denoise, x = _problem(mixture, schedule)
    ts = timesteps.logsnr(schedule, 4)
    amed = registry.get("amed").learned
    with pytest.raises(ValueError, match=r"amed parameter r must have shape \(4,\) .* got \(3,\)"):
        jdiffsample.sample(denoise, x, ts, schedule, "amed", params=amed.init(3, registry.get("amed").resolve({})))
    with pytest.raises(ValueError, match="epd parameters must be a dict with keys"):
        jdiffsample.sample(denoise, x, ts, schedule, "epd", params=dict(r=np.zeros((4, 2))))
    with pytest.raises(ValueError, match="solver ddim has no learned parameters"):
        jdiffsample.sample(denoise, x, ts, schedule, "ddim", params=dict(r=np.zeros(4)))
    weights = dict(registry.get("epd").learned.init(4, registry.get("epd").resolve({})))
    weights["weights"] = np.full((4, 2), 0.6)
    with pytest.raises(ValueError, match="weights must sum to 1"):
        jdiffsample.sample(denoise, x, ts, schedule, "epd", params=weights)
    fix = dict(coordinates=np.ones((4, 4)), corrected=np.array([0.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="pas cannot correct step 1 with pca=4 and xt=True"):
        jdiffsample.sample(denoise, x, ts, schedule, "pas", params=fix)

    pas, epd = registry.get("pas"), registry.get("epd")
    assert pas.steps_for_nfe(3, zero_end=False) == (3, False)
    for info, nfe, options, message in [
        (pas, 2, {}, r"pas with these options needs at least 3 steps \(NFE >= 3\), got NFE 2"),
        (pas, 3, dict(xt=False), r"needs at least 4 steps \(NFE >= 4\)"),
        (epd, 1, {}, r"epd makes 2 model calls per step: the NFE \(--nfe\) must be a positive multiple of 2,"),
        (epd, 4, dict(afs=True),
         r"saves 1 in all with these options: .* multiple of 2 minus 1, or 2 k \(k >= 1\) on a schedule .*, got 4"),
    ]:
        with pytest.raises(ValueError, match=message):
            info.steps_for_nfe(nfe, zero_end=False, options=options)
    assert epd.steps_for_nfe(5, zero_end=False, options=dict(afs=True)) == (3, False)
    assert epd.nfe(3, options=dict(afs=True)) == 5 and epd.evaluations(3, options=dict(afs=True, points=2)) == 8
    with pytest.raises(ValueError, match="needs at least 3 steps"):
        jdiffsample.sample(denoise, x, timesteps.logsnr(schedule, 2), schedule, "pas")


@pytest.mark.parametrize("solver", ["amed", "epd", "pas"])
def test_a_start_from_pure_noise_is_refused(solver):
    # These methods work in x / alpha (EDM's coordinates): at alpha = 0 (a flow's t = 1) they
    # would return NaN (AMED, EPD) or a wrong first step (PAS), so the grid must start below it.
    schedule = schedules.RectifiedFlow(shift=3.0)
    mixture = testing.GaussianMixture.random(jax.random.key(1), 8, 3)
    denoise = models.from_velocity(mixture.velocity(schedule), schedule)
    x = jax.random.normal(jax.random.key(0), (2, 8))
    assert not registry.get(solver).noise_start
    with pytest.raises(ValueError, match=r"cannot start from pure noise \(t = 1, alpha = 0\)"):
        jdiffsample.sample(denoise, x, np.linspace(1.0, 0.01, 7), schedule, solver)
    out = jdiffsample.sample(denoise, x, np.linspace(schedule.t_max, 0.01, 7), schedule, solver)
    assert bool(jnp.all(jnp.isfinite(out)))

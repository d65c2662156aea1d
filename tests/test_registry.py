"""The solver registry: a solver registered in a test runs through ``jdiffsample.sample``, the
pipeline, the CLI (its flags are generated) and the eval suite without touching any other file;
options are checked against what the registry declares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiffsample
from jdiffsample import cli, evaluate, nets, pipeline, schedules, testing, timesteps
from jdiffsample.solvers import core, registry


def _toy(denoise, x, ts, schedule, *, pull: float = 1.0, key=None, return_trajectory: bool = False):
    """DDIM with its data-prediction weight scaled by ``pull`` (1: DDIM exactly), written with the core."""
    core.validate(x, ts, schedule, key=key)
    n_steps = len(ts) - 1
    plan = core.Plan(pred_order=(1,) * n_steps, corr_order=(0,) * n_steps)
    scaled = jax.tree_util.Partial(lambda d, p, y, t: p * d(y, t) + (1 - p) * y, denoise, pull)
    return core.multistep(scaled, x, ts, schedule, plan, key=key, return_trajectory=return_trajectory)


@pytest.fixture
def toy():
    registry.register("toy", _toy, label=lambda o: f"Toy({o['pull']})", order=1,
                      options=[registry.Option("pull", float, "weight of the data prediction", low=0.0, high=1.0,
                                               flag="toy-pull")])
    yield "toy"
    registry.unregister("toy")


def test_registration_checks_the_function():
    with pytest.raises(ValueError, match="options .* must be exactly the function's keyword options"):
        registry.register("bad", _toy, options=[])
    with pytest.raises(ValueError, match="must take"):
        registry.register("bad", lambda x: x)
    assert "bad" not in registry.names()


def test_toy_solver_everywhere(toy, tmp_path):
    info = registry.get("toy")
    assert info.label({"pull": 0.5}) == "Toy(0.5)" and info.nfe(7) == 7 and info.option("pull").default == 1.0
    with pytest.raises(ValueError, match=r"option pull of solver toy must be a number in \[0.0, 1.0\], got 2"):
        info.resolve({"pull": 2})
    with pytest.raises(ValueError, match="unknown option.*nope.*its options: pull"):
        info.resolve({"nope": 1})

    # jdiffsample.sample: pull = 1 is DDIM
    schedule = schedules.VPLinear()
    mixture = testing.GaussianMixture.random(jax.random.key(0), 8, 2)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    ts = timesteps.logsnr(schedule, 6)
    toy_out = jdiffsample.sample(mixture.denoiser(schedule), x, ts, schedule, "toy")
    ddim_out = jdiffsample.sample(mixture.denoiser(schedule), x, ts, schedule, "ddim")
    np.testing.assert_allclose(toy_out, ddim_out, rtol=1e-6, atol=1e-6)

    # the pipeline, and the CLI with a generated flag
    common = dict(num=6, nfe=4, seed=1, micro_batch=3, batch=3, class_labels=[3], log=None)
    pipeline.generate("digits", tmp_path / "api", solver="toy", options={"pull": 0.5}, **common)
    assert cli.main(["sample", "--model", "digits", "--out", str(tmp_path / "cli"), "--solver", "toy",
                     "--toy-pull", "0.5", "--num", "6", "--nfe", "4", "--seed", "1", "--micro-batch", "3",
                     "--batch", "3", "--class-labels", "3", "--quiet"]) == 0
    api, via_cli = pipeline.load_samples(tmp_path / "api"), pipeline.load_samples(tmp_path / "cli")
    np.testing.assert_array_equal(api[0], via_cli[0])
    # ... and they are toy's images with pull 0.5, rebuilt from each sample's documented noise key
    model = nets.load_model("digits")
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(1), i), 0))(jnp.arange(6))
    x = jax.vmap(lambda k: jax.random.normal(k, (8, 8, 1)))(keys) * model.schedule.sigma_max
    grid = timesteps.logsnr(model.schedule, 4)
    denoise = model.denoiser(np.full(6, 3))
    for pull, same in ((0.5, True), (1.0, False)):
        manual = np.asarray(pipeline.runner.quantize(jdiffsample.sample(denoise, x, grid, model.schedule, "toy",
                                                                        pull=pull)))
        close = np.abs(manual.astype(int) - api[0]).max() <= 1 and np.mean(manual == api[0]) > 0.99
        assert close == same, pull
    assert cli.main(["sample", "--model", "digits", "--out", str(tmp_path / "x"), "--solver", "ddim",
                     "--toy-pull", "0.5"]) == 2  # the flag belongs to toy only

    # the eval suite
    suite = evaluate.Suite("digits", samples=10, batch=10, micro_batch=5, ref_steps=3, log=lambda line: None)
    cell = suite.cell("toy:pull=0.5", 4, "logsnr")
    assert cell.solver == "Toy(0.5)" and np.isfinite(cell.fd) and cell.error > 0
    assert suite.cell("toy", 4, "optimized").grid == "optimized"


def test_denoiser_pytrees_are_traced_arguments():
    """A pytree denoiser's arrays are arguments of the compiled program: new values, same program."""
    schedule = schedules.VE()
    x = jnp.ones((2, 3))
    ts = timesteps.logsnr(schedule, 3)

    def shrink(scale, y, t):
        return scale * y / (1.0 + t)

    first = jdiffsample.sample(jax.tree_util.Partial(shrink, jnp.float32(0.5)), x, ts, schedule, "ddim")
    size = jdiffsample.solvers._program()._cache_size()
    second = jdiffsample.sample(jax.tree_util.Partial(shrink, jnp.float32(0.25)), x, ts, schedule, "ddim")
    assert jdiffsample.solvers._program()._cache_size() == size
    assert not np.allclose(first, second)


def test_sample_runs_inside_the_callers_jit_and_grad(monkeypatch):
    """jdiffsample.sample compiles with XLA options of its own when called directly; inside a caller's
    jit (which takes no options of nested ones) or grad it becomes part of the caller's program."""
    from jdiffsample import xla_options

    monkeypatch.setattr(xla_options, "compile_options", lambda devices=None: dict(xla_options.EIGEN_CONV))
    schedule = schedules.VE()
    x = jnp.linspace(-2.0, 2.0, 12).reshape(2, 6)
    ts = timesteps.logsnr(schedule, 4)

    def run(x):
        return jdiffsample.sample(lambda y, t: y / (1.0 + t**2), x, ts, schedule, "unipc")

    np.testing.assert_allclose(np.asarray(jax.jit(run)(x)), np.asarray(run(x)), rtol=1e-6)
    grad = jax.grad(lambda x: run(x).sum())(x)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0

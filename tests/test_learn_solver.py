"""Learning AMED, EPD and PAS parameters (jdiffsample.learn_solver, jdiffsample learn): the error
against the teacher falls on noise that was not trained on, on the Gaussian mixture and on the
bundled digits model, and the learned parameters are finite and inside their ranges."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiffsample
from jdiffsample import cli, nets, pipeline, schedules, solver_params, timesteps
from jdiffsample.learn_solver import learn_solver
from jdiffsample.solvers import registry

from _helpers import assert_cli_fails, assert_within_one_level, pipeline_images, rebuild


def _check_learned(result, n_steps):
    info = registry.get(result.solver)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(result.params))
    info.learned.check(result.params, n_steps, result.options)  # shapes and the documented ranges
    assert result.holdout_error < result.init_holdout_error


@pytest.mark.parametrize("solver,options,nfe,factor", [
    ("amed", dict(afs=True), 5, 0.01),
    ("epd", {}, 4, 0.01),
    ("pas", dict(base="ddim", pca=3, relative=True), 5, 0.1),
], ids=str)
def test_training_lowers_the_held_out_error_on_the_mixture(mixture, solver, options, nfe, factor):
    """Measured (held-out MSE, untrained -> learned, 30 iterations): AMED-AFS NFE 5 1.39 -> 0.0057,
    EPD-2 NFE 4 9.4 -> 0.012, PAS-3 on DDIM NFE 5 0.078 (DDIM) -> 0.0024."""
    schedule = schedules.VE()
    info = registry.get(solver)
    n_steps, _ = info.steps_for_nfe(nfe, zero_end=False, options=options)
    train, held = (mixture.sample_marginal(jax.random.key(k), 32, schedule.t_max, schedule) for k in (1, 2))
    result = learn_solver(mixture.denoiser(schedule), schedule, solver, train, timesteps.logsnr(schedule, n_steps),
                          holdout=held, iterations=30, teacher_steps=40, **options)
    _check_learned(result, n_steps)
    assert result.holdout_error < factor * result.init_holdout_error, result.history
    student = 30 * info.evaluations(n_steps, options=options)
    assert result.model_calls == dict(teacher=80, student=student, total=80 + student)


def test_learn_on_digits_through_the_cli(tmp_path, capsys):
    """``jdiffsample learn`` on the digits model (PAS on DDIM, NFE 4): the error against the teacher on
    the held-out noises falls, the file records what it was trained for, and sampling those noises
    with the loaded parameters reproduces the recorded held-out error."""
    out = tmp_path / "pas4.json"
    argv = ["learn", "--model", "digits", "--solver", "pas", "--base", "ddim", "--pca", "2", "--relative",
            "--nfe", "4", "--out", str(out), "--iters", "4", "--batch", "8", "--holdout", "8",
            "--teacher-steps", "8", "--lr", "0.05"]
    assert cli.main(argv) == 0
    assert "held-out mse" in capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["training"]["holdout_error"] < 0.9 * record["training"]["init_holdout_error"]
    assert (record["solver"], record["nfe"], record["base"]) == ("pas", 4, ["ddim", {}])

    model = nets.load_model("digits")
    schedule = model.schedule
    params = solver_params.load_params(out, model, "pas", 4, schedule)
    options = solver_params.read(out).options
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(params))
    noise = jax.random.normal(jax.random.key(0), (16, 8, 8, 1)) * schedule.t_max  # the command's: seed 0
    denoise = model.denoiser(labels=jnp.arange(8) % 10)
    ts = np.asarray(record["ts"])
    teacher = jdiffsample.sample(denoise, noise[8:], timesteps.karras(schedule, 8, ts[0], ts[-1]), schedule, "heun")
    learned = jdiffsample.sample(denoise, noise[8:], ts, schedule, "pas", params=params, **options)
    np.testing.assert_allclose(float(jnp.mean((learned - teacher) ** 2)), record["training"]["holdout_error"],
                               rtol=1e-4)

    # Sampling with the file (the run's --solver-params) is the solver with those parameters and the
    # file's options, and they matter: the untrained solver gives other images.
    grid = timesteps.logsnr(schedule, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the grid it was trained on: no warning
        ours, labels = pipeline_images(model, range(4), solver="pas", nfe=4, solver_params=str(out))
    with pytest.warns(UserWarning, match=f"--solver-params {out} was trained on the logsnr grid .*this run's karras"):
        pipeline.plan(model, pipeline.Settings.create(solver="pas", nfe=4, grid="karras", solver_params=str(out)),
                      num=4)
    by_hand, _ = rebuild(model, range(4), seed=0, times=grid, solver="pas", labels="random", options=options,
                         params=params)
    untrained, _ = rebuild(model, range(4), seed=0, times=grid, solver="pas", labels="random", options=options)
    assert_within_one_level(ours, by_hand)
    assert np.abs(ours.astype(int) - untrained).max() > 8
    assert_cli_fails(["sample", "--model", "digits", "--solver", "pas", "--nfe", "4", "--solver-params", str(out),
                      "--pca", "3", "--out", str(tmp_path / "run")],
                     f"--solver-params {out} was trained with pca=2; leave these solver options out", capsys,
                     tmp_path / "run")
    assert_cli_fails(["sample", "--model", "digits", "--solver", "pas", "--nfe", "6", "--solver-params", str(out),
                      "--out", str(tmp_path / "run")], f"{out} was trained for NFE 4 (4 steps), not 6", capsys)
    assert_cli_fails(["sample", "--model", "digits", "--solver", "unipc", "--nfe", "4", "--solver-params", str(out),
                      "--out", str(tmp_path / "run")], "--solver unipc takes no learned parameters", capsys)

    assert cli.main(argv) == 2  # the file exists
    common = ["learn", "--model", "digits", "--out", str(out), "--overwrite"]
    for bad, message in [(["--solver", "ddim", "--nfe", "4"], "solver ddim has no learned parameters"),
                         (["--solver", "pas", "--nfe", "2"], "pas with these options needs at least 3 steps"),
                         (["--solver", "epd", "--nfe", "3", "--no-afs"], "needs a last step into sigma = 0")]:
        capsys.readouterr()
        assert cli.main(common + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

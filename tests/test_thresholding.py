"""Static and dynamic thresholding of data predictions: diffusers' definition, and the sampling
pipeline's option (pixel-space VP models only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from _helpers import benchmark

import jdiffsample
from jdiffsample import cli, guidance, nets, pipeline, schedules, testing, timesteps


@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.9, 1.5), (0.5, 3.0)])
def test_dynamic_thresholding_is_diffusers(ratio, max_value):
    torch = require("torch")
    diffusers = require("diffusers")
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                        sample_max_value=max_value)
    x0 = np.random.default_rng(0).normal(scale=2.0, size=(4, 3, 6, 5)).astype(np.float32)
    x0[1] *= 0.3  # a sample that needs no thresholding (s clamps to 1)
    expected = scheduler._threshold_sample(torch.from_numpy(x0)).numpy()
    got = np.asarray(guidance.threshold(jnp.asarray(x0.transpose(0, 2, 3, 1)), "dynamic", ratio, max_value))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=1e-6, atol=1e-6)
    assert np.abs(got).max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(guidance.threshold(jnp.asarray(x0), "static"), np.clip(x0, -1, 1))


def test_thresholded_denoiser_is_traced_and_used_by_solvers():
    """Thresholding acts on every data prediction the solver uses, and its ratio and maximum are
    traced: other values run the compiled program again without compiling."""
    compile_seconds = benchmark("compile_once").compile_seconds
    schedule = schedules.VPLinear()
    mixture = testing.GaussianMixture.random(jax.random.key(0), 8, 2, spread=3.0)
    x = mixture.sample_marginal(jax.random.key(1), 4, schedule.t_max, schedule)
    ts = timesteps.logsnr(schedule, 6)
    denoise = mixture.denoiser(schedule)
    plain = jdiffsample.sample(denoise, x, ts, schedule, "unipc")
    clipped = jdiffsample.sample(guidance.thresholded(denoise, "static"), x, ts, schedule, "unipc")
    # the last state is the last data prediction plus sigma_min-sized noise: within [-1.1, 1.1]
    assert np.abs(plain).max() > 1.5 and np.abs(clipped).max() <= 1.1
    first = compile_seconds(lambda: jdiffsample.sample(guidance.thresholded(denoise, "dynamic", 0.9, 1.2), x, ts,
                                                       schedule, "unipc"))
    dynamic = {}
    second = compile_seconds(lambda: dynamic.setdefault("out", jdiffsample.sample(
        guidance.thresholded(denoise, "dynamic", 0.8, 1.5), x, ts, schedule, "unipc")))
    assert first > 0 and second < 0.1 * first, (first, second)
    assert not np.allclose(dynamic["out"], clipped) and np.abs(dynamic["out"]).max() <= 1.1
    with pytest.raises(ValueError, match="threshold must be one of"):
        guidance.threshold(jnp.ones((1, 2)), "soft")


def _adm(tmp_path_factory):
    from conftest import fixture_dir

    folder = fixture_dir("adm_guided_tiny")
    dst = tmp_path_factory.mktemp("thr") / "adm"
    assert cli.main(["convert", "adm", str(folder / "state_dict.pt"), str(dst), "--config",
                     str(folder / "config.json")]) == 0
    return dst


def test_pipeline_threshold_option(tmp_path_factory, tmp_path, capsys):
    """The CLI's --threshold gives the images of a thresholded denoiser rebuilt here from each
    sample's documented noise key, label and grid; on a VE model it is refused."""
    adm = _adm(tmp_path_factory)
    common = ["--num", "2", "--nfe", "3", "--micro-batch", "2", "--batch", "2", "--class-labels", "1", "--quiet",
              "--threshold-ratio", "0.9", "--threshold-max", "1.5"]
    model = nets.load_model(adm)
    ts = timesteps.logsnr(model.schedule, 3)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), i), 0))(jnp.arange(2))
    x = jax.vmap(lambda k: jax.random.normal(k, model.sample_shape))(keys)
    images = {}
    for kind in ("static", "dynamic"):
        assert cli.main(["sample", "--model", str(adm), "--out", str(tmp_path / kind), "--threshold", kind,
                         *common]) == 0
        images[kind] = pipeline.load_samples(tmp_path / kind)[0]
        denoise = model.denoiser(np.array([1, 1]), threshold=kind, threshold_ratio=0.9, threshold_max=1.5)
        manual = np.asarray(pipeline.runner.quantize(jdiffsample.sample(denoise, x, ts, model.schedule, "unipc")))
        assert np.abs(manual.astype(int) - images[kind]).max() <= 1 and np.mean(manual == images[kind]) > 0.99
    # the kind reaches the program (an ignored option would give the plain images for both)
    assert not np.array_equal(images["static"], images["dynamic"])
    assert cli.main(["sample", "--model", "digits", "--out", str(tmp_path / "ve"), "--threshold", "dynamic",
                     *common]) == 2
    assert "samples on a VE schedule" in capsys.readouterr().err
    assert not (tmp_path / "ve").exists()

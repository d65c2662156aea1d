"""guided-diffusion complete: classifier guidance (exact on a Gaussian mixture, and equal to the
original's guided DDIM loop), the two-stage run with the upsampler, and bad input."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir
from _helpers import assert_cli_fails

import jdiffsample
from jdiffsample import cli, guidance, nets, pipeline, schedules, testing, timesteps

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gd")
    for family, name in (("adm", "adm_guided_tiny"), ("adm-classifier", "adm_classifier_tiny"),
                         ("adm-superres", "adm_superres_tiny")):
        folder = fixture_dir(name)
        assert cli.main(["convert", family, str(folder / "state_dict.pt"), str(root / name), "--config",
                         str(folder / "config.json")]) == 0
    return root


# -- classifier guidance on a Gaussian mixture -----------------------------------------------


def _posterior_logits(mixture, schedule):
    """The exact noisy classifier: log p(k | x_t) up to a constant, k the mixture component."""
    log_w = np.log(mixture.weights)

    def logits(x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        var = alpha**2 * jnp.asarray(mixture.variances) + sigma**2
        diff = x[:, None, :] - alpha * jnp.asarray(mixture.means)[None]
        return -0.5 * jnp.sum(diff**2 / var + jnp.log(var), axis=-1) + jnp.asarray(log_w)

    return logits


def test_exact_classifier_at_scale_one_samples_the_class():
    """grad log p(x_t) + grad log p(y | x_t) is the score of the class-conditional distribution:
    guided ODE sampling at scale 1 draws from the component; at scale 0 it is unguided sampling."""
    with schedules.float64():
        schedule = schedules.VPLinear()
        mixture = testing.GaussianMixture(np.array([0.5, 0.3, 0.2]),
                                         np.array([[-2.0, 0.5], [1.5, 1.5], [0.5, -2.0]]),
                                         np.array([[0.3, 0.2], [0.15, 0.4], [0.25, 0.25]]))
        n, k = 4000, 1
        x = jax.random.normal(jax.random.key(0), (n, 2), jnp.float64) * schedule.sigma(schedule.t_max)
        ts = timesteps.logsnr(schedule, 40)
        labels = jnp.full((n,), k)
        classify = jax.tree_util.Partial(_posterior_logits(mixture, schedule))
        guided = guidance.classifier_guided(mixture.denoiser(schedule), classify, labels, 1.0, schedule)
        out = np.asarray(jdiffsample.sample(guided, x, ts, schedule, "unipc"))
        se = np.sqrt(mixture.variances[k] / n)
        assert np.all(np.abs(out.mean(0) - mixture.means[k]) < 4 * se + 2e-3), (out.mean(0), mixture.means[k])
        np.testing.assert_allclose(np.cov(out, rowvar=False), np.diag(mixture.variances[k]), atol=0.03)
        off = guidance.classifier_guided(mixture.denoiser(schedule), classify, labels, 0.0, schedule)
        np.testing.assert_array_equal(jdiffsample.sample(off, x, ts, schedule, "unipc"),
                                      jdiffsample.sample(mixture.denoiser(schedule), x, ts, schedule, "unipc"))


# -- against guided-diffusion's own loop -----------------------------------------------------


def test_ddim_with_classifier_guidance_is_guided_diffusions_loop(converted):
    """guided-diffusion's ddim_sample_loop (ddim10, clip_denoised, cond_fn) recorded on the tiny
    fixtures (tests/data/README.md): our DDIM with static thresholding and classifier guidance on
    the same respaced timesteps follows the same trajectory, with and without the classifier."""
    ref = np.load(DATA / "adm_ddim_classifier.npz")
    model = nets.load_model(converted / "adm_guided_tiny")
    classifier = nets.load_model(converted / "adm_classifier_tiny")
    ts = (ref["timestep_map"][::-1] + 1) / 1000.0  # t_n = (n + 1) / N is timestep n
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1))
    for name, extra in (("guided", dict(classifier=classifier, classifier_scale=float(ref["scale"]))),
                        ("plain", {})):
        denoise = model.denoiser(ref["y"], threshold="static", **extra)
        traj = np.asarray(jdiffsample.sample(denoise, x, ts, model.schedule, "ddim", return_trajectory=True))
        expected = ref[name][:-1].transpose(0, 1, 3, 4, 2)  # the last one steps to alpha_bar = 1
        error = np.abs(traj[1:] - expected).max() / np.abs(expected).max()
        assert error < 1e-4, (name, error)
    assert np.abs(ref["guided"] - ref["plain"]).max() > 0.1  # the classifier does change the samples


def test_classifier_guidance_and_upsampler_in_the_pipeline(converted, tmp_path):
    base = ["--model", str(converted / "adm_guided_tiny"), "--num", "4", "--nfe", "3", "--micro-batch", "2",
            "--class-labels", "3,7", "--seed", "2", "--quiet"]
    assert cli.main(["sample", *base, "--out", str(tmp_path / "plain"), "--batch", "2"]) == 0
    assert cli.main(["sample", *base, "--out", str(tmp_path / "clf"), "--batch", "2",
                     "--classifier", str(converted / "adm_classifier_tiny"), "--classifier-scale", "3"]) == 0
    plain, clf = pipeline.load_samples(tmp_path / "plain"), pipeline.load_samples(tmp_path / "clf")
    # the pipeline's classifier guidance is the model's denoiser with that classifier and scale,
    # rebuilt here from each sample's documented noise key (fold_in(k_i, 0)), labels and grid
    model = nets.load_model(converted / "adm_guided_tiny")
    classifier = nets.load_model(converted / "adm_classifier_tiny")
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(2), i), 0))(jnp.arange(4))
    x = jax.vmap(lambda k: jax.random.normal(k, model.sample_shape))(keys)
    grid = timesteps.logsnr(model.schedule, 3)
    for images, extra in ((plain[0], {}), (clf[0], dict(classifier=classifier, classifier_scale=3.0))):
        denoise = model.denoiser(np.array([3, 7, 3, 7]), **extra)
        manual = np.asarray(pipeline.runner.quantize(jdiffsample.sample(denoise, x, grid, model.schedule, "unipc")))
        assert np.abs(manual.astype(int) - images).max() <= 1 and np.mean(manual == images) > 0.99
    assert np.abs(plain[0].astype(int) - clf[0]).max() > 8  # and the classifier does move the images

    two = ["sample", *base, "--upsampler", str(converted / "adm_superres_tiny"), "--upsampler-nfe", "2"]
    assert cli.main([*two, "--out", str(tmp_path / "two"), "--batch", "2"]) == 0
    images, labels = pipeline.load_samples(tmp_path / "two")
    assert images.shape == (4, 16, 16, 3) and labels.tolist() == [3, 7, 3, 7]
    manifest = pipeline.read_manifest(tmp_path / "two")
    assert manifest["settings"]["upsampler"]["n_steps"] == 2
    assert manifest["settings"]["models"]["upsampler"]["family"] == "adm-superres"

    # the second stage is the upsampler's denoiser conditioned on the first stage's images, with
    # each sample's stage-2 noise from fold_in(k_i, 3); from_manifest reproduces the run with the
    # samples in other batches (a sample does not depend on the others run with it)
    runner = pipeline.from_manifest(tmp_path / "two", batch=2)
    np.testing.assert_array_equal(runner(np.array([3, 0, 2, 1]))[0], images[[3, 0, 2, 1]])
    first = plain[0]
    up = nets.load_model(converted / "adm_superres_tiny")
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(2), i), 3))(jnp.arange(4))
    noise = jax.vmap(lambda k: jax.random.normal(k, (16, 16, 3)))(keys) * up.schedule.sigma(1.0)
    low_res = jnp.asarray(first, jnp.float32) / 127.5 - 1
    denoise = up.denoiser(conditioning=dict(low_res=low_res))
    grid = timesteps.logsnr(up.schedule, 2)
    x = jdiffsample.sample(denoise, noise, grid, up.schedule, "unipc", key=keys)
    manual = np.asarray(pipeline.runner.quantize(x))
    assert np.mean(manual == images) > 0.99 and np.abs(manual.astype(int) - images).max() <= 1


@pytest.mark.parametrize("case, message", [
    ("upsampler_alone", "is conditioned on low_res: use it as the upsampler"),
    ("classifier_size", "the classifier takes (16, 16, 3) images and has 10 classes; the model samples"),
    ("classifier_scale", "classifier guidance needs both --classifier and --classifier-scale"),
    ("threshold_ve", "samples on a VE schedule"),
])
def test_bad_input(case, message, converted, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = {
        "upsampler_alone": ["--model", str(converted / "adm_superres_tiny")],
        "classifier_size": ["--model", "digits", "--classifier", str(converted / "adm_classifier_tiny"),
                            "--classifier-scale", "1"],
        "classifier_scale": ["--model", str(converted / "adm_guided_tiny"), "--classifier",
                             str(converted / "adm_classifier_tiny")],
        "threshold_ve": ["--model", "digits", "--threshold", "static"],
    }[case]
    assert_cli_fails(["sample", *argv, "--out", out, "--num", "2"], message, capsys, tmp_path / "out")

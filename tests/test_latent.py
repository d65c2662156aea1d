"""Latent and transformer models end to end: DiT and EDM2 converted from the golden fixtures, the
SD VAE decoding their samples inside the sampling program, guidance (classifier-free, DiT's
3-channel form, autoguidance, the guidance interval), resuming and devices, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir
from _helpers import assert_cli_fails, pipeline_images

from jdiffsample import cli, nets, pipeline, schedules
from jdiffsample.nets import dit, edm2, latent, vae

DENOISE = jax.jit(lambda denoiser, x, t: denoiser(x, t))
COMMON = ["--nfe", "4", "--micro-batch", "2", "--batch", "4", "--shard-size", "4", "--seed", "7", "--quiet"]


def _convert(*args):
    assert cli.main(["convert", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The VAE, DiT (with that VAE recorded) and EDM2 fixtures converted through the CLI."""
    root = tmp_path_factory.mktemp("latent")
    _convert("vae", fixture_dir("vae_tiny"), root / "vae")
    folder = fixture_dir("dit_tiny")
    _convert("dit", folder / "state_dict.pt", root / "dit", "--config", folder / "config.json", "--vae", root / "vae")
    _convert("dit", folder / "state_dict.pt", root / "dit_novae", "--config", folder / "config.json")
    folder = fixture_dir("edm2_tiny")
    _convert("edm2", folder / "state_dict.pt", root / "edm2", "--config", folder / "config.json")
    return root


def test_conversions_record_what_sampling_needs(converted):
    config = nets.read_config(converted / "dit")
    assert config["family"] == "dit" and config["schedule"]["type"] == "VPDiscrete"
    assert config["latent"]["vae"] == str(converted / "vae") and config["latent"]["range"] == "[-1,1]"
    assert nets.load_model(converted / "edm2").schedule == schedules.VE(sigma_min=0.002, sigma_max=80.0)
    assert "latent" not in nets.read_config(converted / "edm2")  # 3 channels: a pixel model
    model = nets.load_model(converted / "dit")
    assert model.sample_shape == (8, 8, 4) and model.num_classes == 10 and model.latent is not None


def test_dit_guidance_is_forward_with_cfg(converted):
    """Classifier-free guidance through the Denoiser (null label = num_classes, the first 3
    channels guided by default) gives the epsilon of the original's forward_with_cfg."""
    io = np.load(fixture_dir("dit_tiny") / "io.npz")
    model = nets.load_model(converted / "dit")
    half = len(io["cfg_x"]) // 2
    x = jnp.asarray(io["cfg_x"][:half].transpose(0, 2, 3, 1))
    t = 1e-3  # the network's timestep 0 (cfg_t) in the DPM-Solver convention t = (n + 1) / N
    assert np.all(io["cfg_t"] == 0) and np.all(io["cfg_y"][half:] == 10)
    schedule = model.schedule
    alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
    for channels, reference in (("default", io["cfg_output"]), (None, None)):
        denoiser = model.denoiser(io["cfg_y"][:half], guidance=float(io["cfg_scale"]), channels=channels)
        x0 = np.asarray(DENOISE(denoiser, x, t), np.float64)
        eps = (np.asarray(x, np.float64) - alpha * x0) / sigma
        if reference is not None:
            expected = reference[:half, :4].transpose(0, 2, 3, 1)
            assert np.abs(eps - expected).max() <= 1e-3 * np.abs(expected).max()
        else:  # all channels: the 4th channel is guided too and differs from the original's
            assert np.abs(eps[..., 3] - io["cfg_output"][:half, 3]).max() > 1e-2


def test_dit_pipeline_decodes_resumes_and_ignores_devices(converted, tmp_path):
    out = tmp_path / "run"
    args = ["sample", "--model", str(converted / "dit"), "--out", str(out), "--num", "6", "--class-labels", "1,2",
            "--guidance", "2", *COMMON]
    assert cli.main(args) == 0
    images, labels = pipeline.load_samples(out)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    assert labels.tolist() == [1, 2, 1, 2, 1, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["models"]["vae"]["family"] == "vae" and manifest["settings"]["guidance_channels"] == 3
    assert manifest["settings"]["output_shape"] == [16, 16, 3] and (out / "grid.png").is_file()

    (out / "samples_000001.npz").unlink()  # resume: only the missing shard is made, the same
    assert cli.main(args) == 0
    np.testing.assert_array_equal(pipeline.load_samples(out)[0], images)

    script = textwrap.dedent("""
        import sys, jax
        from jdiffsample import cli
        assert jax.device_count() == 2
        sys.exit(cli.main(sys.argv[1:]))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    two = [*args[:4], str(tmp_path / "two"), *args[5:]]
    proc = subprocess.run([sys.executable, "-c", script, *two], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pipeline.load_samples(tmp_path / "two")[0], images)

    # --latents-only: the latents that the program decoded
    assert cli.main([*args[:4], str(tmp_path / "lat"), *args[5:], "--latents-only"]) == 0
    latents, _ = pipeline.load_samples(tmp_path / "lat")
    assert latents.shape == (6, 8, 8, 4) and latents.dtype == np.float32
    decoder = latent.decoder(nets.load_model(converted / "dit").latent, nets.load_model(converted / "vae"), 4)
    decoded = np.asarray(jax.jit(lambda d, z: d(z))(decoder, jnp.asarray(latents)))
    assert np.abs(decoded.astype(int) - images).max() <= 1 and np.mean(decoded != images) < 0.01


def test_autoguidance_with_weight_one_is_the_main_model(converted):
    common = dict(solver="unipc", nfe=4, micro_batch=2, batch=2, seed=3, class_labels=[4], latents_only=True)
    plain, _ = pipeline_images(converted / "dit", np.arange(2), **common)
    guide = nets.load_model(converted / "dit")
    guide = guide.with_variables(jax.tree.map(lambda a: a * 0.9, guide.variables))  # a weaker guide
    auto, _ = pipeline_images(converted / "dit", np.arange(2), guide=guide, guidance=1.0, guidance_channels=None,
                              **common)
    np.testing.assert_allclose(auto, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    stronger, _ = pipeline_images(converted / "dit", np.arange(2), guide=guide, guidance=2.0, **common)
    assert np.abs(stronger - plain).max() > 1e-3


def test_autoguidance_is_twice_the_main_minus_the_guide(converted):
    """D(w = 2) = 2 D_main - D_guide, both with the same labels (a guide called without the labels,
    or the weights swapped, gives other values)."""
    model = nets.load_model(converted / "dit")
    guide = model.with_variables(jax.tree.map(lambda a: a * 0.9, model.variables))
    labels = jnp.array([4, 7])
    x = jax.random.normal(jax.random.key(0), (2, *model.sample_shape)) * 0.8
    t = jnp.float32(0.45)
    main = model.denoiser(labels)(x, t)
    weak = guide.denoiser(labels)(x, t)
    weak_unlabelled = guide.denoiser(None)(x, t)
    auto = model.denoiser(labels, guidance=2.0, guide=guide, channels=None)(x, t)
    scale = np.abs(main).max()
    np.testing.assert_allclose(auto, 2 * main - weak, atol=1e-5 * scale, rtol=0)
    assert np.abs(weak - weak_unlabelled).max() > 1e-2 * scale  # the labels matter to the guide


def test_guidance_interval_switches_guidance_by_noise_level(converted):
    model = nets.load_model(converted / "edm2")
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    labels = np.array([1, 2])
    guide = model.with_variables(jax.tree.map(lambda a: a * 0.8, model.variables))
    plain = DENOISE(model.denoiser(labels), x, 1.0)
    guided = DENOISE(model.denoiser(labels, guidance=3.0, guide=guide), x, 1.0)
    inside = DENOISE(model.denoiser(labels, guidance=3.0, guide=guide, interval=(0.5, 2.0)), x, 1.0)
    outside = DENOISE(model.denoiser(labels, guidance=3.0, guide=guide, interval=(2.0, 5.0)), x, 1.0)
    np.testing.assert_array_equal(inside, guided)
    np.testing.assert_allclose(outside, plain, rtol=1e-6, atol=1e-6)
    assert np.abs(guided - plain).max() > 1e-3


def test_guidance_interval_is_in_noise_levels_on_a_vp_model(converted):
    """On DiT's discrete VP schedule sigma/alpha is not t: at t = 0.3 the interval is read in noise
    levels (an interval holding t but not sigma/alpha leaves the conditional model; one holding
    sigma/alpha but not t guides)."""
    model = nets.load_model(converted / "dit")
    t = 0.3
    level = float(model.schedule.edm_sigma(t))
    assert abs(level - t) > 0.1, level
    holds_t = (t * 0.9, t * 1.1) if level > t * 1.1 or level < t * 0.9 else None
    holds_level = (level * 0.95, level * 1.05)
    x = jax.random.normal(jax.random.key(1), (2, *model.sample_shape))
    labels = np.array([3, 8])
    plain = DENOISE(model.denoiser(labels), x, t)
    guided = DENOISE(model.denoiser(labels, guidance=4.0), x, t)
    assert np.abs(guided - plain).max() > 1e-3
    np.testing.assert_array_equal(DENOISE(model.denoiser(labels, guidance=4.0, interval=holds_level), x, t), guided)
    np.testing.assert_allclose(DENOISE(model.denoiser(labels, guidance=4.0, interval=holds_t), x, t), plain,
                               rtol=1e-5, atol=1e-5 * np.abs(plain).max())


def test_edm2_samples_with_skip_tuning_and_an_unconditional_guide(converted, tmp_path):
    uncond = tmp_path / "uncond"
    kwargs = dict(json.loads((fixture_dir("edm2_tiny") / "config.json").read_text())["kwargs"], label_dim=0)
    module = edm2.build("Precond", kwargs)
    nets.save(uncond, "edm2", "Precond", kwargs, nets.random_variables(module, *edm2.example_inputs(module)))
    base = ["sample", "--model", str(converted / "edm2"), "--num", "4", "--class-labels", "3", *COMMON]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--skip-tuning", "0.7"]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "c"), "--guide-model", str(uncond), "--guidance", "1.5"]) == 0
    a, b, c = (pipeline.load_samples(tmp_path / n)[0] for n in "abc")
    assert a.shape == (4, 8, 8, 3) and not np.array_equal(a, b) and not np.array_equal(a, c)


def test_edm2_latent_range_is_edm2s_convention():
    """EDM2 decodes with the VAE output clamped to [0, 1] times 255; SD-style models quantize [-1, 1]."""
    module = vae.build("AutoencoderKL", dict(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                                             up_block_types=["UpDecoderBlock2D"], latent_channels=4,
                                             norm_num_groups=4, layers_per_block=1, scaling_factor=0.5))
    model = nets.Model("vae", "AutoencoderKL", json.dumps(dict(block_out_channels=[8], down_block_types=[
        "DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=4,
        layers_per_block=1, scaling_factor=0.5)), "null", "float32",
        nets.random_variables(module, *vae.example_inputs(module)))
    z = jax.random.normal(jax.random.key(1), (1, 4, 4, 4))
    unit = latent.decoder(dict(scale=[0.5, 1, 2, 4], bias=[0, 1, 0, -1], range="[0,1]"), model, 4)
    sd = latent.decoder(dict(range="[-1,1]"), model, 4)
    y = np.asarray(unit.pixels(z))
    raw = (np.asarray(z) - np.array([0, 1, 0, -1])) / np.array([0.5, 1, 2, 4])
    np.testing.assert_allclose(y, np.asarray(model.apply(jnp.asarray(raw, jnp.float32), method="decode")),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(unit(z), np.floor(np.clip(y, 0, 1) * 255).astype(np.uint8))
    y_sd = np.asarray(sd.pixels(z))  # raw = z / scaling_factor
    np.testing.assert_array_equal(sd(z), np.clip(np.floor(y_sd * 127.5 + 128), 0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="the VAE has 4 latent channels, the model samples 3"):
        latent.decoder({}, model, 3)


@pytest.mark.parametrize("case, message", [
    ("no_vae", "samples latents: give the converted VAE"),
    ("pixel_vae", "samples pixels: it takes no VAE"),
    ("uncond_guidance", "classifier-free guidance needs a class-conditional network with an unconditional mode"),
    ("other_family", "the guide must be a dit network"),
    ("bad_channels", "guidance channels must be None (all) or an integer in [1, 4], got 7"),
    ("vae_not_vae", "is a edm2 network, not a VAE"),
])
def test_bad_input(case, message, converted, tmp_path, capsys):
    out = str(tmp_path / "out")
    dit_model, edm2_model, vae_dir = str(converted / "dit"), str(converted / "edm2"), str(converted / "vae")
    argv = {
        "no_vae": ["--model", str(converted / "dit_novae")],
        "pixel_vae": ["--model", edm2_model, "--vae", vae_dir],
        "uncond_guidance": ["--model", edm2_model, "--guidance", "2"],
        "other_family": ["--model", dit_model, "--guidance", "2", "--guide-model", edm2_model],
        "bad_channels": ["--model", dit_model, "--guidance", "2", "--guidance-channels", "7"],
        "vae_not_vae": ["convert", "dit", str(fixture_dir("dit_tiny") / "state_dict.pt"), out, "--config",
                                str(fixture_dir("dit_tiny") / "config.json"), "--vae", edm2_model],
    }[case]
    command = argv if argv[0] == "convert" else ["sample", *argv, "--out", out, "--num", "2"]
    assert_cli_fails(command, message, capsys, tmp_path / "out")


def test_dit_bfloat16_runs_in_the_pipeline(converted):
    common = dict(solver="dpmpp", nfe=3, micro_batch=2, batch=2, seed=1, class_labels=[5], latents_only=True)
    f32, _ = pipeline_images(converted / "dit", np.arange(2), **common)
    bf16, _ = pipeline_images(converted / "dit", np.arange(2), dtype="bfloat16", **common)
    error = np.abs(bf16 - f32).max() / np.abs(f32).max()
    assert 0 < error < 0.05, error
    assert dit.FAMILY.sampling.guidance_channels(nets.load_model(converted / "dit").module) == 3

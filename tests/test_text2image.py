"""Text to image: the same images as diffusers' Stable Diffusion pipelines from the same starting
latents (DPM-Solver++ 2M and UniPC bh2 on the folder's scheduler timesteps), the CLI on sd_tiny
(deterministic across batch sizes and devices, resumable, one compile), and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import assert_cli_fails

from jdiffsample import cli, pipeline, text2image

PROMPTS = ["a red cat sitting on a mat", "two dogs, running!"]
NEGATIVE = ["blurry", "low quality"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    for name in ("sd_tiny", "sdxl_tiny"):
        assert cli.main(["convert", "sd", str(fixture_dir(name)), str(root / name)]) == 0
    return root


@pytest.fixture(scope="module")
def pipelines():
    diffusers = require("diffusers")
    out = {}
    for name, cls in (("sd_tiny", diffusers.StableDiffusionPipeline), ("sdxl_tiny", diffusers.StableDiffusionXLPipeline)):
        pipe = cls.from_pretrained(str(fixture_dir(name)))
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


# each solver on one of the two models (the other pairing adds compile time, not coverage: the
# solvers are checked against these schedulers in float64 elsewhere)
CASES = [("sd_tiny", "dpmpp", "DPMSolverMultistepScheduler", dict(order=2)),
         ("sdxl_tiny", "unipc", "UniPCMultistepScheduler", dict(order=2, variant="bh2"))]


@pytest.mark.parametrize("name, solver, scheduler, options", CASES, ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_same_images_as_diffusers(converted, pipelines, name, solver, scheduler, options):
    torch = require("torch")
    diffusers = require("diffusers")
    pipe = pipelines[name]
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for guidance, negative, rescale in ((None, None, None), (5.0, NEGATIVE, None), (5.0, NEGATIVE, 0.7)):
        with torch.no_grad():
            theirs = pipe(prompt=PROMPTS, negative_prompt=negative, guidance_scale=guidance or 1.0,
                          guidance_rescale=rescale or 0.0, num_inference_steps=6, latents=latents.clone(),
                          output_type="np").images
        theirs = np.round(theirs * 255).astype(np.int16)
        ours = text2image.generate(converted / name, PROMPTS, negative_prompts=negative, guidance=guidance,
                                   guidance_rescale=rescale, solver=solver, options=options, nfe=6, grid="diffusers",
                                   latents=latents.numpy().transpose(0, 2, 3, 1))
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        assert np.abs(ours.astype(np.int16) - theirs).max() <= 2, (guidance, np.abs(ours - theirs).max())


def test_cli_is_deterministic_resumable_and_compiles_once(converted, tmp_path, capsys):
    model = str(converted / "sd_tiny")
    args = ["sample", "--model", model, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--negative-prompt", "ugly",
            "--guidance", "4", "--guidance-rescale", "0.5", "--nfe", "3", "--num", "6", "--micro-batch", "2",
            "--shard-size", "2", "--seed", "1", "--grid", "diffusers"]
    assert cli.main([*args, "--batch", "2", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert err.count("compiled in") == 1
    assert cli.main([*args, "--batch", "6", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    images, _ = pipeline.load_samples(tmp_path / "a")
    assert images.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(pipeline.load_samples(tmp_path / "b")[0], images)
    (tmp_path / "a" / "samples_000002.npz").unlink()
    assert cli.main([*args, "--batch", "2", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    np.testing.assert_array_equal(pipeline.load_samples(tmp_path / "a")[0], images)
    settings = pipeline.read_manifest(tmp_path / "a")["settings"]
    assert settings["prompts"] == PROMPTS and settings["negative_prompts"] == ["ugly"]
    # the API with the same prompts (sample i: prompt i) gives the same images
    again = text2image.generate(model, PROMPTS, negative_prompts="ugly", guidance=4, guidance_rescale=0.5, nfe=3,
                                seed=1, grid="diffusers", batch=2)
    np.testing.assert_array_equal(again, images[:2])


def test_image_to_image_is_diffusers_img2img(converted):
    """The same final latents as diffusers' StableDiffusionImg2ImgPipeline (DPM-Solver++ 2M, the
    folder's timesteps) from the same initial latents and noise. diffusers draws the initial latents from the
    VAE posterior; given latents as the image, it takes them as they are, so both start from the
    posterior mean here."""
    torch = require("torch")
    diffusers = require("diffusers")
    import jax.numpy as jnp

    from jdiffsample import nets

    model_dir = converted / "sd_tiny"
    start = text2image.generate(model_dir, PROMPTS[0], guidance=None, nfe=4, seed=3)
    noise = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)
    model = nets.load_model(model_dir)
    latents = np.asarray(model.apply(jnp.asarray(start, jnp.float32) / 127.5 - 1, method="encode"))
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(fixture_dir("sd_tiny")))
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for strength in (0.5, 1.0):
        generator = torch.Generator()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            # diffusers draws its noise with randn_tensor(generator): pass it through the scheduler instead
            original = pipe.scheduler.add_noise
            pipe.scheduler.add_noise = lambda x0, _noise, t: original(x0, torch.from_numpy(
                noise.transpose(0, 3, 1, 2)), t)
            theirs = pipe(prompt=PROMPTS[0], image=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                          strength=strength, guidance_scale=1.0, num_inference_steps=6, generator=generator,
                          output_type="latent").images.numpy().transpose(0, 2, 3, 1)
            pipe.scheduler.add_noise = original
        ours = text2image.generate(model_dir, PROMPTS[0], guidance=None, solver="dpmpp", options=dict(order=2),
                                   nfe=6, grid="diffusers", image=start, strength=strength, latents=noise,
                                   return_latents=True)
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max(), strength
    with pytest.raises(ValueError, match="strength must lie in"):
        text2image.generate(model_dir, PROMPTS[0], image=start, strength=0.0, latents=noise)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "  "], "prompt 0 is empty"),
    ([], "is text-conditional: give a prompt"),
    (["--prompt", "a cat", "--height", "15"], "height and width must be positive multiples of 2"),
    (["--prompt", "a cat", "--negative-prompt", "dogs"], "a negative prompt acts through classifier-free guidance"),
    (["--prompt", "a cat", "--class-labels", "3"], "the model is unconditional"),
])
def test_bad_input(converted, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert_cli_fails(["sample", "--model", converted / "sd_tiny", "--out", out, "--num", "1", *argv], message, capsys,
                     out)


def test_bad_folders(tmp_path, capsys):
    assert cli.main(["convert", "sd", str(fixture_dir("vae_tiny")), str(tmp_path / "x")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "digits", "--prompt", "a cat", "--out", str(tmp_path / "y")]) == 2
    assert "not text-conditional" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

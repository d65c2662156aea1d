"""Tests for the ``sd3`` family (``jdiffsample.nets.sd3``): converting a Stable Diffusion 3 / 3.5 pipeline
folder, prompt encoding (CLIP-L + CLIP-G + T5 as the pipeline assembles them), the denoiser under the
folder's flow schedule, and whole images.

References: the ``sd3_tiny`` golden fixture (diffusers' ``StableDiffusion3Pipeline`` outputs: prompt
embeddings and images from CFG 5.0 with negative prompts), and diffusers' pipeline run here on a folder
with SD3.5-medium options (qk RMS norms, dual-attention layers), saved in shards, with skip-layer
guidance. Tolerances: embeddings 1e-5 relative; images 2/255 per pixel.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import assert_convert_fails, benchmark, randomize, rel_err

from jdiffsample import cli, guidance, nets, text2image
from jdiffsample.nets import sd3

RTOL = 1e-5
PIXELS = 2 / 255
#: The transformer of the SD3.5-medium-shaped folder: qk RMS norms, MMDiT-X dual attention in the
#: first blocks, fixture-sized otherwise (its text encoders, VAE and tokenizers are the fixture's).
MEDIUM = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
              joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
              pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
SLG = dict(skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
           skip_layer_guidance_stop=0.6)


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    """``(checkpoint dir, Model, io)`` of ``sd3_tiny`` converted with the CLI."""
    folder = fixture_dir("sd3_tiny")
    dst = tmp_path_factory.mktemp("sd3") / "ckpt"
    assert cli.main(["convert", "sd3", str(folder), str(dst)]) == 0
    return dst, nets.load_model(dst), dict(np.load(folder / "io.npz"))


def encode(model, dst, prompts, length):
    with jax.default_matmul_precision("highest"), pytest.warns(UserWarning, match="truncated"):
        return sd3.encode_prompts(model, dst, prompts, 16, 16, max_sequence_length=length)


def test_prompt_embeddings_match_the_pipeline(fixture_model):
    """CLIP-L/G penultimate states (the long prompt truncated to 16 tokens), zero-padded to T5's width,
    T5's sequence after them; pooled: both projections; negative prompts the same way."""
    dst, model, io = fixture_model
    length = int(io["max_sequence_length"])
    cond = encode(model, dst, list(io["prompts"]), length)
    uncond = sd3.encode_prompts(model, dst, list(io["negative_prompts"]), 16, 16, max_sequence_length=length)
    for ours, name in ((cond, "prompt"), (uncond, "negative_prompt")):
        assert rel_err(ours["context"], io[f"{name}_embeds"]) < RTOL
        assert rel_err(ours["pooled"], io[f"{name}_embeds".replace("prompt_", "pooled_prompt_")]) < RTOL
    empty = sd3.encode_prompts(model, dst, None, 16, 16, max_sequence_length=length)  # no negative prompt: ""
    assert rel_err(empty["context"][0], io["negative_prompt_embeds"][1]) < RTOL


def euler(model, cond, uncond, noise, ts, guidance):
    """A plain Euler flow sampler around the family's denoiser, CFG on the doubled batch; returns
    images in [0, 1], NHWC."""
    module, schedule = model.module, model.schedule
    both = {k: jnp.concatenate([cond[k], uncond[k]]) for k in cond}

    def step(x, t, t_next, variables):
        x0c, x0u = jnp.split(sd3.denoise(module, variables, jnp.concatenate([x, x]), t, None, schedule, **both), 2)
        x0 = x0u + guidance * (x0c - x0u)
        s, s_next = schedule.sigma(t), schedule.sigma(t_next)
        return x0 + (s_next / s) * (x - x0)

    step = jax.jit(step)
    with jax.default_matmul_precision("highest"):
        x = jnp.asarray(noise.transpose(0, 2, 3, 1))
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = step(x, jnp.float32(t), jnp.float32(t_next), model.variables)
        images = model.apply(x, method="decode")
    return np.clip(np.asarray(images) / 2 + 0.5, 0, 1)


def test_images_match_the_pipeline(fixture_model):
    """The fixture's images: CFG 5.0 with negative prompts, Euler from t = 1 on the folder's grid."""
    dst, model, io = fixture_model
    length = int(io["max_sequence_length"])
    cond = encode(model, dst, list(io["prompts"]), length)
    uncond = sd3.encode_prompts(model, dst, list(io["negative_prompts"]), 16, 16, max_sequence_length=length)
    ts = sd3.diffusers_grid(model, int(io["steps"]))
    assert model.schedule.shift == 3.0 and ts[0] == 1.0 and ts[-1] == 0.0
    images = euler(model, cond, uncond, io["noise_nchw"], ts, float(io["guidance"]))
    assert np.abs(images - io["images"]).max() <= PIXELS


@pytest.mark.parametrize("n_steps", [1, 6, 28])
def test_grid_is_the_schedulers(fixture_model, n_steps):
    """``diffusers_grid`` under the folder's shifted schedule gives FlowMatchEulerDiscreteScheduler's sigmas
    (and timesteps = 1000 sigma, the transformer's input)."""
    require("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, model, _ = fixture_model
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(fixture_dir("sd3_tiny") / "scheduler")
    scheduler.set_timesteps(n_steps)
    ts = sd3.diffusers_grid(model, n_steps)
    sigmas = np.asarray(model.schedule.sigma(jnp.asarray(ts, jnp.float32)))
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(1000 * sigmas[:-1], scheduler.timesteps.numpy(), rtol=1e-6)


def test_family_denoiser_guides_with_negative_prompts(fixture_model):
    """Today's ``Model.denoiser`` wires the family: the prompt and negative-prompt conditioning give
    uncond + w (cond - uncond) of the family's ``denoise``."""
    dst, model, io = fixture_model
    cond = sd3.encode_prompts(model, dst, ["a cat", "a dog"], 16, 16, max_sequence_length=16)
    uncond = sd3.encode_prompts(model, dst, ["blurry", ""], 16, 16, max_sequence_length=16)

    def both(x, t):
        guided = model.denoiser(conditioning=cond, uncond_conditioning=uncond, guidance=5.0)(x, t)
        parts = [sd3.denoise(model.module, model.variables, x, t, None, model.schedule, **c) for c in (cond, uncond)]
        return guided, parts[1] + 5.0 * (parts[0] - parts[1])

    guided, expected = jax.jit(both)(jnp.asarray(io["noise_nchw"].transpose(0, 2, 3, 1)), jnp.float32(0.7))
    assert rel_err(guided, expected) < 1e-5
    assert nets.get_family("sd3").sampling.conditioning(model.module) == ("context", "pooled")


@pytest.fixture(scope="module")
def medium_folder(tmp_path_factory):
    """An SD3.5-medium-shaped pipeline folder saved in shards, and diffusers' images from it (CFG with
    negative prompts, and the same with skip-layer guidance)."""
    torch = require("torch")
    require("diffusers")
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_dir("sd3_tiny"))
    pipe.transformer = randomize(SD3Transformer2DModel(**MEDIUM), seed=5)
    pipe.register_to_config(transformer=("diffusers", "SD3Transformer2DModel"))
    folder = tmp_path_factory.mktemp("sd35") / "medium"
    pipe.save_pretrained(folder, max_shard_size="150KB")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (folder / "text_encoder_3" / "model.safetensors.index.json").is_file()
    noise = np.random.default_rng(6).standard_normal((2, 16, 8, 8)).astype(np.float32)
    prompts, negative = ["a red cube", "two birds on a wire at dawn"], ["blurry", ""]
    common = dict(prompt=prompts, negative_prompt=negative, height=16, width=16, num_inference_steps=5,
                  guidance_scale=4.5, max_sequence_length=16, output_type="np")
    with torch.no_grad():
        plain = pipe(latents=torch.from_numpy(noise), **common).images
        slg = pipe(latents=torch.from_numpy(noise), **common, **SLG).images
    return folder, dict(noise=noise, prompts=prompts, negative=negative, plain=plain, slg=slg)


def test_sd35_medium_images_match_the_pipeline(medium_folder, tmp_path):
    """Converted from shards; the pipeline with --slg-layers/--slg-scale/--slg-steps gives the images
    of diffusers' pipeline with CFG and skip-layer guidance (in two of its five steps, which matter)."""
    folder, ref = medium_folder
    dst = tmp_path / "ckpt"
    assert cli.main(["convert", "sd3", str(folder), str(dst)]) == 0
    model = nets.load_model(dst)
    assert model.module.transformer.dual_attention_layers == (0, 1)
    steps = guidance.skip_layer_steps(5, SLG["skip_layer_guidance_start"], SLG["skip_layer_guidance_stop"])
    assert steps.tolist() == [False, True, True, False, False]
    assert np.abs(ref["slg"] - ref["plain"]).max() > 10 * PIXELS  # the skip-layer steps matter

    ours = []
    settings = dict(negative_prompts=ref["negative"], guidance=4.5, latents=ref["noise"].transpose(0, 2, 3, 1),
                    solver="euler", nfe=5, grid="diffusers", height=16, width=16, max_sequence_length=16,
                    slg_layers=SLG["skip_guidance_layers"], slg_scale=SLG["skip_layer_guidance_scale"],
                    slg_steps=(SLG["skip_layer_guidance_start"], SLG["skip_layer_guidance_stop"]))
    compile_seconds = benchmark("compile_once").compile_seconds
    first = compile_seconds(lambda: ours.append(text2image.generate(dst, ref["prompts"], **settings)))
    assert np.abs(ours[0] / 255.0 - ref["slg"]).max() <= PIXELS + 0.5 / 255  # uint8 rounding
    # its scale and steps are arguments of the compiled program, not constants in it
    other = dict(settings, slg_scale=1.5, slg_steps=(0.0, 0.5))
    second = compile_seconds(lambda: ours.append(text2image.generate(dst, ref["prompts"], **other)))
    assert first > 0 and second < 0.1 * first, (first, second)
    assert np.abs(ours[1].astype(int) - ours[0]).max() > 2


def test_pipeline_without_t5(tmp_path):
    """A folder saved without T5 (``text_encoder_3=None``, as diffusers allows): the T5 part of the
    context is zeros of ``max_sequence_length`` tokens, as the pipeline's ``encode_prompt`` gives."""
    torch = require("torch")
    require("diffusers")
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_dir("sd3_tiny"), text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path / "src")
    assert cli.main(["convert", "sd3", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    model = nets.load_model(tmp_path / "dst")
    assert model.module.text_encoder_3 is None and not (tmp_path / "dst" / "tokenizer_3").exists()
    prompts = ["a photo of the cat", "blurry"]
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=12)
    with jax.default_matmul_precision("highest"):
        ours = sd3.encode_prompts(model, tmp_path / "dst", prompts, 16, 16, max_sequence_length=12)
    assert ours["context"].shape == (2, 16 + 12, 64) and not np.any(np.asarray(ours["context"][:, 16:]))
    assert rel_err(ours["context"], context.numpy()) < RTOL and rel_err(ours["pooled"], pooled.numpy()) < RTOL


@pytest.mark.parametrize("case, pattern", [
    ("flux", r"the pipeline is 'FluxPipeline'; this converter reads StableDiffusion3Pipeline.*convert flux"),
    ("sd1", r"the pipeline is 'StableDiffusionPipeline'; this converter reads StableDiffusion3Pipeline.*convert sd\)"),
    ("no-vae", r"the vae/ folder is missing"),
    ("no-t5-tokenizer", r"tokenizer_3: no tokenizer.json"),
    ("no-scheduler", r"scheduler/scheduler_config.json is missing"),
    ("dynamic-shift", r"scheduler options \['use_dynamic_shifting'\] are not supported"),
    ("wide-clip", r"the CLIP projections give 96 pooled features, the transformer's pooled_projection_dim is 64"),
])
def test_bad_folders_fail_in_one_line(case, pattern, tmp_path, capsys):
    if case == "flux":
        src = fixture_dir("flux_tiny")
    elif case == "sd1":
        src = fixture_dir("sd_tiny")
    else:
        src = tmp_path / "src"
        shutil.copytree(fixture_dir("sd3_tiny"), src)
        if case == "no-vae":
            shutil.rmtree(src / "vae")
        elif case == "no-t5-tokenizer":
            (src / "tokenizer_3" / "tokenizer.json").unlink()
        elif case == "no-scheduler":
            shutil.rmtree(src / "scheduler")
        elif case == "dynamic-shift":
            path = src / "scheduler" / "scheduler_config.json"
            path.write_text(json.dumps(dict(json.loads(path.read_text()), use_dynamic_shifting=True)))
        else:
            path = src / "text_encoder_2" / "config.json"
            path.write_text(json.dumps(dict(json.loads(path.read_text()), projection_dim=64)))
    assert_convert_fails("sd3", src, tmp_path / "dst", [], pattern, capsys)


@pytest.mark.parametrize("size, pattern", [
    ((18, 16), r"positive multiples of 4 \(the VAE's factor 2 times the patch size 2\), got 18 x 16"),
    ((0, 16), r"positive multiples of 4"),
    ((16, 68), r"at most 64 pixels \(pos_embed_max_size 16 patches\), got 16 x 68"),
])
def test_image_sizes(fixture_model, size, pattern):
    """Latent shapes for sizes the VAE and the patching take (the fixture's VAE halves, patches are 2x2,
    the position grid is 16 patches wide); one ValueError line for the others."""
    _, model, _ = fixture_model
    assert sd3.sample_shape_at(model.module, 64, 32) == (32, 16, 16)
    assert sd3.sample_shape_at(model.module, 24, 60) == (12, 30, 16)
    with pytest.raises(ValueError, match=pattern):
        sd3.sample_shape_at(model.module, *size)

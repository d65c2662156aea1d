"""Tests for FLUX.1: the transformer (``jdiffsample.nets.flux_transformer``), the latent packing,
the time shift and the ``flux`` family's prompt encoding, denoiser and decoder (``nets.flux``).

References: the ``flux_tiny`` golden fixture (a FLUX.1-dev-shaped diffusers ``FluxPipeline`` folder
with random weights and what the pipeline gave: prompt embeddings, final latents, images), and the
installed diffusers (test-only): ``FluxTransformer2DModel`` on the fixture and on a schnell-shaped
model built here, ``FluxPipeline``'s packing helpers, ``FlowMatchEulerDiscreteScheduler``'s sigmas.
Tolerances: 1e-5 relative for network outputs (float32, full precision), 2/255 for images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import nchw, randomize, rel_err

from jdiffsample import cli, nets
from jdiffsample.nets import flux
from jdiffsample.nets import flux_transformer as ft

RTOL = 1e-5


def nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(folder, io, model, checkpoint dir)`` of the fixture converted with the CLI."""
    folder = fixture_dir("flux_tiny")
    dst = tmp_path_factory.mktemp("flux") / "tiny"
    assert cli.main(["convert", "flux", str(folder), str(dst)]) == 0
    return folder, np.load(folder / "io.npz"), nets.load_model(dst), dst


def _inputs(module, batch=2, h=8, w=6, length=5, seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, h, w, module.in_channels // 4)).astype(np.float32)
    return dict(latents=latents, enc=rng.standard_normal((batch, length, module.joint_attention_dim)).astype(np.float32),
                pooled=rng.standard_normal((batch, module.pooled_projection_dim)).astype(np.float32),
                t=rng.uniform(0.05, 1.0, batch).astype(np.float32), g=rng.uniform(1.0, 5.0, batch).astype(np.float32))


def _ours(module, variables, x):
    h, w = x["latents"].shape[1:3]
    ids, tids = ft.latent_image_ids(h, w), ft.text_ids(x["enc"].shape[1])
    g = x["g"] if module.guidance_embeds else None
    fn = jax.jit(lambda v, *a: module.apply(v, *a, ids, tids, g))
    with jax.default_matmul_precision("highest"):
        return np.asarray(fn(jax.tree.map(np.asarray, variables), ft.pack_latents(x["latents"]), x["enc"], x["pooled"],
                             x["t"]))


def _theirs(model, x):
    torch = require("torch")
    h, w = x["latents"].shape[1:3]
    tokens = np.asarray(ft.pack_latents(x["latents"]))
    with torch.no_grad():
        return model(hidden_states=torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(x["enc"]),
                     pooled_projections=torch.from_numpy(x["pooled"]), timestep=torch.from_numpy(x["t"]),
                     img_ids=torch.from_numpy(ft.latent_image_ids(h, w)),
                     txt_ids=torch.from_numpy(ft.text_ids(x["enc"].shape[1])),
                     guidance=torch.from_numpy(x["g"]) if model.config.guidance_embeds else None).sample.numpy()


def test_fixture_transformer_against_diffusers():
    diffusers = require("diffusers")
    folder = fixture_dir("flux_tiny") / "transformer"
    config, state_dict = ft.load_folder(folder, lazy=True)
    module = ft.build("FluxTransformer2DModel", config)
    variables = ft.convert_state_dict("FluxTransformer2DModel", config, state_dict)
    x = _inputs(module)
    theirs = _theirs(diffusers.FluxTransformer2DModel.from_pretrained(folder).eval(), x)
    assert rel_err(_ours(module, variables, x), theirs) < RTOL
    params = variables["params"]
    assert set(params["transformer_blocks_0"]) == {"img_norm", "txt_norm", "img_attn", "txt_attn", "img_mlp", "txt_mlp"}
    assert set(params["single_transformer_blocks_0"]) == {"norm", "attn", "mlp"}
    assert set(params["single_transformer_blocks_0"]["attn"]) == {"q", "k", "v", "out", "q_norm", "k_norm"}
    assert set(params["single_transformer_blocks_0"]["mlp"]["out"]) == {"kernel"}  # its bias is attn/out's


def test_schnell_shaped_transformer(tmp_path):
    """No guidance embedding, more blocks, other widths; saved sharded (read lazily)."""
    diffusers = require("diffusers")
    model = randomize(diffusers.FluxTransformer2DModel(
        num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
        pooled_projection_dim=20, guidance_embeds=False, axes_dims_rope=(2, 8, 6)), seed=3)
    model.save_pretrained(tmp_path / "schnell", max_shard_size="60KB")
    assert (tmp_path / "schnell" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    config, state_dict = ft.load_folder(tmp_path / "schnell", lazy=True)
    module = ft.build("FluxTransformer2DModel", config)
    variables = ft.convert_state_dict("FluxTransformer2DModel", config, state_dict)
    assert "guidance_embedder" not in variables["params"]["time_text_embed"]
    x = _inputs(module, batch=3, h=4, w=10, length=7, seed=1)
    assert rel_err(_ours(module, variables, x), _theirs(model.eval(), x)) < RTOL
    with pytest.raises(ValueError, match="no guidance embedding"):
        module.apply(variables, ft.pack_latents(x["latents"]), x["enc"], x["pooled"], x["t"],
                     ft.latent_image_ids(4, 10), ft.text_ids(7), x["g"])


def test_packing_matches_the_pipeline():
    torch = require("torch")
    FluxPipeline = require("diffusers").FluxPipeline
    latents = np.random.default_rng(2).standard_normal((2, 6, 10, 16)).astype(np.float32)
    tokens = np.asarray(ft.pack_latents(latents))
    np.testing.assert_array_equal(tokens, FluxPipeline._pack_latents(torch.from_numpy(nchw(latents)), 2, 16, 6, 10))
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(tokens), 6 * 8, 10 * 8, 8).numpy()
    np.testing.assert_array_equal(nchw(ft.unpack_latents(tokens, 6, 10)), unpacked)
    np.testing.assert_array_equal(ft.latent_image_ids(6, 10),
                                  FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy())
    with pytest.raises(ValueError, match="even"):
        ft.pack_latents(np.zeros((1, 5, 4, 16)))


@pytest.mark.parametrize("steps,tokens", [(6, 64), (28, 4096), (4, 1024), (50, 900)])
def test_shift_and_times_match_the_scheduler(steps, tokens):
    diffusers = require("diffusers")
    folder = fixture_dir("flux_tiny") / "scheduler"
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for config in ({}, dict(use_dynamic_shifting=False, shift=1.0), dict(use_dynamic_shifting=False, shift=3.0),
                   dict(time_shift_type="linear")):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder, **config)
        cfg = scheduler.config
        mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        assert flux.calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                                    cfg.max_shift) == pytest.approx(mu, rel=1e-12)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        schedule = flux.schedule(flux.schedule_info(dict(cfg)), tokens)
        ours = np.asarray(schedule.sigma(jnp.asarray(np.append(np.linspace(1.0, 1 / steps, steps), 0.0), jnp.float32)))
        np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=2e-6, atol=1e-7)


def test_prompt_embeddings(converted):
    _, io, model, dst = converted
    prompts = [str(p) for p in io["prompts"]]
    with pytest.warns(UserWarning, match="CLIP can only handle"):  # the fixture's CLIP takes 16 tokens
        cond = flux.encode_prompts(model, dst, prompts, 32, 32, max_sequence_length=int(io["max_sequence_length"]),
                                   guidance=float(io["guidance"]))
    assert set(cond) == set(flux.conditioning(model.module)) == {"prompt_embeds", "pooled_prompt_embeds", "guidance"}
    assert rel_err(cond["prompt_embeds"], io["t5_prompt_embeds"]) < RTOL
    assert rel_err(cond["pooled_prompt_embeds"], io["pooled_prompt_embeds"]) < RTOL  # CLIP's pooler_output
    np.testing.assert_array_equal(cond["guidance"], [io["guidance"]] * 2)
    assert flux.encode_prompts(model, dst, None, 32, 32)["prompt_embeds"].shape == (1, 512, 32)  # dev: 512 tokens


def test_fixture_images(converted):
    """A plain Euler loop on the pipeline's grid from t = 1 with the family's denoiser, unpacked and
    decoded, reproduces the pipeline's final latents and images."""
    _, io, model, dst = converted
    height, width, steps = int(io["height"]), int(io["width"]), int(io["steps"])
    cond = dict(prompt_embeds=io["t5_prompt_embeds"], pooled_prompt_embeds=io["pooled_prompt_embeds"],
                guidance=np.full(2, io["guidance"], np.float32))
    assert flux.sample_shape_at(model.module, height, width) == nhwc(io["noise_nchw"]).shape[1:]
    schedule = flux.schedule_at(model, height, width)
    fam = model.family_info

    @jax.jit
    def run(variables, x):
        ts = jnp.asarray(flux.diffusers_grid(model, steps, height, width), jnp.float32)
        for t, t_next in zip(ts[:-1], ts[1:]):
            x0 = fam.sampling.denoise(model.module, variables, x, t, None, schedule, **cond)
            x = x0 + schedule.sigma(t_next) / schedule.sigma(t) * (x - x0)  # Euler on the velocity
        return x, model.module.apply(variables, x, method="decode")

    with jax.default_matmul_precision("highest"):
        latents, images = run(model.variables, nhwc(io["noise_nchw"]))
    assert rel_err(ft.pack_latents(latents), io["final_packed_latents"]) < 1e-4
    images = np.clip(np.asarray(images) / 2 + 0.5, 0, 1)  # the pipeline's postprocess
    assert np.abs(images - io["images"]).max() < 2 / 255


def test_bfloat16_close_to_float32(converted):
    _, io, model, _ = converted
    cond = dict(prompt_embeds=io["t5_prompt_embeds"], pooled_prompt_embeds=io["pooled_prompt_embeds"],
                guidance=np.full(2, 3.5, np.float32))
    x = nhwc(io["noise_nchw"])
    schedule = flux.schedule_at(model, 32, 32)
    outs = [np.asarray(jax.jit(lambda m, x: flux.denoise(m.module, m.variables, x, 0.6, None, schedule, **cond))(m, x))
            for m in (model, model.with_dtype("bfloat16"))]
    assert outs[1].dtype == np.float32 and rel_err(outs[1], outs[0]) < 0.05


def test_sizes_and_errors(converted):
    module = converted[2].module
    assert flux.sample_shape_at(module, 64, 96) == (32, 48, 16)  # the fixture's VAE has factor 2
    for h, w in ((30, 32), (32, 0), (34, 32)):
        with pytest.raises(ValueError, match="multiples of 4") as err:
            flux.sample_shape_at(module, h, w)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="text, not class labels"):
        flux.denoise(module, converted[2].variables, jnp.zeros((1, 4, 4, 16)), 0.5, jnp.zeros(1, int), None,
                     prompt_embeds=None, pooled_prompt_embeds=None)
    with pytest.raises(ValueError, match="pass guidance"):
        module.apply(converted[2].variables, jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 3, 32)), jnp.zeros((1, 32)),
                     jnp.ones(1))

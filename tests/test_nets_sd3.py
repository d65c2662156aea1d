"""Tests for the Stable Diffusion 3 / 3.5 networks: the MMDiT (``jdiffsample.nets.sd3_transformer``)
and the 16-channel autoencoder (``nets.vae`` on SD3's VAE).

References: the ``sd3_tiny`` golden fixture (a diffusers ``StableDiffusion3Pipeline`` folder with random
weights), and diffusers' ``SD3Transformer2DModel`` built here with SD3.5-large options (``qk_norm``) and
SD3.5-medium options (``dual_attention_layers`` too), every parameter redrawn. Tolerance: max
|ours - theirs| <= 1e-5 max |theirs| (float32, full precision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import nchw, numpy_state_dict, randomize, rel_err

from jdiffsample.nets import sd3_transformer, vae

RTOL = 1e-5
CLASS = "SD3Transformer2DModel"
#: Tiny transformers with the options of the released SD3.5 models (widths and depths shrunk).
SD35 = {
    "large": dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32,
                  pooled_projection_dim=24, out_channels=16, pos_embed_max_size=12, qk_norm="rms_norm"),
    "medium": dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                   num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32,
                   pooled_projection_dim=24, out_channels=16, pos_embed_max_size=12, qk_norm="rms_norm",
                   dual_attention_layers=(0, 1)),
}


def highest(fn, *args, **kwargs):
    with jax.default_matmul_precision("highest"):
        return np.asarray(fn(*args, **kwargs))


def inputs(config, seed=0, height=6, width=8, tokens=5):
    """Random NCHW latents (not square, so the position crop is exercised), context, pooled text and
    two timesteps."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, config["in_channels"], height, width)).astype(np.float32),
            rng.standard_normal((2, tokens, config["joint_attention_dim"])).astype(np.float32),
            rng.standard_normal((2, config["pooled_projection_dim"])).astype(np.float32),
            np.array([999.0, 300.5], np.float32))


def torch_forward(ref, args, skip_layers=None):
    torch = require("torch")
    with torch.no_grad():
        return ref(*map(torch.from_numpy, args), skip_layers=skip_layers).sample.numpy()


def jax_forward(module, variables, args, skip_layers=()):
    x, context, pooled, t = args
    fn = jax.jit(lambda v, *a: module.apply(v, *a, skip_layers=skip_layers))
    return nchw(highest(fn, variables, x.transpose(0, 2, 3, 1), t, context, pooled))


@pytest.fixture(scope="module")
def fixture_transformer():
    require("diffusers")
    from diffusers import SD3Transformer2DModel

    folder = fixture_dir("sd3_tiny") / "transformer"
    config, state_dict = sd3_transformer.load_folder(folder)
    module = sd3_transformer.build(CLASS, config)
    variables = sd3_transformer.convert_state_dict(CLASS, config, state_dict)
    return config, module, variables, SD3Transformer2DModel.from_pretrained(folder).eval()


@pytest.mark.parametrize("skip", [None, (0,)], ids=["all-layers", "skip-0"])
def test_fixture_transformer_matches_diffusers(fixture_transformer, skip):
    config, module, variables, ref = fixture_transformer
    args = inputs(config)
    ours = jax_forward(module, variables, args, skip or ())
    assert rel_err(ours, torch_forward(ref, args, list(skip) if skip else None)) < RTOL


@pytest.mark.parametrize("name", sorted(SD35))
def test_sd35_options_match_diffusers(name):
    """qk RMS norms (SD3.5 large), dual-attention MMDiT-X layers (SD3.5 medium), a 3-block stack whose
    last block is context_pre_only, and skip-layer guidance's skipped blocks."""
    require("diffusers")
    from diffusers import SD3Transformer2DModel

    config = SD35[name]
    ref = randomize(SD3Transformer2DModel(**config), seed=3)
    module = sd3_transformer.build(CLASS, config)
    variables = sd3_transformer.convert_state_dict(CLASS, config, numpy_state_dict(ref))
    args = inputs(config, seed=1, height=8, width=4, tokens=7)
    assert rel_err(jax_forward(module, variables, args), torch_forward(ref, args)) < RTOL
    if name == "medium":  # SD3.5 medium's skip-layer guidance skips middle blocks (its default: 7, 8, 9)
        assert rel_err(jax_forward(module, variables, args, (1,)), torch_forward(ref, args, [1])) < RTOL


def test_bfloat16_compute_stays_close(fixture_transformer):
    config, module, variables, _ = fixture_transformer
    args = inputs(config)
    full = jax_forward(module, variables, args)
    bf16 = jax_forward(sd3_transformer.build(CLASS, config, dtype=jnp.bfloat16), variables, args)
    assert bf16.dtype == np.float32 and 0 < rel_err(bf16, full) < 0.05


def test_float16_weights_kept_as_stored(fixture_transformer):
    """``dtype=None`` keeps a float16 file's tensors (the converter's choice for released fp16 folders);
    the float32 network computes with them exactly as with their float32 copies."""
    config, module, _, _ = fixture_transformer
    _, state_dict = sd3_transformer.load_folder(fixture_dir("sd3_tiny") / "transformer")
    half = {k: v.astype(np.float16) for k, v in state_dict.items()}
    kept = sd3_transformer.convert_state_dict(CLASS, config, half, dtype=None)
    widened = sd3_transformer.convert_state_dict(CLASS, config, half)
    assert {a.dtype for a in jax.tree.leaves(kept)} == {np.dtype(np.float16)}
    args = inputs(config)
    assert rel_err(jax_forward(module, kept, args), jax_forward(module, widened, args)) < 1e-6


def test_position_table_and_conversion_checks(fixture_transformer):
    config, module, _, _ = fixture_transformer
    _, state_dict = sd3_transformer.load_folder(fixture_dir("sd3_tiny") / "transformer")
    table = sd3_transformer.pos_embed_table(32, 16, 4)
    assert np.abs(table - state_dict["pos_embed.pos_embed"][0]).max() < 1e-6
    bad = dict(state_dict, **{"pos_embed.pos_embed": state_dict["pos_embed.pos_embed"] * 1.01})
    with pytest.raises(ValueError, match="pos_embed.pos_embed is not the sin-cos table"):
        sd3_transformer.convert_state_dict(CLASS, config, bad)
    partial = {k: v for k, v in state_dict.items() if "blocks.1.attn.add_q_proj" not in k}
    with pytest.raises(ValueError, match=r"missing keys \(2: transformer_blocks.1.attn.add_q_proj"):
        sd3_transformer.convert_state_dict(CLASS, config, partial)
    with pytest.raises(ValueError, match=r"unexpected keys \(1: extra"):
        sd3_transformer.convert_state_dict(CLASS, config, dict(state_dict, extra=np.zeros(1, np.float32)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is not supported"),
    (dict(caption_projection_dim=48), "caption_projection_dim=48 must equal"),
    (dict(dual_attention_layers=(5,)), "dual_attention_layers must be block indices"),
    (dict(use_fancy=True), r"unsupported config entries \['use_fancy'\]"),
])
def test_bad_configs(kwargs, message):
    config = dict(SD35["medium"], **kwargs)
    with pytest.raises(ValueError, match=message):
        sd3_transformer.build(CLASS, config)


@pytest.mark.parametrize("shape, message", [
    ((1, 5, 8, 16), "positive multiples of the patch size 2"),
    ((1, 26, 8, 16), r"13 x 4 patches; the position grid allows at most 12 x 12"),
])
def test_bad_latent_sizes(shape, message):
    module = sd3_transformer.build(CLASS, SD35["large"])
    variables = jax.eval_shape(module.init, jax.random.key(0), *sd3_transformer.example_inputs(module))
    x = jnp.zeros(shape)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.apply, variables, x, jnp.zeros(1), jnp.zeros((1, 2, 48)), jnp.zeros((1, 24)))


def test_sd3_vae_matches_diffusers():
    """SD3's autoencoder: 16 latent channels, no quant convs (``use_quant_conv=False``,
    ``use_post_quant_conv=False``), ``shift_factor``; decode and encode (posterior mean and log-variance)."""
    torch = require("torch")
    require("diffusers")
    from diffusers import AutoencoderKL

    folder = fixture_dir("sd3_tiny") / "vae"
    config, state_dict = vae.load_folder(folder)
    assert config["latent_channels"] == 16 and not config["use_quant_conv"] and not config["use_post_quant_conv"]
    module = vae.build("AutoencoderKL", config)
    variables = vae.convert_state_dict("AutoencoderKL", config, state_dict)
    assert "quant_conv" not in variables["params"] and "post_quant_conv" not in variables["params"]
    assert (module.scaling_factor, module.shift_factor) == (config["scaling_factor"], config["shift_factor"])
    ref = AutoencoderKL.from_pretrained(folder).eval()
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((2, 16, 4, 6)).astype(np.float32)
    images = rng.uniform(-1, 1, (2, 3, 8, 12)).astype(np.float32)
    with torch.no_grad():
        decoded = ref.decode(torch.from_numpy(latents)).sample.numpy()
        dist = ref.encode(torch.from_numpy(images)).latent_dist
        mean, logvar = dist.mean.numpy(), dist.logvar.numpy()
    run = jax.jit(lambda v, z, x: (module.apply(v, z, method="decode"), module.apply(v, x, method="posterior")))
    with jax.default_matmul_precision("highest"):
        ours_decoded, (ours_mean, ours_logvar) = run(variables, latents.transpose(0, 2, 3, 1),
                                                     images.transpose(0, 2, 3, 1))
    assert rel_err(nchw(ours_decoded), decoded) < RTOL
    assert rel_err(nchw(ours_mean), mean) < RTOL and rel_err(nchw(ours_logvar), logvar) < RTOL

"""Tests for the Flax port of guided-diffusion's UNetModel (jdiffsample.nets.adm)."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_skips_scaled, skip_consumer_inputs
from conftest import activation_dtypes, fixture_dir
from flax import traverse_util

from jdiffsample import schedules
from jdiffsample.nets import adm

from jdiffsample.nets.formats import torchfile


# A small random-weights configuration exercising attention in the encoder, middle and decoder.
TINY = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_classes=3,
            num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
            use_new_attention_order=True)


def _tiny_inputs():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float32)
    return x, jnp.array([3, 700]), jnp.array([0, 2])


def _abstract(model):
    return jax.eval_shape(model.init, jax.random.key(0), *adm.example_inputs(model))


def _zeros_state_dict(kwargs):
    """A state_dict with every key and shape the converter expects, in PyTorch layout."""
    abstract = _abstract(adm.build(kwargs))
    return {adm._torch_key(path): np.zeros(adm._torch_shape(path, leaf.shape), np.float32)
            for path, leaf in traverse_util.flatten_dict(abstract["params"]).items()}


def _random_state_dict(kwargs, seed=0):
    """Random PyTorch-layout weights: fan-in scaled matrices, norm scales near 1, small biases."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, zeros in _zeros_state_dict(kwargs).items():
        noise = rng.standard_normal(zeros.shape).astype(np.float32)
        if zeros.ndim > 1:
            sd[key] = noise / np.sqrt(np.prod(zeros.shape[1:]))
        else:
            sd[key] = noise * 0.1 + (1.0 if key.endswith(".weight") else 0.0)
    return sd


@functools.cache
def _jitted_apply(model):
    return jax.jit(model.apply)


def _apply(kwargs, variables, *inputs, dtype=jnp.float32):
    """Jitted forward (one compile per configuration and input signature) as numpy, with float32
    convolutions and matmuls at full precision (GPUs default to TF32, about 1e-3 relative)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(_jitted_apply(adm.build(kwargs, dtype=dtype))(variables, *inputs))


@pytest.fixture(scope="module")
def tiny():
    """(kwargs, variables, inputs) of the TINY model with random weights."""
    return TINY, adm.convert_state_dict(TINY, _random_state_dict(TINY)), _tiny_inputs()


@pytest.fixture(scope="module")
def guided():
    """The adm_guided_tiny golden fixture: (kwargs, converted variables, NHWC inputs, output)."""
    folder = fixture_dir("adm_guided_tiny")
    kwargs = json.loads((folder / "config.json").read_text())["kwargs"]
    variables = adm.convert_state_dict(
        kwargs, torchfile.load_state_dict(folder / "state_dict.pt"))
    io = np.load(folder / "io.npz")
    inputs = (io["x"].transpose(0, 2, 3, 1), io["timesteps"], io["y"])
    return kwargs, variables, inputs, io["output"].transpose(0, 2, 3, 1)


def test_matches_guided_diffusion_fixture(guided):
    kwargs, variables, inputs, expected = guided
    out = _apply(kwargs, variables, *inputs)
    assert out.dtype == np.float32 and out.shape == expected.shape
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


def test_legacy_order_equals_new_order_with_permuted_qkv(guided):
    """QKVAttentionLegacy reads qkv channel h*3c_h + j*c_h + c where QKVAttention reads
    j*C + h*c_h + c; permuting the qkv outputs accordingly must give the same network."""
    kwargs, variables, inputs, expected = guided
    legacy = {**kwargs, "use_new_attention_order": False}

    flat = traverse_util.flatten_dict(variables["params"])
    permuted = dict(flat)
    for path, w in flat.items():
        if path[-2] == "qkv":
            c = w.shape[-1] // 3
            heads = c // kwargs["num_head_channels"]
            perm = np.arange(3 * c).reshape(3, heads, c // heads).transpose(1, 0, 2).ravel()
            permuted[path] = w[..., perm]
    permuted_vars = {**variables, "params": traverse_util.unflatten_dict(permuted)}

    out = _apply(legacy, permuted_vars, *inputs)
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
    unpermuted = _apply(legacy, variables, *inputs)
    assert np.abs(unpermuted - expected).max() > 1e-3 * np.abs(expected).max()


def test_both_attention_orders_run_and_differ(tiny):
    kwargs, variables, inputs = tiny
    new = _apply(kwargs, variables, *inputs)
    old = _apply({**kwargs, "use_new_attention_order": False}, variables, *inputs)
    assert np.all(np.isfinite(old))
    assert np.abs(new - old).max() > 1e-4


def test_scalar_and_float_timesteps(tiny):
    kwargs, variables, (x, _, y) = tiny
    batched = _apply(kwargs, variables, x, jnp.array([417, 417]), y)
    np.testing.assert_array_equal(_apply(kwargs, variables, x, 417, y), batched)
    np.testing.assert_array_equal(_apply(kwargs, variables, x, jnp.float32(417.0), y), batched)


def test_label_required_iff_conditional(tiny):
    kwargs, variables, (x, t, _) = tiny
    with pytest.raises(ValueError, match="class-conditional"):
        adm.build(kwargs).apply(variables, x, t)


def test_only_dims_2():
    with pytest.raises(ValueError, match="dims"):
        adm.build({**TINY, "dims": 3})


def test_skip_collection_names(tiny):
    kwargs, variables, _ = tiny
    n_out = len(kwargs["channel_mult"]) * (kwargs["num_res_blocks"] + 1)
    names = list(variables["skip"])
    assert sorted(names) == [f"{j:02d}_output_blocks.{j}" for j in range(n_out)]
    for value in variables["skip"].values():
        assert value.shape == () and value.dtype == jnp.float32 and value == 1.0
    # One scale per long skip, deepest first: 16 for the 64x64 model, 18 for 256x256.
    for preset, count in (("64x64", 16), ("256x256", 18)):
        skip = _abstract(adm.build(adm.PRESETS[preset]))["skip"]
        assert sorted(skip) == [adm.skip_name(j) for j in range(count)]


def test_each_skip_scale_scales_its_concatenated_copy(tiny):
    """Skip j scaled by 2^-(j+1): output block j's first block gets exactly those multiples of the
    unscaled run's skip channels (recorded at its input), and the deepest consumer the same main path."""
    kwargs, variables, inputs = tiny
    names = sorted(variables["skip"])
    consumers = {f"output_blocks_{j}_0" for j in range(len(names))}
    model = adm.build(kwargs)
    inputs_of = skip_consumer_inputs(lambda v: model.apply(v, *inputs), variables, lambda m: m.name in consumers)
    assert_skips_scaled(inputs_of, {n: 2.0 ** -(j + 1) for j, n in enumerate(names)})


def test_bfloat16_close_to_float32(tiny):
    """bf16 compute: close to float32 but not equal, with most activations in bfloat16."""
    kwargs, variables, inputs = tiny
    ref = _apply(kwargs, variables, *inputs)
    out = _apply(kwargs, variables, *inputs, dtype=jnp.bfloat16)
    assert out.dtype == np.float32
    error = np.abs(out - ref).max() / np.abs(ref).max()
    assert 1e-4 < error <= 5e-2, error
    dtypes = activation_dtypes(adm.build(kwargs, dtype=jnp.bfloat16), variables, *inputs)
    assert dtypes.get("bfloat16", 0) > dtypes.get("float32", 0), dtypes


def test_converter_layout():
    sd = _zeros_state_dict(TINY)
    rng = np.random.default_rng(0)
    for key in ("input_blocks.0.0.weight", "time_embed.0.weight", "middle_block.1.qkv.weight",
                "label_emb.weight"):
        sd[key] = rng.standard_normal(sd[key].shape).astype(np.float32)
    params = adm.convert_state_dict(TINY, sd)["params"]
    np.testing.assert_array_equal(params["input_blocks_0_0"]["kernel"],
                                  sd["input_blocks.0.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["time_embed_0"]["kernel"], sd["time_embed.0.weight"].T)
    np.testing.assert_array_equal(params["middle_block_1"]["qkv"]["kernel"],
                                  sd["middle_block.1.qkv.weight"][:, :, 0].T)
    np.testing.assert_array_equal(params["label_emb"]["embedding"], sd["label_emb.weight"])


def test_converter_is_strict():
    sd = _zeros_state_dict(TINY)
    assert adm.convert_state_dict(TINY, sd)["skip"].keys() == {
        adm.skip_name(j) for j in range(4)}

    missing = {k: v for k, v in sd.items() if k != "out.2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1: out\.2\.bias\)"):
        adm.convert_state_dict(TINY, missing)

    extra = {**sd, "input_blocks.0.1.weight": np.zeros(3), "foo": np.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \(2: foo, input_blocks\.0\.1"):
        adm.convert_state_dict(TINY, extra)

    bad = {**sd, "middle_block.1.qkv.weight": np.zeros((192, 64), np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatches \(1: middle_block\.1\.qkv\.weight"):
        adm.convert_state_dict(TINY, bad)


def test_converter_handles_resample_convs():
    """Without resblock_updown the original uses Downsample(op) / Upsample(conv) layers."""
    kwargs = {**TINY, "resblock_updown": False, "use_scale_shift_norm": False,
              "channel_mult": (1, 1, 2), "image_size": 8}
    sd = _zeros_state_dict(kwargs)
    assert {"input_blocks.2.0.op.weight", "input_blocks.4.0.op.weight",
            "output_blocks.1.1.conv.weight", "output_blocks.3.2.conv.weight"} <= set(sd)
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 128)
    variables = adm.convert_state_dict(kwargs, sd)
    x, t, y = _tiny_inputs()
    assert _apply(kwargs, variables, x, t, y).shape == (2, 8, 8, 6)

    no_conv = _zeros_state_dict({**kwargs, "conv_resample": False})
    assert not any(k.endswith((".op.weight", ".conv.weight")) for k in no_conv)


def test_presets_match_released_models():
    # Parameter counts of the released checkpoints (see the reference tables).
    counts = {"64x64": 295_904_454, "256x256": 553_838_086, "256x256_uncond": 552_814_086}
    for name, count in counts.items():
        params = _abstract(adm.build(adm.PRESETS[name]))["params"]
        assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)) == count
    assert set(adm.DIFFUSION_PRESETS) == set(adm.PRESETS)
    for name, diffusion in adm.DIFFUSION_PRESETS.items():
        assert diffusion["diffusion_steps"] == 1000 and diffusion["learn_sigma"]
        assert diffusion["noise_schedule"] == ("cosine" if name == "64x64" else "linear")
        assert adm.PRESETS[name]["out_channels"] == 6


@pytest.mark.parametrize("steps", [1000, 250])
def test_betas_linear(steps):
    betas = schedules.guided_diffusion_betas("linear", steps)
    assert betas.dtype == np.float64 and betas.shape == (steps,)
    assert betas[0] == pytest.approx(1e-4 * 1000 / steps, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * 1000 / steps, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), np.diff(betas)[0], rtol=1e-9)


@pytest.mark.parametrize("steps", [1000, 50])
def test_betas_cosine(steps):
    betas = schedules.guided_diffusion_betas("cosine", steps)
    assert betas.dtype == np.float64 and betas.shape == (steps,)
    t = np.arange(1, steps + 1) / steps
    alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    alpha_bar0 = np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    unclipped = betas < 0.999
    assert betas.max() == 0.999 and betas[-1] == 0.999 and unclipped[:-1].all()
    np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], (alpha_bar / alpha_bar0)[:-1],
                               rtol=1e-10)


def test_betas_unknown_schedule():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        schedules.guided_diffusion_betas("quadratic", 10)

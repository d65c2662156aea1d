"""Tests for the Flax port of diffusers' ``AutoencoderKL`` (``jdiffsample.nets.vae``), its building
blocks (``diffusers_blocks``) and the diffusers folder reader (``diffusers_folder``).

References: the ``vae_tiny`` golden fixture, and diffusers itself (installed, test-only) on more
configurations and on the single blocks, all with random weights (every parameter redrawn so that
nothing is zero). Tolerance: max |ours - theirs| <= 1e-5 max |theirs| (float32, full precision).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import nchw, numpy_state_dict, randomize, rel_err
from flax.traverse_util import flatten_dict

from jdiffsample.nets import diffusers_blocks as blocks
from jdiffsample.nets import vae
from jdiffsample.nets.formats import diffusers_folder, statedict

RTOL = 1e-5


def nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


class Converted:
    """A VAE built and converted from (config, state_dict), with jitted methods: ``"decode"``, and
    ``"encode"``, which returns ``(encode(x), posterior(x))`` (one compilation for both)."""

    def __init__(self, config, state_dict):
        self.module = vae.build("AutoencoderKL", config)
        self.variables = vae.convert_state_dict("AutoencoderKL", config, state_dict)
        self._fns = {
            "decode": jax.jit(lambda v, z: self.module.apply(v, z, method="decode")),
            "encode": jax.jit(lambda v, x: (self.module.apply(v, x, method="encode"),
                                            self.module.apply(v, x, method="posterior"))),
        }

    def __call__(self, method, x):
        with jax.default_matmul_precision("highest"):
            out = self._fns[method](self.variables, jnp.asarray(x))
        return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def tiny():
    folder = fixture_dir("vae_tiny")
    config, state_dict = vae.load_folder(folder)
    return folder, config, state_dict, Converted(config, state_dict), np.load(folder / "io.npz")


# ---------------------------------------------------------------------------------------------
# The golden fixture


def test_fixture_decode_and_encode(tiny):
    _, _, _, net, io = tiny
    decoded = net("decode", nhwc(io["latents"]))
    encoded, _ = net("encode", nhwc(io["images"]))
    assert decoded.dtype == encoded.dtype == np.float32
    assert rel_err(decoded, nhwc(io["decoded"])) <= RTOL
    assert rel_err(encoded, nhwc(io["encoded_mean"])) <= RTOL


def test_posterior_and_sampling(tiny):
    _, _, _, net, io = tiny
    encoded, (mean, logvar) = net("encode", nhwc(io["images"]))
    np.testing.assert_array_equal(mean, encoded)
    assert logvar.shape == mean.shape and logvar.min() >= -30 and logvar.max() <= 20
    key = jax.random.key(3)
    draw = vae.sample_latents(key, mean, logvar)
    expected = mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mean.shape))
    np.testing.assert_allclose(draw, expected, rtol=1e-6, atol=1e-6)


def test_module_records_config(tiny):
    _, config, _, net, _ = tiny
    m = net.module
    assert (m.scaling_factor, m.shift_factor, m.force_upcast, m.sample_size) == (0.18215, None, True, 32)
    assert m.block_out_channels == (32, 64) and hash(m)
    assert config["_class_name"] == "AutoencoderKL"


def test_bfloat16_close_to_float32(tiny):
    _, config, state_dict, net, io = tiny
    module = vae.build("AutoencoderKL", config, dtype=jnp.bfloat16)
    latents = nhwc(io["latents"])
    run = jax.jit(lambda v, z: module.apply(v, z, method="decode", capture_intermediates=True,
                                            mutable=["intermediates"]))
    out, inter = run(net.variables, latents)
    assert out.dtype == jnp.float32
    assert 0 < rel_err(out, net("decode", latents)) < 3e-2
    outputs = {"/".join(k[:-1]): v[0] for k, v in flatten_dict(inter["intermediates"]).items()}
    convs = [v for k, v in outputs.items() if k.endswith(("conv1", "conv2", "to_q", "conv_in"))]
    assert len(convs) > 10 and all(v.dtype == jnp.bfloat16 for v in convs)


# ---------------------------------------------------------------------------------------------
# diffusers' AutoencoderKL on more configurations

CONFIGS = {
    # 3 blocks, 2 ResNets per encoder block, no quant convs, no mid-block attention, 16 latents.
    "deep_plain": dict(block_out_channels=[16, 32, 32], layers_per_block=2, latent_channels=16,
                       norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                       mid_block_add_attention=False),
    # 3 blocks with attention, quant convs, 1 input channel and 2 output channels.
    "deep_attn": dict(block_out_channels=[8, 16, 24], layers_per_block=1, latent_channels=4,
                      norm_num_groups=4, in_channels=1, out_channels=2),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def diffusers_vae(request, tmp_path_factory):
    """(diffusers model, Converted) for one configuration, saved and read back as a folder."""
    require("torch")
    diffusers = require("diffusers")
    cfg = CONFIGS[request.param]
    n = len(cfg["block_out_channels"])
    model = randomize(diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n,
                                              up_block_types=["UpDecoderBlock2D"] * n, **cfg), seed=n)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    config, state_dict = vae.load_folder(folder)
    return model, Converted(config, state_dict)


def test_diffusers_decode(diffusers_vae):
    torch = require("torch")
    model, net = diffusers_vae
    latents = np.random.default_rng(0).standard_normal((2, 3, 5, model.config.latent_channels),
                                                       np.float32)
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(nchw(latents))).sample.numpy()
    assert rel_err(net("decode", latents), nhwc(expected)) <= RTOL


def test_diffusers_encode(diffusers_vae):
    torch = require("torch")
    model, net = diffusers_vae
    images = np.random.default_rng(1).uniform(-1, 1, (2, 13, 11, model.config.in_channels))
    images = images.astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(nchw(images))).latent_dist
    _, (mean, logvar) = net("encode", images)  # odd sizes: the (0, 1, 0, 1) pad matters
    assert rel_err(mean, nhwc(dist.mean.numpy())) <= RTOL
    assert rel_err(logvar, nhwc(dist.logvar.numpy())) <= RTOL


# ---------------------------------------------------------------------------------------------
# The building blocks against diffusers' own (as a Stable Diffusion UNet uses them)


def _flax_params(module, state_dict, *inputs):
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return statedict.match(abstract, state_dict, layout=blocks.LAYOUT)


def _check_block(torch_block, flax_block, torch_inputs, flax_inputs):
    """Relative error of the Flax block (NHWC) against the diffusers block (NCHW)."""
    torch = require("torch")
    variables = _flax_params(flax_block, numpy_state_dict(torch_block), *flax_inputs)
    with torch.no_grad():
        expected = torch_block(*[None if a is None else torch.from_numpy(a) for a in torch_inputs])
    with jax.default_matmul_precision("highest"):
        out = flax_block.apply(variables, *flax_inputs)
    return rel_err(out, nhwc(expected.numpy()))


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_resnet_block_with_time_embedding(norm):
    require("torch")
    resnet = require("diffusers.models.resnet")
    rng = np.random.default_rng(2)
    x, temb = rng.standard_normal((2, 6, 5, 16), np.float32), rng.standard_normal((2, 24), np.float32)
    ref = randomize(resnet.ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=24, groups=4,
                                         groups_out=8, eps=1e-5, time_embedding_norm=norm,
                                         output_scale_factor=1.5), seed=4)
    ours = blocks.ResnetBlock2D(32, groups=4, groups_out=8, eps=1e-5, time_embedding_norm=norm,
                                output_scale_factor=1.5)
    assert _check_block(ref, ours, (nchw(x), temb), (x, temb)) <= RTOL


def test_resnet_block_forced_shortcut_without_bias():
    require("torch")
    resnet = require("diffusers.models.resnet")
    x = np.random.default_rng(3).standard_normal((1, 4, 4, 8), np.float32)
    ref = randomize(resnet.ResnetBlock2D(in_channels=8, temb_channels=None, groups=2,
                                         use_in_shortcut=True, conv_shortcut_bias=False), seed=5)
    ours = blocks.ResnetBlock2D(groups=2, use_in_shortcut=True, conv_shortcut_bias=False)
    assert "conv_shortcut.weight" in ref.state_dict() and "conv_shortcut.bias" not in ref.state_dict()
    assert _check_block(ref, ours, (nchw(x), None), (x,)) <= RTOL


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding):
    require("torch")
    down = require("diffusers.models.downsampling")
    x = np.random.default_rng(4).standard_normal((1, 7, 6, 4), np.float32)
    ref = randomize(down.Downsample2D(4, use_conv=True, out_channels=8, padding=padding, name="op"), seed=6)
    assert _check_block(ref, blocks.Downsample2D(8, padding=padding), (nchw(x),), (x,)) <= RTOL


@pytest.mark.parametrize("size", [None, (5, 7), (9, 3)])
def test_upsample(size):
    torch = require("torch")
    up = require("diffusers.models.upsampling")
    x = np.random.default_rng(5).standard_normal((1, 3, 4, 4), np.float32)
    ref = randomize(up.Upsample2D(4, use_conv=True, out_channels=6), seed=7)
    ours = blocks.Upsample2D(6)
    variables = _flax_params(ours, numpy_state_dict(ref), x)
    with torch.no_grad():
        expected = ref(torch.from_numpy(nchw(x)), output_size=size).numpy()
    with jax.default_matmul_precision("highest"):
        out = ours.apply(variables, x, size)
    assert rel_err(out, nhwc(expected)) <= RTOL


def test_nearest_resize_matches_torch():
    torch = require("torch")
    x = np.arange(2 * 11 * 13, dtype=np.float32).reshape(1, 11, 13, 2)
    for size in [(21, 25), (22, 26), (17, 29), (11, 13), (40, 7)]:
        expected = torch.nn.functional.interpolate(torch.from_numpy(nchw(x)), size=size, mode="nearest")
        np.testing.assert_array_equal(blocks.nearest_resize(x, size), nhwc(expected.numpy()))


def test_cross_attention_multi_head():
    torch = require("torch")
    attention = require("diffusers.models.attention_processor")
    rng = np.random.default_rng(6)
    x, context = rng.standard_normal((2, 10, 16), np.float32), rng.standard_normal((2, 7, 12), np.float32)
    ref = randomize(attention.Attention(16, cross_attention_dim=12, heads=2, dim_head=8), seed=8)
    ours = blocks.Attention(heads=2, dim_head=8)
    variables = _flax_params(ours, numpy_state_dict(ref), x, context)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context)).numpy()
    with jax.default_matmul_precision("highest"):
        assert rel_err(ours.apply(variables, x, context), expected) <= RTOL


def test_group_norm_attention_on_image_with_rescale():
    require("torch")
    attention = require("diffusers.models.attention_processor")
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 16), np.float32)
    ref = randomize(attention.Attention(16, heads=4, dim_head=4, norm_num_groups=4, eps=1e-6,
                                        bias=True, residual_connection=True,
                                        rescale_output_factor=2.0), seed=9)
    ours = blocks.Attention(heads=4, norm_num_groups=4, eps=1e-6, use_bias=True,
                            residual_connection=True, rescale_output_factor=2.0)
    assert _check_block(ref, ours, (nchw(x),), (x,)) <= RTOL


# ---------------------------------------------------------------------------------------------
# Reading folders


def test_bin_folder_through_safe_reader(tiny, tmp_path):
    torch = require("torch")
    folder, config, state_dict, _, _ = tiny
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()},
               tmp_path / "diffusion_pytorch_model.bin")
    config2, state_dict2 = vae.load_folder(tmp_path)
    assert config2 == config and list(state_dict2) == list(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(state_dict2[k], v)


def test_fp16_variant_and_shards(tiny, tmp_path):
    safetensors_numpy = require("safetensors.numpy")
    folder, config, state_dict, _, _ = tiny
    half = {k: v.astype(np.float16) for k, v in state_dict.items()}
    variant = tmp_path / "variant"
    variant.mkdir()
    (variant / "config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(half, variant / "diffusion_pytorch_model.fp16.safetensors")
    _, loaded = vae.load_folder(variant)
    assert all(loaded[k].dtype == np.float16 and np.array_equal(loaded[k], half[k]) for k in half)
    assert vae.convert_state_dict("AutoencoderKL", config, loaded)["params"]["encoder"]["conv_in"][
        "kernel"].dtype == np.float32

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(state_dict)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, part in shards.items():
        safetensors_numpy.save_file({k: state_dict[k] for k in part}, sharded / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = diffusers_folder.read_weights(sharded)
    assert sorted(loaded) == sorted(keys)
    assert all(np.array_equal(loaded[k], state_dict[k]) for k in keys)
    index["weight_map"]["extra.weight"] = "a.safetensors"
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="extra.weight"):
        diffusers_folder.read_weights(sharded)


def test_transformers_names(tmp_path):
    torch = require("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    path = diffusers_folder.weights_file(tmp_path, "model", bin_stem="pytorch_model")
    assert path.name == "pytorch_model.bin"
    weights = diffusers_folder.read_weights(tmp_path, "model", bin_stem="pytorch_model")
    np.testing.assert_array_equal(weights["w"], [1, 1])


def one_line_error(fn, *args, match=None):
    with pytest.raises(ValueError, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_folder_errors(tiny, tmp_path):
    folder = tiny[0]
    one_line_error(vae.load_folder, tmp_path, match="no config.json")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    one_line_error(vae.load_folder, tmp_path, match="no weights file")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    one_line_error(vae.load_folder, tmp_path, match="not AutoencoderKL")
    (tmp_path / "config.json").write_text("[1, 2")
    one_line_error(vae.load_folder, tmp_path, match="not valid JSON")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    one_line_error(vae.load_folder, tmp_path, match="safetensors")
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"garbage")
    one_line_error(vae.load_folder, tmp_path, match="not a PyTorch checkpoint")


# ---------------------------------------------------------------------------------------------
# Conversion and construction errors


def test_legacy_attention_names(tiny):
    _, config, state_dict, net, _ = tiny
    legacy = {}
    for k, v in state_dict.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    converted = vae.convert_state_dict("AutoencoderKL", config, legacy)
    jax.tree.map(np.testing.assert_array_equal, converted, net.variables)
    both = {**state_dict, "encoder.mid_block.attentions.0.query.bias": state_dict[
        "encoder.mid_block.attentions.0.to_q.bias"]}
    one_line_error(vae.convert_state_dict, "AutoencoderKL", config, both,
                   match=r"unexpected keys \(1: encoder.mid_block.attentions.0.query.bias\)")


def test_matcher_errors(tiny):
    _, config, state_dict, _, _ = tiny

    def convert(sd, cfg=config):
        return vae.convert_state_dict("AutoencoderKL", cfg, sd)

    missing = {k: v for k, v in state_dict.items() if k != "decoder.conv_out.bias"}
    one_line_error(convert, missing, match=r"missing keys \(1: decoder.conv_out.bias\)")
    extra = {**state_dict, "decoder.extra.weight": np.zeros(3)}
    one_line_error(convert, extra, match=r"unexpected keys \(1: decoder.extra.weight\)")
    wrong = {**state_dict, "quant_conv.weight": np.zeros((8, 8, 3, 3))}
    one_line_error(convert, wrong,
                   match=r"shape mismatches \(1: quant_conv.weight \(8, 8, 3, 3\) != \(8, 8, 1, 1\)\)")
    one_line_error(convert, state_dict, {**config, "use_quant_conv": False},
                   match="unexpected keys .*quant_conv.weight")


@pytest.mark.parametrize("change, match", [
    (dict(act_fn="gelu"), "act_fn 'gelu' is not supported"),
    (dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]), "down_block_types"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types"),
    (dict(norm_num_groups=24), "divisible by norm_num_groups=24"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(block_out_channels=[]), "block_out_channels is empty"),
    (dict(norm_type="spatial"), r"unsupported config entries \['norm_type'\]"),
])
def test_build_errors(tiny, change, match):
    config = {**tiny[1], **change}
    one_line_error(vae.build, "AutoencoderKL", config, match=match)


def test_build_ignores_metadata_and_rejects_other_classes(tiny):
    config = {**tiny[1], "_name_or_path": "stabilityai/sd-vae-ft-mse"}
    assert vae.build("AutoencoderKL", config) == tiny[3].module
    one_line_error(vae.build, "AutoencoderTiny", config,
                   match="unsupported VAE class 'AutoencoderTiny'")
    with pytest.raises(ValueError, match="ada_group"):
        blocks.ResnetBlock2D(time_embedding_norm="ada_group")

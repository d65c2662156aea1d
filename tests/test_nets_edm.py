"""Tests for the Flax ports of the NVlabs/edm networks (``jdiffsample.nets.edm``).

The golden fixtures in ``../shared/fixtures`` hold small networks built with the original PyTorch
code, random weights, and the outputs of the original forward pass (see their README).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_skips_scaled, skip_consumer_inputs
from conftest import activation_dtypes, fixture_dir

from jdiffsample.nets import edm, edm_unets

from jdiffsample.nets.formats import torchfile

EDM_FIXTURES = ["edm_ddpmpp_vp_tiny", "edm_ncsnpp_ve_tiny", "edm_adm_edm_tiny"]

# All three fixtures have three resolutions (16, 8, 4) and two blocks per resolution, so the
# decoder concatenates 3 x 3 skips, deepest first.
EXPECTED_SKIPS = [
    f"{j:02d}_{block}" for j, block in enumerate(
        f"{res}x{res}_block{idx}" for res in (4, 8, 16) for idx in range(3))
]


@functools.lru_cache(maxsize=None)
def _fixture(name: str):
    """(config, state_dict, inputs, expected output), arrays converted to NHWC."""
    folder = fixture_dir(name)
    config = json.loads((folder / "config.json").read_text())
    state_dict = torchfile.load_state_dict(folder / "state_dict.pt")
    io = np.load(folder / "io.npz")
    inputs = (io["x"].transpose(0, 2, 3, 1), io["sigma"],
              io["class_labels"] if "class_labels" in io else None)
    return config, state_dict, inputs, io["output"].transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _converted(name: str, dtype=jnp.float32):
    """(module, variables, jitted apply) for a fixture."""
    config, state_dict, _, _ = _fixture(name)
    module = edm.build(config["class_name"], config["kwargs"], dtype=dtype)
    variables = edm.convert_state_dict(config["class_name"], config["kwargs"], state_dict)
    return module, variables, jax.jit(module.apply)


def _run(name: str, variables=None, dtype=jnp.float32) -> np.ndarray:
    """The fixture's forward pass, with float32 convolutions and matmuls at full precision
    (GPUs default to TF32, about 1e-3 relative)."""
    _, _, inputs, _ = _fixture(name)
    _, converted, apply = _converted(name, dtype)
    with jax.default_matmul_precision("highest"):
        return np.asarray(apply(converted if variables is None else variables, *inputs))


@pytest.mark.parametrize("name", EDM_FIXTURES)
def test_matches_original_network(name):
    _, _, _, expected = _fixture(name)
    out = _run(name)
    assert out.dtype == np.float32 and out.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(out - expected).max() <= 1e-5 * scale


@pytest.mark.parametrize("name", EDM_FIXTURES)
def test_skip_collection_follows_decoder_concatenations(name):
    _, state_dict, _, _ = _fixture(name)
    module, variables, _ = _converted(name)
    names = list(variables["skip"])
    assert names == EXPECTED_SKIPS == sorted(names) == list(module.skip_names)
    assert all(v.dtype == np.float32 and v.shape == () and v == 1.0
               for v in variables["skip"].values())

    # One scale per long skip: every non-aux encoder output is consumed by one decoder block.
    encoder_outputs = {m for m in _modules(state_dict, "enc") if "_aux_" not in m}
    consumers = {m for m in _modules(state_dict, "dec") if "_block" in m}
    assert len(names) == len(encoder_outputs) == len(consumers)
    assert {n[3:] for n in names} == consumers


def _modules(state_dict, part):
    """Names of the entries of the original ``enc`` or ``dec`` ModuleDict."""
    return {key.split(".")[2] for key in state_dict if key.startswith(f"model.{part}.")}


def test_skip_scale_acts_only_on_the_concatenated_copy():
    """The deepest skip also feeds the middle blocks: scaling it must leave them untouched."""
    name = "edm_ddpmpp_vp_tiny"
    module, variables, _ = _converted(name)
    _, _, inputs, _ = _fixture(name)
    watched = ("4x4_in1", "4x4_block0")

    @jax.jit
    def intermediates(skip):
        out, state = module.apply({**variables, "skip": skip}, *inputs,
                                  capture_intermediates=lambda m, _: m.name in watched,
                                  mutable=["intermediates"])
        dec = state["intermediates"]["model"]["dec"]
        return out, [dec[n]["__call__"][0] for n in watched]

    out, (middle, consumer) = intermediates(variables["skip"])
    out_scaled, (middle_scaled, consumer_scaled) = intermediates(
        {**variables["skip"], "00_4x4_block0": np.float32(0.5)})
    np.testing.assert_array_equal(middle, middle_scaled)
    assert np.abs(consumer - consumer_scaled).max() > 1e-3 * np.abs(consumer).max()
    assert np.abs(out - out_scaled).max() > 0


@pytest.mark.parametrize("name", EDM_FIXTURES)
def test_each_skip_scale_scales_its_concatenated_copy(name):
    """Skip j scaled by 2^-(j+1): the block that consumes it gets exactly those multiples of the
    unscaled run's skip channels (recorded at its input), and the deepest consumer the same main path."""
    module, variables, _ = _converted(name)
    _, _, inputs, _ = _fixture(name)
    consumers = {("dec", n[3:]) for n in EXPECTED_SKIPS}
    inputs_of = skip_consumer_inputs(lambda v: module.apply(v, *inputs), variables,
                                     lambda m: tuple(m.path[-2:]) in consumers)
    assert_skips_scaled(inputs_of, {n: 2.0 ** -(j + 1) for j, n in enumerate(EXPECTED_SKIPS)})


@pytest.mark.parametrize("name", ["edm_ncsnpp_ve_tiny", "edm_adm_edm_tiny"])
def test_bfloat16_is_close_to_float32(name):
    """bf16 compute: close to the float32 original, yet not equal to it, and most activations
    (convolutions, attention) are bfloat16 while the output is float32."""
    config, state_dict, inputs, expected = _fixture(name)
    out = _run(name, dtype=jnp.bfloat16)
    assert out.dtype == np.float32
    error = np.abs(out - expected).max() / np.abs(expected).max()
    assert 1e-4 < error <= 5e-2, error
    module, variables, _ = _converted(name, jnp.bfloat16)
    dtypes = activation_dtypes(module, variables, *inputs)
    assert dtypes.get("bfloat16", 0) > dtypes.get("float32", 0), dtypes


def test_sigma_scalar_and_default_labels():
    """A scalar sigma broadcasts over the batch; omitted class labels are zeros."""
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8,
                  channel_mult=[1], num_blocks=0, attn_resolutions=[])
    module = edm.build("EDMPrecond", dict(kwargs, model_type="SongUNet"))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    sigma, labels = np.full(2, 0.7, np.float32), np.zeros((2, 4), np.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), x, sigma, labels)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
    reference = module.apply(variables, x, sigma, labels)
    np.testing.assert_array_equal(module.apply(variables, x, 0.7, labels), reference)
    np.testing.assert_array_equal(module.apply(variables, x, sigma), reference)


def _broken(state_dict, drop=(), add=None, replace=None):
    broken = {k: v for k, v in state_dict.items() if k not in drop}
    broken.update(add or {})
    broken.update(replace or {})
    return broken


@pytest.mark.parametrize("change, message", [
    (dict(drop=["model.map_layer0.bias"]), r"missing keys \(1: model\.map_layer0\.bias\)"),
    (dict(add={"model.enc.16x16_extra.weight": np.zeros(3)}),
     r"unexpected keys \(1: model\.enc\.16x16_extra\.weight\)"),
    (dict(replace={"model.enc.16x16_conv.weight": np.zeros((16, 3, 3, 4), np.float32)}),
     r"shape mismatches \(1: model\.enc\.16x16_conv\.weight \(16, 3, 3, 4\) != \(16, 3, 3, 3\)\)"),
    (dict(replace={"model.enc.8x8_down.conv0.resample_filter": np.ones((1, 1, 2, 2), np.float32)}),
     r"buffers differing from their constants \(1: model\.enc\.8x8_down\.conv0\.resample_filter\)"),
])
def test_conversion_is_strict(change, message):
    config, state_dict, _, _ = _fixture("edm_ddpmpp_vp_tiny")
    with pytest.raises(ValueError, match=message):
        edm.convert_state_dict(config["class_name"], config["kwargs"], _broken(state_dict, **change))


def test_conversion_error_lists_the_first_few_offenders():
    config, state_dict, _, _ = _fixture("edm_ddpmpp_vp_tiny")
    dropped = sorted(k for k in state_dict if k.startswith("model.dec."))
    with pytest.raises(ValueError, match=rf"missing keys \({len(dropped)}: {dropped[0]}.*, \.\.\.\)"):
        edm.convert_state_dict(config["class_name"], config["kwargs"],
                               _broken(state_dict, drop=dropped))


def test_unsupported_names_are_rejected():
    kwargs = dict(img_resolution=16, img_channels=3)
    with pytest.raises(ValueError, match="'UNetPrecond'.*VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond"):
        edm.build("UNetPrecond", kwargs)
    with pytest.raises(ValueError, match="'UNet2DModel'.*SongUNet, DhariwalUNet"):
        edm.build("EDMPrecond", dict(kwargs, model_type="UNet2DModel"))
    with pytest.raises(ValueError, match=r"\['encoder_type'\]"):
        edm.build("EDMPrecond", dict(kwargs, encoder_type="residual"))  # a SongUNet-only kwarg
    with pytest.raises(ValueError, match="encoder_type='pyramid'"):
        edm.build("VPPrecond", dict(kwargs, encoder_type="pyramid")).skip_names


def _abstract(class_name, kwargs, labels=None, augment_labels=None):
    """Shapes of the variables and of the output, without running the network."""
    module = edm.build(class_name, kwargs)
    x, sigma = jnp.zeros((2, 16, 16, 3)), jnp.ones(2)
    variables = jax.eval_shape(module.init, jax.random.key(0), x, sigma, labels)
    out = jax.eval_shape(module.apply, variables, x, sigma, labels, augment_labels)
    assert (out.shape, out.dtype) == (x.shape, jnp.float32)
    return module, variables


def test_skip_encoder_and_decoder_layout():
    """No torch or fixtures needed: SongUNet with the 'skip' encoder and decoder."""
    kwargs = dict(img_resolution=16, img_channels=3, augment_dim=9, model_channels=16,
                  channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], use_fp16=True,
                  encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1])
    module, variables = _abstract("VPPrecond", kwargs, augment_labels=jnp.zeros((2, 9)))
    assert module.use_fp16 and hash(module) == hash(edm.build("VPPrecond", kwargs))
    assert list(variables["skip"]) == list(module.skip_names) == [
        "00_4x4_block0", "01_4x4_block1", "02_8x8_block0", "03_8x8_block1",
        "04_16x16_block0", "05_16x16_block1"]
    enc, dec = variables["params"]["model"]["enc"], variables["params"]["model"]["dec"]
    assert enc["8x8_aux_skip"]["kernel"].shape == (1, 1, 3, 16)
    assert "8x8_aux_down" not in enc  # resampling only, no parameters
    assert {"4x4_aux_conv", "8x8_aux_conv", "16x16_aux_conv"} <= set(dec)
    assert variables["params"]["model"]["map_augment"]["kernel"].shape == (9, 16)


def test_bare_unet_owns_flat_skip_variables():
    unet = edm_unets.DhariwalUNet(img_resolution=16, in_channels=3, out_channels=3, model_channels=16,
                            channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    x = jnp.zeros((1, 16, 16, 3))
    variables = jax.eval_shape(unet.init, jax.random.key(0), x, jnp.zeros(1))
    assert list(variables["skip"]) == list(unet.skip_names) == [
        "00_8x8_block0", "01_8x8_block1", "02_16x16_block0", "03_16x16_block1"]
    assert set(variables["params"]) == {"map_layer0", "map_layer1", "enc", "dec", "out_norm",
                                        "out_conv"}


def test_dhariwal_layout_with_attention():
    kwargs = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=64,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    module, variables = _abstract("iDDPMPrecond", kwargs, labels=jnp.zeros((2, 10)))
    assert list(variables["skip"]) == ["00_8x8_block0", "01_8x8_block1",
                                       "02_16x16_block0", "03_16x16_block1"]
    params = variables["params"]["model"]
    assert params["dec"]["8x8_block1"]["qkv"]["kernel"].shape == (1, 1, 128, 3 * 128)
    assert "qkv" not in params["dec"]["16x16_block1"]
    assert params["out_conv"]["kernel"].shape == (3, 3, 64, 6)  # eps and variance channels


def test_iddpm_noise_levels():
    module = edm.build("iDDPMPrecond", dict(img_resolution=8, img_channels=3))
    u = module.u
    assert u.shape == (1001,) and u[-1] == 0 and np.all(np.diff(u) < 0)
    assert module.sigma_min == pytest.approx(0.006422, rel=1e-4)
    assert module.sigma_max == pytest.approx(20291.17, rel=1e-4)
    np.testing.assert_array_equal(module.round_sigma(jnp.asarray([u[500] * 1.001, 1e6])),
                                  [u[500], u[0]])

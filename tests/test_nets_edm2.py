"""Tests for the Flax port of the NVlabs/edm2 network (``jdiffsample.nets.edm2``).

The golden fixture ``edm2_tiny`` holds a small ``Precond`` built with the original code, random
weights, and the original's ``net(x, sigma, class_labels)`` and ``return_logvar=True`` outputs.
Its blocks have fewer channels than one attention head, so attention, a [1, 3, 3, 1] resampling
filter, clipping and the other balances are checked on a second configuration against reference
numbers of the original (see ``ATTN_REF``). Pickles are synthetic, with the released structure.
"""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import _torch_pickles as tp
from _helpers import assert_skips_scaled, skip_consumer_inputs
from conftest import fixture_dir
from jdiffsample.nets import edm2
from jdiffsample.nets.formats import statedict, torchfile


@pytest.fixture(scope="module")
def tiny():
    """(kwargs, state_dict, NHWC io dict, module, variables, jitted apply) of ``edm2_tiny``."""
    folder = fixture_dir("edm2_tiny")
    config = json.loads((folder / "config.json").read_text())
    assert config["class_name"] == "Precond"
    kwargs = config["kwargs"]
    state_dict = torchfile.load_state_dict(folder / "state_dict.pt")
    io = {k: v.transpose(0, 2, 3, 1) if k in ("x", "output") else v
          for k, v in np.load(folder / "io.npz").items()}
    module = edm2.build("Precond", kwargs)
    variables = edm2.convert_state_dict("Precond", kwargs, state_dict)
    apply = jax.jit(module.apply, static_argnames="return_logvar")
    return kwargs, state_dict, io, module, variables, apply


def _rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def _forward(tiny, variables=None):
    """``(D, logvar)`` of the fixture's inputs (one compiled program shared by the tests)."""
    _, _, io, _, converted, apply = tiny
    with jax.default_matmul_precision("highest"):
        return apply(converted if variables is None else variables, io["x"], io["sigma"],
                     io["class_labels"], return_logvar=True)


def test_matches_original_output_and_logvar(tiny):
    _, _, io, module, variables, _ = tiny
    out, logvar = _forward(tiny)
    assert out.dtype == logvar.dtype == jnp.float32
    assert out.shape == io["output"].shape == (3, 8, 8, 3) and logvar.shape == (3, 1, 1, 1)
    assert _rel_err(out, io["output"]) <= 1e-5
    assert _rel_err(logvar, io["logvar"]) <= 1e-5
    # Without return_logvar: D alone, from an identical network (checked without compiling).
    plain = jax.eval_shape(module.apply, variables, io["x"], io["sigma"], io["class_labels"])
    assert (plain.shape, plain.dtype) == (out.shape, out.dtype)


def test_sigma_scalar_and_default_labels(tiny):
    _, _, io, _, variables, apply = tiny
    x = io["x"]
    with jax.default_matmul_precision("highest"):
        reference = apply(variables, x, np.full(3, 0.7, np.float32), np.zeros((3, 10), np.float32),
                          return_logvar=True)
        scalar = apply(variables, x, np.float32(0.7), return_logvar=True)
    np.testing.assert_array_equal(scalar[0], reference[0])
    np.testing.assert_array_equal(scalar[1], reference[1])


# ---------------------------------------------------------------------------------------------
# Attention, [1, 3, 3, 1] filter, clipping, custom balances and embedding widths.

ATTN_KWARGS = dict(img_resolution=8, img_channels=2, label_dim=5, use_fp16=False, sigma_data=0.6,
                   logvar_channels=16, model_channels=16, channel_mult=[1, 2],
                   channel_mult_noise=2, channel_mult_emb=3, num_blocks=2, attn_resolutions=[8],
                   label_balance=0.7, concat_balance=0.4, resample_filter=[1, 3, 3, 1],
                   channels_per_head=8, res_balance=0.35, attn_balance=0.45, clip_act=3)
# The original Precond(**ATTN_KWARGS) (NVlabs/edm2 @4bf8162, float32 CPU) with the weights and
# inputs of _attn_case(), computed once outside this repository: `digest` is P @ D.ravel() with P
# the 16 x D.size matrix drawn after the inputs, divided by sqrt(D.size); `logvar` is
# the return_logvar output. The full outputs agreed with this port to 7e-7 relative.
ATTN_REF = dict(
    digest=[-1.386822691, 0.073373319, -1.869615327, 1.359570976, -0.957426662, -0.237887272,
            1.71486032, -0.40027596, -0.52435399, -0.339105162, -0.421824535, -1.308732578,
            -0.578928832, -0.186560644, -0.087158707, -0.027903107],
    logvar=[-0.8178768754005432, -0.039135873317718506, 1.5693604946136475],
)


def _attn_case():
    """The state dict (standard normal, keys in sorted order) and inputs of ATTN_REF."""
    module = edm2.build("Precond", ATTN_KWARGS)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *edm2.example_inputs(module))
    shapes = {statedict.torch_key(path): statedict.torch_shape(path, leaf.shape)
              for path, leaf in traverse_util.flatten_dict(abstract["params"]).items()}
    rng = np.random.default_rng(2024)
    state_dict = {k: rng.standard_normal(shapes[k], dtype=np.float32) for k in sorted(shapes)}
    x = rng.standard_normal((3, 8, 8, 2), dtype=np.float32)
    labels = np.zeros((3, 5), np.float32)
    labels[0, 2] = labels[2, 4] = 1  # the second sample is unconditional
    projection = rng.standard_normal((16, x.size)) / np.sqrt(x.size)
    return module, state_dict, (x, np.array([0.05, 1.3, 30.0], np.float32), labels), projection


def test_attention_configuration_matches_original():
    module, state_dict, inputs, projection = _attn_case()
    assert len(state_dict) == 85  # the original's state_dict() size, 12 of them attention weights
    variables = edm2.convert_state_dict("Precond", ATTN_KWARGS, state_dict)
    qkv = variables["params"]["unet"]["dec"]["4x4_in0"]["attn_qkv"]["kernel"]
    assert qkv.shape == (1, 1, 32, 96)
    with jax.default_matmul_precision("highest"):
        out, logvar = jax.jit(partial(module.apply, return_logvar=True))(variables, *inputs)
    digest = projection @ np.asarray(out, np.float64).ravel()
    assert _rel_err(digest, np.array(ATTN_REF["digest"])) <= 1e-5
    assert _rel_err(logvar.ravel(), np.array(ATTN_REF["logvar"])) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Released configurations.

# Parameter counts of the original Precond(**PRESETS[name]) (its parameters(), without the Fourier
# buffers), counted once by instantiating NVlabs/edm2 @4bf8162 training/networks_edm2.py; the
# paper lists 280M parameters for S and 1523M for XXL.
PARAMETER_COUNTS = {
    "edm2-img512-xxl": 1_523_164_773,
    "edm2-img512-xs-uncond": 124_201_253,
    "edm2-img64-s": 280_209_381,
}


@pytest.mark.parametrize("name", PARAMETER_COUNTS)
def test_released_configurations(name):
    module = edm2.build("Precond", json.loads(json.dumps(edm2.PRESETS[name])))
    abstract = jax.eval_shape(module.init, jax.random.key(0), *edm2.example_inputs(module))
    flat = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
    count = sum(leaf.size for path, leaf in flat if path[-1].key not in ("freqs", "phases"))
    assert count == PARAMETER_COUNTS[name]
    assert list(abstract["skip"]) == list(module.skip_names) == [
        f"{j:02d}_{res}x{res}_block{i}" for j, (res, i) in enumerate(
            (res, i) for res in (8, 16, 32, 64) for i in range(4))]
    assert module.img_resolution == 64 and module.img_channels == (4 if "img512" in name else 3)


# ---------------------------------------------------------------------------------------------
# Skip-Tuning.


class _NoScale:
    """Multiplies as the identity: the decoder then concatenates the unscaled skips."""

    def __mul__(self, other):
        return other


def test_skip_scales_of_one_are_bit_identical_to_no_scaling(tiny):
    _, _, io, module, variables, _ = tiny
    assert list(variables["skip"]) == list(module.skip_names) == [
        "00_4x4_block0", "01_4x4_block1", "02_8x8_block0", "03_8x8_block1"]
    assert all(v.dtype == np.float32 and v == 1.0 for v in variables["skip"].values())
    no_scale = {name: _NoScale() for name in module.skip_names}  # constants of the program
    with jax.default_matmul_precision("highest"):
        plain = jax.jit(lambda params, *inputs: module.apply(
            {"params": params, "skip": no_scale}, *inputs, return_logvar=True))(
                variables["params"], io["x"], io["sigma"], io["class_labels"])
    scaled = _forward(tiny)
    np.testing.assert_array_equal(scaled[0], plain[0])
    np.testing.assert_array_equal(scaled[1], plain[1])


def test_each_skip_scale_scales_its_concatenated_copy(tiny):
    """Skip j scaled by 2^-(j+1): the block that consumes it gets exactly those multiples of the
    unscaled run's skip channels after ``mp_cat`` (recorded at its input; the powers of 2 commute with
    mp_cat's weights), and the deepest consumer the same main path."""
    _, _, io, module, variables, _ = tiny
    names = list(module.skip_names)
    consumers = {("dec", n[3:]) for n in names}
    inputs_of = skip_consumer_inputs(
        lambda v: module.apply(v, io["x"], io["sigma"], io["class_labels"], return_logvar=True), variables,
        lambda m: tuple(m.path[-2:]) in consumers)
    assert_skips_scaled(inputs_of, {n: 2.0 ** -(j + 1) for j, n in enumerate(names)})


# ---------------------------------------------------------------------------------------------
# bfloat16.


def test_bfloat16_compute(tiny):
    kwargs, _, io, _, variables, _ = tiny
    module = edm2.build("Precond", kwargs, dtype=jnp.bfloat16)
    out, state = jax.jit(lambda v: module.apply(
        v, io["x"], io["sigma"], io["class_labels"], capture_intermediates=True,
        mutable=["intermediates"]))(variables)
    assert out.dtype == jnp.float32
    assert 0 < _rel_err(out, io["output"]) <= 5e-3  # 6e-4 measured

    unet = state["intermediates"]["unet"]
    for block in (unet["enc"]["8x8_conv"], unet["enc"]["4x4_down"], unet["dec"]["8x8_block1"],
                  unet["out_conv"], unet["dec"]["4x4_in0"]["conv_res0"]):
        assert block["__call__"][0].dtype == jnp.bfloat16
    assert unet["emb_noise"]["__call__"][0].dtype == jnp.float32
    assert unet["dec"]["4x4_in0"]["emb_linear"]["__call__"][0].dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Construction and conversion errors.


@pytest.mark.parametrize("change, message", [
    (dict(drop="unet.emb_label.weight"), r"missing keys \(1: unet\.emb_label\.weight\)"),
    (dict(add="unet.enc.8x8_block0.attn_qkv.weight"),
     r"unexpected keys \(1: unet\.enc\.8x8_block0\.attn_qkv\.weight\)"),
    (dict(replace=("unet.enc.8x8_conv.weight", (16, 3, 3, 3))),
     r"shape mismatches \(1: unet\.enc\.8x8_conv\.weight \(16, 3, 3, 3\) != \(16, 4, 3, 3\)\)"),
])
def test_conversion_is_strict(tiny, change, message):
    kwargs, state_dict, _, _, _, _ = tiny
    broken = {k: v for k, v in state_dict.items() if k != change.get("drop")}
    if "add" in change:
        broken[change["add"]] = np.zeros((48, 16, 1, 1), np.float32)
    if "replace" in change:
        key, shape = change["replace"]
        broken[key] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=message) as err:
        edm2.convert_state_dict("Precond", kwargs, broken)
    assert "\n" not in str(err.value)


def test_float16_weights_stay_float16_and_compute_as_float32(tiny):
    """A float16 release converts without a float32 copy (half the memory); every weight is
    normalised in float32 before use, so the outputs equal those of the upcast weights exactly."""
    kwargs, state_dict, _, _, _, _ = tiny
    half = {k: v.astype(np.float16) for k, v in state_dict.items()}
    variables = edm2.convert_state_dict("Precond", kwargs, half)
    kernel = variables["params"]["unet"]["enc"]["8x8_conv"]["kernel"]
    assert kernel.dtype == np.float16
    np.testing.assert_array_equal(kernel, half["unet.enc.8x8_conv.weight"].transpose(2, 3, 1, 0))
    upcast = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
    for ours, wider in zip(_forward(tiny, variables), _forward(tiny, upcast), strict=True):
        assert ours.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(wider))


@pytest.mark.parametrize("class_name, kwargs, message", [
    ("EDMPrecond", {}, "unsupported EDM2 network class 'EDMPrecond'; supported: Precond"),
    ("Precond", dict(img_resolution=8, img_channels=3), r"missing required kwargs \['label_dim'\]"),
    ("Precond", dict(img_resolution=8, img_channels=3, label_dim=0, model_type="UNet"),
     r"unsupported kwargs \['model_type'\]"),
    ("Precond", dict(img_resolution=12, img_channels=3, label_dim=0),
     "img_resolution=12 must be divisible by 2\\*\\*3"),
    ("Precond", dict(img_resolution=8, img_channels=3, label_dim=0, resample_filter=[1, 2, 1]),
     "even length"),
])
def test_bad_constructor_arguments(class_name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        edm2.build(class_name, kwargs)


# ---------------------------------------------------------------------------------------------
# Pickles.


def _half(a, key, is_param):
    """A float16 tensor as a plain pickle writes it (released EMA networks are float16)."""
    t = tp.tensor(tp.nested_storage(np.asarray(a, np.float16), key), 0, np.shape(a))
    return tp.parameter(t) if is_param else t


def _encoder(class_name="StabilityVAEEncoder", init_kwargs=None, **state):
    """A persistent encoder with the attributes its constructor sets (defaults unless given)."""
    if class_name == "StabilityVAEEncoder":
        scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        bias = np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale
        state = dict(dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale, bias=bias,
                          batch_size=8, _vae=None), **state)
    state.update(_init_args=(), _init_kwargs=dict(init_kwargs or {}))
    return tp.persistent(class_name, state, module_src="raise SystemExit('executed')\n")


def _write(tmp_path, net, encoder):
    path = tmp_path / "net.pkl"
    path.write_bytes(tp.edm2_snapshot(net, encoder))
    return path


def test_pickle_reader(tmp_path, tiny):
    kwargs, state_dict, _, _, _, _ = tiny
    sentinel = tmp_path / "pwned"
    src = f"open({str(sentinel)!r}, 'w').write('module_src was executed')\n"
    net = tp.edm_network("Precond", dict(kwargs, dropout=np.float64(0.0)), state_dict,
                         module_src=src, tensor_fn=_half)
    name, got_kwargs, got, encoder = edm2.load_pickle(_write(tmp_path, net, _encoder()))
    assert name == "Precond" and got_kwargs == dict(kwargs, dropout=0.0)
    assert set(got) == set(state_dict)
    for key, value in state_dict.items():
        assert got[key].dtype == np.float16
        np.testing.assert_array_equal(got[key], value.astype(np.float16))
    assert encoder["class_name"] == "StabilityVAEEncoder"
    assert encoder["vae_name"] == "stabilityai/sd-vae-ft-mse" and encoder["final_std"] == 0.5
    assert encoder["raw_mean"] == [5.81, 3.25, 0.12, -2.15]
    assert encoder["raw_std"] == [4.17, 4.62, 3.71, 3.28] and encoder["final_mean"] == 0.0
    np.testing.assert_allclose(encoder["scale"], 0.5 / np.array(encoder["raw_std"]), rtol=1e-6)
    assert json.loads(json.dumps(encoder)) == encoder
    edm2.convert_state_dict(name, got_kwargs, got)
    assert not sentinel.exists()


def test_pickle_positional_arguments_and_rgb_encoder(tmp_path):
    state_dict = {"unet.out_gain": np.zeros((), np.float32)}
    net = tp.edm_network("Precond", dict(model_channels=8, channel_mult=[1]), state_dict,
                         init_args=(8, 3, 0), tensor_fn=_half)
    _, kwargs, got, encoder = edm2.load_pickle(
        _write(tmp_path, net, _encoder("StandardRGBEncoder")))
    assert kwargs == dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8,
                          channel_mult=[1])
    assert list(got) == ["unet.out_gain"] and encoder == {"class_name": "StandardRGBEncoder"}


def test_pickle_encoder_with_its_own_arguments(tmp_path):
    raw_mean, raw_std = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 4.0, 4.0]
    scale = np.float32(1.0) / np.float32(raw_std)
    bias = np.float32(0.25) - np.float32(raw_mean) * scale
    encoder = _encoder(init_kwargs=dict(raw_mean=raw_mean, raw_std=raw_std, final_mean=0.25,
                                        final_std=1.0), scale=scale, bias=bias)
    net = tp.edm_network("Precond", dict(img_resolution=8, img_channels=4, label_dim=0), {})
    info = edm2.load_pickle(_write(tmp_path, net, encoder))[3]
    assert (info["raw_mean"], info["raw_std"], info["final_mean"], info["final_std"]) == (
        raw_mean, raw_std, 0.25, 1.0)
    np.testing.assert_array_equal(info["bias"], bias)


@pytest.mark.parametrize("case, error, message", [
    ("hostile", torchfile.UnsafeCheckpointError, "references the global os.system, which is not"),
    ("no_ema", torchfile.CheckpointFormatError, r"no 'ema' entry \(top level: \['encoder'"),
    ("edm1", torchfile.CheckpointFormatError, "'ema' is 'EDMPrecond', not an EDM2 Precond"),
    ("bad_kwargs", torchfile.CheckpointFormatError, r"unsupported kwargs \['model_type'\]"),
    ("encoder", torchfile.CheckpointFormatError,
     "unsupported encoder 'Evil'; supported: StandardRGBEncoder, StabilityVAEEncoder"),
    ("scale", torchfile.CheckpointFormatError,
     r"StabilityVAEEncoder state \(vae_name, scale, bias\) does not match"),
])
def test_pickle_reader_refuses(tmp_path, case, error, message):
    kwargs = dict(img_resolution=8, img_channels=4, label_dim=0)
    net, encoder = tp.edm_network("Precond", kwargs, {}), _encoder()
    if case == "hostile":
        encoder = _encoder(hook=tp.Reduce(tp.Global("os", "system"), (f"touch {tmp_path}/pwned",)))
    elif case == "edm1":
        net = tp.edm_network("EDMPrecond", kwargs, {})
    elif case == "bad_kwargs":
        net = tp.edm_network("Precond", dict(kwargs, model_type="UNet"), {})
    elif case == "encoder":
        encoder = _encoder("Evil")
    elif case == "scale":
        encoder = _encoder(scale=np.ones(4, np.float32))
    path = _write(tmp_path, net, encoder)
    if case == "no_ema":
        path.write_bytes(tp.dumps(tp.easydict(encoder=encoder), protocol=4))
    with pytest.raises(error, match=message) as err:
        edm2.load_pickle(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()

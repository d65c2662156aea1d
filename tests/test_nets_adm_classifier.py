"""Tests for the Flax port of guided-diffusion's classifier EncoderUNetModel (jdiffsample.nets.adm_classifier)."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_convert_fails, converted_fixture, expected_keys, leftovers
from _helpers import random_state_dict as _random_state_dict

from jdiffsample import cli, nets
from jdiffsample.nets import adm
from jdiffsample.nets import adm_classifier as ac

NAME = "EncoderUNetModel"


def _rel(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


@functools.cache
def _jitted(module):
    """Jitted logits, and logits with the guidance gradient (one compilation for the fixture's tests)."""
    def both(variables, x, t, y):
        return module.apply(variables, x, t), ac.grad_log_prob(module, variables, x, t, y)

    return jax.jit(module.apply), jax.jit(both)


def _apply(kwargs, variables, x, t, dtype=jnp.float32):
    """Jitted logits as NumPy (float32 matmuls at full precision: GPUs default to TF32)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(_jitted(ac.build(NAME, kwargs, dtype=dtype))[0](variables, x, t))


def _logits_and_grad(kwargs, variables, x, t, y):
    """Jitted logits and grad_log_prob as NumPy."""
    with jax.default_matmul_precision("highest"):
        return tuple(map(np.asarray, _jitted(ac.build(NAME, kwargs))[1](variables, x, t, y)))


def _expected_keys(kwargs) -> dict:
    """PyTorch name -> shape of every tensor the converter expects."""
    module = ac.build(NAME, kwargs)
    return expected_keys(module, ac.example_inputs(module), ac.LAYOUT)


def random_state_dict(kwargs, seed=0) -> dict:
    """Random PyTorch-layout weights: also how the recorded numbers below were produced."""
    return _random_state_dict(_expected_keys(kwargs), seed)


def random_inputs():
    """NHWC x [2, 8, 8, 3] and integer timesteps (the recorded numbers' inputs; the original gets x NCHW)."""
    return np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32), np.array([10, 900])


# ----------------------------------------------------------------------------------------------
# The golden fixture (attention pooling).


@pytest.fixture(scope="module")
def fixture():
    folder, config, variables, io = converted_fixture("adm_classifier_tiny", ac.convert_state_dict)
    return folder, config["kwargs"], variables, io


def test_logits_and_guidance_gradient_match_fixture(fixture):
    _, kwargs, variables, io = fixture
    logits, grad = _logits_and_grad(kwargs, variables, io["x"], io["timesteps"], io["y"])
    assert logits.dtype == np.float32 and logits.shape == io["output"].shape
    assert _rel(logits, io["output"]) <= 1e-5
    assert grad.shape == io["x"].shape and grad.dtype == np.float32
    assert _rel(grad, io["grad_log_prob"]) <= 1e-5


def test_attention_pool_checks_its_size(fixture):
    _, kwargs, variables, io = fixture
    apply = functools.partial(ac.build(NAME, kwargs).apply, variables)
    with pytest.raises(ValueError, match="built for a 4x4 feature map"):
        jax.eval_shape(apply, np.zeros((1, 8, 8, 3), np.float32), io["timesteps"][:1])


# ----------------------------------------------------------------------------------------------
# The other pooling heads.

# One encoder for all four heads, with the settings the fixture leaves out (additive time
# embedding, Downsample convolutions, new qkv order); the fixture covers the others.
BASE = dict(image_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16, use_scale_shift_norm=False,
            resblock_updown=False, use_new_attention_order=True)
VARIANTS = {pool: {**BASE, "pool": pool} for pool in ac.POOLS}


def variant_state_dict(pool) -> dict:
    """The shared encoder (seed 0) with the head of ``pool`` (seed 1)."""
    torso = random_state_dict(VARIANTS["adaptive"], seed=0)
    head = random_state_dict(VARIANTS[pool], seed=1)
    return {k: head[k] if k.startswith("out.") else torso[k] for k in head}


# Logits [2, 5] of the original guided-diffusion EncoderUNetModel (openai/guided-diffusion
# 22e0df8, guided_diffusion/unet.py, float32 CPU, torch 2.13) for each VARIANTS entry, loaded with
# variant_state_dict(pool) (strict load_state_dict) and called on random_inputs() (x transposed
# to NCHW). Produced once by a script outside the project; the fetched code is not part of it.
RECORDED = {
    "adaptive": [[-0.53529894, 0.01628517, 0.03120199, 0.08031905, -0.22435331],
                 [-0.5270411, -0.04419354, 0.13748686, 0.00479919, -0.06834726]],
    "attention": [[-0.23015605, 0.82397866, 0.23083568, 0.27157083, -0.08609619],
                  [-0.06117467, 0.706762, -0.00965652, 0.32832927, -0.03275288]],
    "spatial": [[0.3215085, 0.26439965, -0.6132211, 0.04368467, 0.03145726],
                [0.0456593, 0.2726584, -0.94008905, 0.10322524, -0.44881698]],
    "spatial_v2": [[-1.3004501, -0.00881222, 0.49227104, -0.1974238, 0.48443812],
                   [-1.6538974, 0.07329166, -0.53619814, 0.03340504, 0.38392293]],
}


@pytest.mark.parametrize("pool", ac.POOLS)
def test_pool_variants_match_recorded_original(pool):
    kwargs = VARIANTS[pool]
    out = _apply(kwargs, ac.convert_state_dict(NAME, kwargs, variant_state_dict(pool)), *random_inputs())
    assert out.shape == (2, 5) and out.dtype == np.float32
    assert _rel(out, np.array(RECORDED[pool], np.float32)) <= 1e-5


def test_pool_variants_differ():
    """The same encoder under each head: four different sets of logits."""
    outputs = [_apply(VARIANTS[pool], ac.convert_state_dict(NAME, VARIANTS[pool], variant_state_dict(pool)),
                      *random_inputs()) for pool in ac.POOLS]
    for i, a in enumerate(outputs):
        assert np.all(np.isfinite(a))
        for b in outputs[:i]:
            assert np.abs(a - b).max() > 1e-2


def test_bfloat16_close_to_float32():
    kwargs = VARIANTS["attention"]
    variables = ac.convert_state_dict(NAME, kwargs, variant_state_dict("attention"))
    ref = _apply(kwargs, variables, *random_inputs())
    out = _apply(kwargs, variables, *random_inputs(), dtype=jnp.bfloat16)
    assert out.dtype == np.float32
    assert 0 < _rel(out, ref) <= 5e-2


def test_adaptive_pool_by_hand():
    """logits = W mean_hw(silu(GroupNorm32(h))) + b on the middle block's output h."""
    kwargs, sd = VARIANTS["adaptive"], variant_state_dict("adaptive")
    apply = functools.partial(ac.build(NAME, kwargs).apply, mutable=["intermediates"],
                              capture_intermediates=lambda mdl, _: mdl.name == "middle_block_2")
    with jax.default_matmul_precision("highest"):
        logits, state = jax.jit(apply)(ac.convert_state_dict(NAME, kwargs, sd), *random_inputs())
    h = np.asarray(state["intermediates"]["middle_block_2"]["__call__"][0], np.float64)  # [B, 4, 4, 64]
    groups = h.reshape(*h.shape[:3], 32, h.shape[3] // 32)
    mean, var = groups.mean(axis=(1, 2, 4), keepdims=True), groups.var(axis=(1, 2, 4), keepdims=True)
    normed = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(h.shape) * sd["out.0.weight"] + sd["out.0.bias"]
    pooled = (normed / (1 + np.exp(-normed))).mean(axis=(1, 2))
    expected = pooled @ sd["out.3.weight"][:, :, 0, 0].T + sd["out.3.bias"]
    assert _rel(logits, expected) <= 1e-5


def test_spatial_heads_read_every_block_mean():
    """The spatial MLPs take the spatial means of the 4 input blocks' and the middle block's outputs:
    32 + 32 + 32 + 64 + 64 features (conv, res block, downsample, res block, middle)."""
    for pool in ("spatial", "spatial_v2"):
        shapes = _expected_keys(VARIANTS[pool])
        assert shapes["out.0.weight"] == (2048, 224)
        assert shapes[f"out.{2 if pool == 'spatial' else 3}.weight"] == (5, 2048)
    assert _expected_keys(VARIANTS["spatial_v2"])["out.1.weight"] == (2048,)  # its group norm
    assert "input_blocks.2.0.op.weight" in _expected_keys(BASE)  # a Downsample conv


def test_grad_log_prob_rows_are_per_sample(fixture):
    """Row i of the gradient depends only on sample i and its label."""
    _, kwargs, variables, io = fixture
    x, y = io["x"].copy(), io["y"].copy()
    base = _logits_and_grad(kwargs, variables, x, io["timesteps"], y)[1]
    x[0] += 1.0
    y[0] = (y[0] + 1) % 10
    changed = _logits_and_grad(kwargs, variables, x, io["timesteps"], y)[1]
    np.testing.assert_array_equal(changed[1:], base[1:])
    assert np.abs(changed[0] - base[0]).max() > 1e-3 * np.abs(base[0]).max()


# ----------------------------------------------------------------------------------------------
# Constructor, presets, converter.


def test_bad_kwargs_are_one_line_value_errors():
    cases = [
        ({**BASE, "pool": "max"}, r"unknown pool 'max'; expected one of adaptive, attention, spatial, spatial_v2"),
        ({**BASE, "pool": "attention", "num_head_channels": -1}, r"attention pooling needs num_head_channels"),
        ({**BASE, "dims": 3}, r"only dims=2"),
        ({**BASE, "num_classes": 10}, r"bad EncoderUNetModel kwargs: .*num_classes"),
        ({k: v for k, v in BASE.items() if k != "image_size"}, r"bad EncoderUNetModel kwargs: .*image_size"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            ac.build(NAME, kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="only EncoderUNetModel"):
        ac.build("UNetModel", BASE)


def test_presets_are_the_released_classifiers():
    # create_classifier with classifier_defaults (depth 4 for 64x64, per the README's flags).
    for name, preset in ac.PRESETS.items():
        size = int(name.split("x")[0])
        assert preset["image_size"] == size and preset["model_channels"] == 128 and preset["out_channels"] == 1000
        assert preset["num_res_blocks"] == (4 if size == 64 else 2)
        assert preset["attention_resolutions"] == (size // 32, size // 16, size // 8)
        assert preset["pool"] == "attention" and preset["num_head_channels"] == 64
        assert preset["use_scale_shift_norm"] and preset["resblock_updown"]
        assert not preset["use_new_attention_order"]
    # Parameter counts of the original create_classifier (guided-diffusion 22e0df8, counted with torch
    # on the meta device); the README and paper give none.
    # (64x64: 65,438,568; 128x128: 42,568,040; 512x512: 54,448,360.)
    shapes = _expected_keys(ac.PRESETS["256x256"])
    assert sum(math.prod(s) for s in shapes.values()) == 54_096_360
    assert shapes["out.2.positional_embedding"] == (512, 65)  # an 8x8 final map of 512 channels


def test_converter_is_strict():
    kwargs = VARIANTS["attention"]
    sd = random_state_dict(kwargs)
    missing = {k: v for k, v in sd.items() if k != "out.2.positional_embedding"}
    with pytest.raises(ValueError, match=r"missing keys \(1: out\.2\.positional_embedding\)"):
        ac.convert_state_dict(NAME, kwargs, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \(1: out\.3\.weight\)"):
        ac.convert_state_dict(NAME, kwargs, {**sd, "out.3.weight": np.zeros((5, 64, 1, 1))})
    with pytest.raises(ValueError, match=r"shape mismatches \(1: out\.2\.qkv_proj\.weight \(192, 64\) != "
                                         r"\(192, 64, 1\)\)"):
        ac.convert_state_dict(NAME, kwargs, {**sd, "out.2.qkv_proj.weight": np.zeros((192, 64), np.float32)})
    params = ac.convert_state_dict(NAME, kwargs, sd)["params"]
    np.testing.assert_array_equal(params["out_2"]["positional_embedding"], sd["out.2.positional_embedding"].T)
    np.testing.assert_array_equal(params["out_2"]["c_proj"]["kernel"], sd["out.2.c_proj.weight"][:, :, 0].T)


# ----------------------------------------------------------------------------------------------
# The family and `jdiffsample convert adm-classifier`.


def test_cli_converts_the_fixture(fixture, tmp_path, capsys):
    folder, kwargs, _, io = fixture
    dst = tmp_path / "out"
    assert cli.main(["convert", "adm-classifier", str(folder / "state_dict.pt"), str(dst),
                     "--config", str(folder / "config.json")]) == 0
    assert "EncoderUNetModel:" in capsys.readouterr().out
    module, variables = nets.load(dst)
    variables = jax.tree.map(np.asarray, variables)  # as the converter gives them: reuses the compiled forward
    assert module == ac.build(NAME, kwargs)
    logits = _logits_and_grad(kwargs, variables, io["x"], io["timesteps"], io["y"])[0]
    assert _rel(logits, io["output"]) <= 1e-5
    config = nets.read_config(dst)
    assert config["family"] == "adm-classifier" and config["class_name"] == NAME and "schedule" not in config
    assert not nets.get_family("adm-classifier").is_diffusion_model


def test_config_forms(tmp_path):
    """A config is the kwargs themselves or {"class_name": ..., "kwargs": {...}}; the class and the
    kwargs are checked before the weights are read."""
    for config in (BASE, {"kwargs": BASE}, {"class_name": NAME, "kwargs": BASE}):
        assert adm.released_config(None, config, presets=ac.PRESETS, class_name=NAME, what="c")[:2] == (NAME, BASE)
    missing = tmp_path / "missing.pt"
    with pytest.raises(ValueError, match="only EncoderUNetModel"):
        ac.convert(missing, tmp_path / "out", config={"class_name": "SuperResModel", "kwargs": BASE})
    with pytest.raises(ValueError, match="exactly one of preset or config"):
        ac.convert(missing, tmp_path / "out", preset="64x64", config=BASE)
    with pytest.raises(ValueError, match="no such file"):
        ac.convert(missing, tmp_path / "out", config=BASE)
    assert leftovers(tmp_path / "out") == []


def test_cli_errors_write_nothing(fixture, tmp_path, capsys):
    folder, *_ = fixture
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kwargs": {**BASE, "pool": "max"}}))
    cases = [
        (["--preset", "1024x1024"], r"unknown ADM classifier preset '1024x1024'; choose one of 64x64, 128x128"),
        (["--preset", "64x64"], r"does not fit the EncoderUNetModel kwargs.*shape mismatches"),
        (["--config", str(bad)], r"unknown pool 'max'"),
        (["--config", str(tmp_path / "none.json")], r"cannot read the config"),
        (["--config", str(folder / "config.json"), "--key", "ema"], r"no entry 'ema'"),
    ]
    for i, (options, pattern) in enumerate(cases):
        assert_convert_fails("adm-classifier", folder / "state_dict.pt", tmp_path / f"out{i}", options, pattern, capsys)

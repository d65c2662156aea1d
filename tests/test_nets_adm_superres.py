"""Tests for the Flax port of guided-diffusion's upsampler SuperResModel (jdiffsample.nets.adm_superres)."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from _helpers import assert_convert_fails, converted_fixture, expected_keys
from _helpers import random_state_dict as _random_state_dict

from jdiffsample import cli, nets, schedules
from jdiffsample.nets import adm
from jdiffsample.nets import adm_superres as sr

NAME = "SuperResModel"


def _rel(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


@functools.cache
def _jitted(module):
    return jax.jit(module.apply)


def _apply(kwargs, variables, x, t, low_res, y=None, dtype=jnp.float32):
    """Jitted output as NumPy (float32 matmuls at full precision: GPUs default to TF32)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(_jitted(sr.build(NAME, kwargs, dtype=dtype))(variables, x, t, low_res, y))


def _expected_keys(kwargs) -> dict:
    """PyTorch name -> shape of every tensor the converter expects."""
    module = sr.build(NAME, kwargs)
    return expected_keys(module, sr.example_inputs(module), adm.LAYOUT)


def random_state_dict(kwargs, seed=0) -> dict:
    """Random PyTorch-layout weights: also how the recorded numbers below were produced."""
    return _random_state_dict(_expected_keys(kwargs), seed)


@pytest.fixture(scope="module")
def fixture():
    folder, config, variables, io = converted_fixture("adm_superres_tiny", sr.convert_state_dict)
    return folder, config["kwargs"], variables, io


def test_matches_fixture(fixture):
    _, kwargs, variables, io = fixture
    out = _apply(kwargs, variables, io["x"], io["timesteps"], io["low_res"])
    assert out.dtype == np.float32 and out.shape == io["output"].shape
    assert _rel(out, io["output"]) <= 1e-5


def test_skip_scales(fixture):
    variables = fixture[2]
    assert sorted(variables["skip"]) == [adm.skip_name(j) for j in range(6)]
    assert nets.get_family("adm-superres").sampling.skip_tuning


# A class-conditional upsampler with the settings the fixture leaves out (additive time embedding,
# resampling convolutions, 2 heads) and a low-res input of another aspect ratio and a non-integer
# scale (3x5 -> 8x8).
CONDITIONAL = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                   attention_resolutions=(2,), channel_mult=(1, 2), num_classes=4, num_heads=2,
                   use_scale_shift_norm=False, resblock_updown=False)


def conditional_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    low_res = rng.standard_normal((2, 3, 5, 3)).astype(np.float32)
    return x, np.array([10, 900]), low_res, np.array([1, 3])


PIXELS = ((0, 0), (3, 6), (7, 7))

# output[:, i, j, :] at the PIXELS (i, j), [2, 3, 6], of the original guided-diffusion
# SuperResModel (openai/guided-diffusion 22e0df8, guided_diffusion/unet.py, float32 CPU, torch
# 2.13) built with CONDITIONAL, loaded with random_state_dict(CONDITIONAL) (strict
# load_state_dict) and called as model(x, timesteps, low_res=low_res, y=y) on conditional_inputs()
# (NCHW). Produced once by a script outside the project; the fetched code is not part of it.
RECORDED = [
    [[-0.025675, -0.46526667, -0.24433984, 0.37404957, 0.20729439, 0.2314812],
     [0.70123935, -0.16065097, 0.23980276, 0.37510905, 0.4251629, -0.55125505],
     [0.42162913, 0.22468577, 0.6265106, -0.34058672, 0.18099202, 0.3617803]],
    [[0.33924028, 0.22116755, -0.17697312, -0.16663374, 0.85749686, 0.24757971],
     [0.15613165, 0.03166443, -0.01115736, -0.52610195, 0.26257747, 0.04079778],
     [-0.42123228, -1.1565105, 0.17472146, 0.10794697, 0.4830765, -0.6802483]],
]


def test_conditional_model_matches_recorded_original():
    variables = sr.convert_state_dict(NAME, CONDITIONAL, random_state_dict(CONDITIONAL))
    out = _apply(CONDITIONAL, variables, *conditional_inputs())
    assert out.shape == (2, 8, 8, 6)
    got = np.stack([out[:, i, j] for i, j in PIXELS], axis=1)
    assert _rel(got, np.array(RECORDED, np.float32)) <= 1e-5


def test_bfloat16_close_to_float32():
    variables = sr.convert_state_dict(NAME, CONDITIONAL, random_state_dict(CONDITIONAL))
    ref = _apply(CONDITIONAL, variables, *conditional_inputs())
    out = _apply(CONDITIONAL, variables, *conditional_inputs(), dtype=jnp.bfloat16)
    assert out.dtype == np.float32
    assert 0 < _rel(out, ref) <= 5e-2


@pytest.mark.parametrize("src,dst", [((4, 4), (16, 16)), ((3, 5), (8, 8)), ((20, 17), (16, 8)), ((1, 1), (3, 2))])
def test_resize_bilinear_is_torch_interpolate(src, dst):
    """F.interpolate(mode="bilinear"): align_corners=False, no antialias (also when shrinking)."""
    torch = require("torch")
    x = np.random.default_rng(2).standard_normal((2, 3, *src)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), dst, mode="bilinear").numpy()
    out = sr.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), *dst)
    assert out.shape == (2, *dst, 3)
    assert np.abs(np.asarray(out) - ref.transpose(0, 2, 3, 1)).max() <= 1e-6 * np.abs(ref).max()


def test_inputs_are_checked(fixture):
    _, kwargs, variables, io = fixture
    module = sr.build(NAME, kwargs)
    shapes = functools.partial(jax.eval_shape, functools.partial(module.apply, variables))
    with pytest.raises(ValueError, match="needs the low_res image"):
        shapes(io["x"], io["timesteps"])
    with pytest.raises(ValueError, match="same batch and 3 channels"):
        shapes(io["x"], io["timesteps"], io["low_res"][:2])
    with pytest.raises(ValueError, match="same batch and 3 channels"):
        shapes(io["x"], io["timesteps"], io["low_res"][..., :1])
    with pytest.raises(ValueError, match="if and only if the model is class-conditional"):
        shapes(io["x"], io["timesteps"], io["low_res"], np.zeros(3, np.int32))


def test_denoiser_is_the_epsilon_half_at_model_time(fixture):
    """At t = 1 the network sees timestep 999 (fixture row 2): x0 = (x - sigma eps) / alpha with
    the original's epsilon."""
    _, kwargs, variables, io = fixture
    fam = nets.get_family("adm-superres")
    schedule = fam.conversion.schedule(NAME, kwargs, {})
    assert schedule == schedules.VPDiscrete.from_betas(schedules.guided_diffusion_betas("linear", 1000))
    module = fam.build(NAME, kwargs)
    denoise = fam.sampling.denoise
    with jax.default_matmul_precision("highest"):
        x0 = jax.jit(lambda x, low_res: denoise(module, variables, x, 1.0, None, schedule, low_res=low_res))(
            io["x"], io["low_res"])
    alpha, sigma = float(schedule.alpha(1.0)), float(schedule.sigma(1.0))
    expected = (io["x"][2] - sigma * io["output"][2, ..., :3]) / alpha
    assert _rel(x0[2], expected) <= 1e-5
    with pytest.raises(ValueError, match="needs low_res"):
        denoise(module, variables, io["x"], 1.0, None, schedule)


def test_presets_are_the_released_upsamplers():
    # sr_create_model with the README's upsampler flags.
    for name, attention in (("64_256", (32, 16, 8)), ("128_512", (32, 16))):
        preset = sr.PRESETS[name]
        large = int(name.split("_")[1])
        assert preset["image_size"] == large and preset["in_channels"] == 3 and preset["out_channels"] == 6
        assert preset["model_channels"] == 192 and preset["num_res_blocks"] == 2
        assert preset["channel_mult"] == (1, 1, 2, 2, 4, 4) and preset["num_classes"] == 1000
        assert preset["attention_resolutions"] == tuple(large // r for r in attention)
        assert preset["use_scale_shift_norm"] and preset["resblock_updown"] and preset["use_fp16"]
        assert not preset["use_new_attention_order"]
        assert sr.DIFFUSION_PRESETS[name] == dict(diffusion_steps=1000, noise_schedule="linear", learn_sigma=True)
    assert sr.PRESETS["64_256"]["num_heads"] == 4 and sr.PRESETS["64_256"]["num_head_channels"] == -1
    assert sr.PRESETS["128_512"]["num_head_channels"] == 64
    # Parameter counts of the original sr_create_model (guided-diffusion 22e0df8, counted with torch on
    # the meta device); the README gives none.
    for name, count in (("64_256", 311_795_910), ("128_512", 308_835_270)):
        shapes = _expected_keys(sr.PRESETS[name])
        assert sum(math.prod(s) for s in shapes.values()) == count
        assert shapes["input_blocks.0.0.weight"] == (192, 6, 3, 3)  # x and the upsampled low_res


def test_converter_is_strict():
    sd = random_state_dict(CONDITIONAL)
    with pytest.raises(ValueError, match=r"missing keys \(1: label_emb\.weight\)"):
        sr.convert_state_dict(NAME, CONDITIONAL, {k: v for k, v in sd.items() if k != "label_emb.weight"})
    with pytest.raises(ValueError, match=r"unexpected keys \(1: out\.3\.weight\)"):
        sr.convert_state_dict(NAME, CONDITIONAL, {**sd, "out.3.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatches \(1: input_blocks\.0\.0\.weight \(32, 3, 3, 3\) != "
                                         r"\(32, 6, 3, 3\)\)"):
        sr.convert_state_dict(NAME, CONDITIONAL, {**sd, "input_blocks.0.0.weight": np.zeros((32, 3, 3, 3))})


def test_bad_kwargs_are_one_line_value_errors():
    for kwargs, pattern in (({**CONDITIONAL, "pool": "attention"}, r"bad SuperResModel kwargs: .*pool"),
                            ({**CONDITIONAL, "dims": 1}, r"only dims=2")):
        with pytest.raises(ValueError, match=pattern) as err:
            sr.build(NAME, kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="only SuperResModel"):
        sr.build("UNetModel", CONDITIONAL)
    with pytest.raises(ValueError, match="cannot read epsilon from 5 output channels"):
        nets.get_family("adm-superres").build(NAME, {**CONDITIONAL, "out_channels": 5})


# ----------------------------------------------------------------------------------------------
# `jdiffsample convert adm-superres`.


def test_cli_converts_the_fixture(fixture, tmp_path, capsys):
    folder, kwargs, _, io = fixture
    dst = tmp_path / "out"
    assert cli.main(["convert", "adm-superres", str(folder / "state_dict.pt"), str(dst),
                     "--config", str(folder / "config.json"), "--diffusion-steps", "500"]) == 0
    assert "SuperResModel:" in capsys.readouterr().out
    module, variables = nets.load(dst)
    variables = jax.tree.map(np.asarray, variables)  # as the converter gives them: reuses the compiled forward
    assert module == sr.build(NAME, kwargs)
    assert _rel(_apply(kwargs, variables, io["x"], io["timesteps"], io["low_res"]), io["output"]) <= 1e-5
    config = nets.read_config(dst)
    assert config["family"] == "adm-superres" and config["class_name"] == NAME
    assert schedules.from_config(config["schedule"]) == schedules.VPDiscrete.from_betas(
        schedules.guided_diffusion_betas("linear", 500))
    # The loaded model's denoiser needs low_res (its conditioning), and uses it
    model = nets.from_config(config, variables)
    with pytest.raises(ValueError, match=r"needs the conditioning \['low_res'\], got none"):
        model.denoiser()
    x0 = model.denoiser(conditioning=dict(low_res=io["low_res"]))(io["x"], 0.5)
    # at t = 0.5 the network sees timestep 249 of the 500-step schedule: x0 from its epsilon given
    # low_res, computed from the converted network's own output here
    schedule = model.schedule
    steps = np.full(len(io["x"]), float(schedule.model_time(0.5)), np.float32)
    eps = np.asarray(_apply(kwargs, variables, io["x"], steps, io["low_res"]))[..., : io["x"].shape[-1]]
    alpha, sigma = float(schedule.alpha(0.5)), float(schedule.sigma(0.5))
    assert _rel(x0, (io["x"] - sigma * eps) / alpha) <= 1e-5
    other = model.denoiser(conditioning=dict(low_res=io["low_res"][::-1]))(io["x"], 0.5)
    assert np.abs(np.asarray(other) - np.asarray(x0)).max() > 1e-3  # the low-res image conditions it


def test_cli_errors_write_nothing(fixture, tmp_path, capsys):
    folder, *_ = fixture
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"class_name": "UNetModel", "kwargs": CONDITIONAL}))
    cases = [
        (["--preset", "64x64"], r"unknown ADM upsampler preset '64x64'; choose one of 64_256, 128_512"),
        (["--preset", "64_256"], r"does not fit the SuperResModel kwargs.*shape mismatches"),
        (["--config", str(other)], r"only SuperResModel"),
        (["--config", str(folder / "config.json"), "--noise-schedule", "quadratic"], r"unknown beta schedule"),
    ]
    for i, (options, pattern) in enumerate(cases):
        assert_convert_fails("adm-superres", folder / "state_dict.pt", tmp_path / f"out{i}", options, pattern, capsys)

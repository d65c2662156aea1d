"""Tests for the Flax port of facebookresearch/DiT (``jdiffsample.nets.dit``).

The golden fixture ``dit_tiny`` holds a small DiT built with the original code, random weights
(``pos_embed`` included), and the original's ``model(x, t, y)`` and ``forward_with_cfg`` outputs.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import fixture_dir, require
from jdiffsample.nets import dit
from jdiffsample.nets.formats import torchfile


@pytest.fixture(scope="module")
def tiny():
    """(kwargs, state_dict, NHWC io dict, module, variables, jitted apply) of ``dit_tiny``."""
    folder = fixture_dir("dit_tiny")
    kwargs = json.loads((folder / "config.json").read_text())["kwargs"]
    state_dict = torchfile.load_state_dict(folder / "state_dict.pt")
    io = {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in np.load(folder / "io.npz").items()}
    module = dit.build("DiT", kwargs)
    variables = dit.convert_state_dict("DiT", kwargs, state_dict)
    return kwargs, state_dict, io, module, variables, jax.jit(module.apply)


_guided = jax.jit(dit.guided_output, static_argnums=(0, 6))


def _rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def test_matches_original_forward(tiny):
    _, _, io, _, variables, apply = tiny
    with jax.default_matmul_precision("highest"):
        out = np.asarray(apply(variables, io["x"], io["t"], io["y"]))
    assert out.dtype == np.float32 and out.shape == io["output"].shape == (4, 8, 8, 8)
    assert _rel_err(out, io["output"]) <= 1e-5


def test_matches_original_forward_with_cfg(tiny):
    _, _, io, module, variables, _ = tiny
    with jax.default_matmul_precision("highest"):
        out = _guided(module, variables, io["cfg_x"], io["cfg_t"], io["cfg_y"], io["cfg_scale"], 3)
        plain = _guided(module, variables, io["cfg_x"], io["cfg_t"], io["cfg_y"], 1.0, 3)
    assert out.dtype == jnp.float32 and _rel_err(out, io["cfg_output"]) <= 1e-5
    # Scale 1 is the conditional output on both halves; the unguided channels are each half's own.
    assert _rel_err(plain[2:, ..., :3], np.asarray(plain[:2, ..., :3])) == 0
    assert not np.allclose(plain[2:, ..., 3:], plain[:2, ..., 3:])


def test_guidance_of_all_epsilon_channels(tiny):
    _, _, io, module, variables, apply = tiny
    x, t, y, s = io["cfg_x"], io["cfg_t"], io["cfg_y"], 4.0
    out = np.asarray(_guided(module, variables, x, t, y, s, None))
    raw = np.asarray(apply(variables, np.concatenate([x[:2], x[:2]]), t, y))
    eps = raw[2:, ..., :4] + s * (raw[:2, ..., :4] - raw[2:, ..., :4])
    np.testing.assert_allclose(out[..., :4], np.concatenate([eps, eps]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[..., 4:], raw[..., 4:], rtol=1e-5, atol=1e-5)
    three = np.asarray(_guided(module, variables, x, t, y, s, 3))
    np.testing.assert_array_equal(out[..., :3], three[..., :3])
    assert not np.allclose(out[..., 3], three[..., 3])
    with pytest.raises(ValueError, match="even batch"):
        dit.guided_output(module, variables, x[:3], t[:3], y[:3], s)


def test_scalar_t_broadcasts(tiny):
    _, _, io, _, variables, apply = tiny
    batch = apply(variables, io["x"], np.full(4, 17.5, np.float32), io["y"])
    np.testing.assert_array_equal(apply(variables, io["x"], np.float32(17.5), io["y"]), batch)


def test_bfloat16_is_close_and_computes_in_bfloat16(tiny):
    kwargs, _, io, _, variables, _ = tiny
    module = dit.build("DiT", kwargs, dtype=jnp.bfloat16)
    out, state = jax.jit(lambda v, *a: module.apply(
        v, *a, capture_intermediates=lambda m, _: m.name in ("fc1", "qkv"), mutable=["intermediates"]))(
        variables, io["x"], io["t"], io["y"])
    block = state["intermediates"]["blocks_1"]
    assert block["mlp"]["fc1"]["__call__"][0].dtype == jnp.bfloat16
    assert block["attn"]["qkv"]["__call__"][0].dtype == jnp.bfloat16
    assert out.dtype == jnp.float32
    err = _rel_err(out, io["output"])
    assert 1e-4 < err <= 3e-2, err


def test_pos_embed_table():
    """The original's table (MAE's get_2d_sincos_pos_embed), written out for a 2x2 grid, dim 8."""
    w = np.array([1.0, 0.01])  # 10000 ** (-i / 2)
    expected = []
    for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):
        expected.append(np.concatenate([np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)]))
    np.testing.assert_array_equal(dit.pos_embed_table(8, 2), np.array(expected, np.float32))


def _param_count(kwargs) -> int:
    module = dit.build("DiT", kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *dit.example_inputs(module))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract["params"]))


def test_architecture_table_parameter_counts():
    assert _param_count(dit.arch_kwargs("DiT-XL/2")) == 675_129_632  # 256px, learned sigma, 1000 classes
    # The model sizes of the paper: S 33M, B 130M, L 458M, XL 675M (the patch size barely matters).
    for name, millions in (("DiT-S/8", 33), ("DiT-B/4", 130), ("DiT-L/8", 458)):
        assert abs(_param_count(dit.arch_kwargs(name)) / 1e6 - millions) < 1
    assert set(dit.DIT_CONFIGS) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}


def test_output_shapes():
    for kwargs, channels in ((dit.arch_kwargs("DiT-S/8", input_size=16, num_classes=10), 8),
                             (dit.arch_kwargs("DiT-S/4", input_size=8, learn_sigma=False), 4)):
        module = dit.build("DiT", kwargs)
        abstract = jax.eval_shape(module.init, jax.random.key(0), *dit.example_inputs(module))
        size = kwargs["input_size"]
        x = jax.ShapeDtypeStruct((3, size, size, 4), jnp.float32)
        out = jax.eval_shape(module.apply, abstract, x, jnp.zeros(3), jnp.zeros(3, jnp.int32))
        assert (out.shape, out.dtype) == ((3, size, size, channels), jnp.float32)
        with pytest.raises(ValueError, match="expects x of shape"):
            jax.eval_shape(module.apply, abstract, jnp.zeros((3, size, size, 3)), jnp.zeros(3),
                           jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=9), "not a multiple of patch_size"),
    (dict(hidden_size=1150), "multiple of 4"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(class_dropout_prob=-0.1), "class_dropout_prob >= 0"),
    (dict(dropout=0.1), "unknown DiT kwargs"),
])
def test_bad_kwargs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dit.build("DiT", kwargs)


def test_bad_names():
    with pytest.raises(ValueError, match="only 'DiT'"):
        dit.build("DiTBlock", {})
    with pytest.raises(ValueError, match="unknown DiT architecture"):
        dit.arch_kwargs("DiT-H/2")


def _one_line_error(kwargs, state_dict) -> str:
    with pytest.raises(ValueError) as err:
        dit.convert_state_dict("DiT", kwargs, state_dict)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_strict_matcher(tiny):
    kwargs, state_dict, *_ = tiny
    missing = {k: v for k, v in state_dict.items() if k != "blocks.1.mlp.fc2.bias"}
    assert "missing keys (1: blocks.1.mlp.fc2.bias)" in _one_line_error(kwargs, missing)
    extra = {**state_dict, "blocks.2.attn.qkv.weight": state_dict["blocks.1.attn.qkv.weight"]}
    assert "unexpected keys (1: blocks.2.attn.qkv.weight)" in _one_line_error(kwargs, extra)
    message = _one_line_error({**kwargs, "input_size": 16}, state_dict)
    assert "shape mismatches (1: pos_embed (1, 16, 64) != (1, 64, 64))" in message
    message = _one_line_error({**kwargs, "class_dropout_prob": 0.0}, state_dict)
    assert "y_embedder.embedding_table.weight (11, 64) != (10, 64)" in message


def _shape_only_state_dict(kwargs) -> dict:
    """Every key the converter expects, as zero-stride zero arrays (nothing allocated)."""
    module = dit.build("DiT", kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *dit.example_inputs(module))
    return {dit.LAYOUT.key(path): np.broadcast_to(np.float32(0), dit.LAYOUT.shape(path, leaf.shape))
            for path, leaf in traverse_util.flatten_dict(abstract["params"]).items()}


def test_infer_kwargs_from_shapes(tiny):
    kwargs = dit.arch_kwargs("DiT-B/4", input_size=16, num_classes=10, learn_sigma=False)
    assert dit.infer_kwargs(_shape_only_state_dict(kwargs)) == kwargs
    with pytest.raises(ValueError, match="none of DIT_CONFIGS"):
        dit.infer_kwargs(tiny[1])
    with pytest.raises(ValueError, match="not a DiT state dict"):
        dit.infer_kwargs({"w": np.zeros(2)})


def _train_checkpoint(torch, state_dict, args):
    """What DiT's train.py saves: model and EMA state dicts, the AdamW state, the parsed args."""
    ema = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    model = {k: v + 1 for k, v in ema.items()}
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=1e-4, weight_decay=0)
    param.sum().backward()
    opt.step()
    return {"model": model, "ema": ema, "opt": opt.state_dict(), "args": args}


def _train_args(**extra):
    return argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model="DiT-XL/2",
                              image_size=256, num_classes=1000, epochs=1400, global_batch_size=256,
                              global_seed=0, vae="ema", num_workers=4, log_every=100, ckpt_every=50_000,
                              **extra)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_train_checkpoint_gives_ema_and_args(tiny, tmp_path, zip_format):
    torch = require("torch")
    _, state_dict, *_ = tiny
    args = _train_args()
    torch.save(_train_checkpoint(torch, state_dict, args), tmp_path / "0050000.pt",
               _use_new_zipfile_serialization=zip_format)
    loaded, info = dit.load_checkpoint(tmp_path / "0050000.pt")
    assert list(loaded) == list(state_dict)
    assert all(np.array_equal(loaded[k], state_dict[k]) for k in state_dict)
    assert info == vars(args) and type(info) is dict
    assert dit.infer_kwargs(loaded, info) == dit.arch_kwargs("DiT-XL/2", input_size=32, num_classes=1000)


def test_released_file_gives_state_dict_and_no_info(tiny):
    _, state_dict, *_ = tiny
    loaded, info = dit.load_checkpoint(fixture_dir("dit_tiny") / "state_dict.pt")
    assert info == {} and list(loaded) == list(state_dict)


class _Payload:
    """Pickles as ``exec(code)``: torch.load(weights_only=False) would run it."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_hostile_global_in_train_checkpoint_is_refused(tiny, tmp_path):
    torch = require("torch")
    _, state_dict, *_ = tiny
    sentinel = tmp_path / "pwned"
    args = _train_args(hook=_Payload(f"open({str(sentinel)!r}, 'w').close()"))
    torch.save(_train_checkpoint(torch, state_dict, args), tmp_path / "evil.pt")
    with pytest.raises(torchfile.UnsafeCheckpointError, match="global builtins.exec,") as err:
        dit.load_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(err.value) and not sentinel.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live
    assert sentinel.exists()

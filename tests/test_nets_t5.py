"""Tests for the T5 v1.1 encoder and its tokenizer (``jdiffsample.nets.t5``), the text encoder of
FLUX.1 and Stable Diffusion 3.

References: the ``flux_tiny`` golden fixture (its ``text_encoder_2``/``tokenizer_2`` folders and the
pipeline's ``t5_prompt_embeds``), and the installed transformers (``T5EncoderModel``,
``T5TokenizerFast``, test-only) on more configurations with every parameter redrawn, saved with
``save_pretrained`` (one of them sharded). Tolerance: max |ours - theirs| <= 1e-5 max |theirs|
(float32, full precision).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, require
from _helpers import randomize, rel_err

from jdiffsample.nets import lazy, t5

RTOL = 1e-5


def highest(fn, *args):
    with jax.default_matmul_precision("highest"):
        return np.asarray(fn(*args))


def encode(folder, ids, mask=None, *, lazy_read=True, dtype=jnp.float32):
    """Our encoder's last hidden state for ``ids``, converted from ``folder``."""
    config, state_dict = t5.load_folder(folder, lazy=lazy_read)
    module = t5.build("T5EncoderModel", config, dtype=dtype)
    variables = t5.convert_state_dict("T5EncoderModel", config, state_dict)
    variables = jax.tree.map(np.asarray, variables)
    return highest(jax.jit(lambda v, i, m: module.apply(v, i, m)), variables, ids, mask), variables


def reference(folder, ids, mask=None):
    torch = require("torch")
    transformers = require("transformers")
    model = transformers.T5EncoderModel.from_pretrained(folder).eval()
    with torch.no_grad():
        mask = None if mask is None else torch.from_numpy(np.asarray(mask))
        return model(torch.from_numpy(np.asarray(ids, np.int64)), attention_mask=mask).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def flux():
    folder = fixture_dir("flux_tiny")
    return folder, np.load(folder / "io.npz")


def test_fixture_tokens_and_hidden_states(flux):
    transformers = require("transformers")
    folder, io = flux
    length = int(io["max_sequence_length"])
    prompts = [str(p) for p in io["prompts"]]
    ids = t5.T5Tokenizer.from_folder(folder / "tokenizer_2")(prompts, max_length=length)
    theirs = transformers.T5TokenizerFast.from_pretrained(folder / "tokenizer_2")(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, theirs)
    ours, variables = encode(folder / "text_encoder_2", ids)
    assert rel_err(ours, io["t5_prompt_embeds"]) < RTOL  # what the pipeline gave the transformer
    assert rel_err(ours, reference(folder / "text_encoder_2", ids)) < RTOL
    assert set(variables["params"]) == {"embed_tokens", "relative_attention_bias", "blocks_0", "blocks_1",
                                        "final_norm"}
    assert set(variables["params"]["blocks_0"]["mlp"]) == {"gate", "in", "out"}


def _random_t5(tmp_path, name, **config):
    """A randomized transformers T5EncoderModel saved with save_pretrained; ``shard``: bytes per shard."""
    torch = require("torch")
    transformers = require("transformers")
    shard = config.pop("shard", None)
    cfg = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_heads=4, **config)
    model = randomize(transformers.T5EncoderModel(cfg), seed=sum(map(ord, name)))
    with torch.no_grad():  # T5's relative bias is large in real models: make it matter here too
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(3.0)
    folder = tmp_path / name
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


@pytest.mark.parametrize("name,config", [
    ("sharded_gated", dict(num_layers=3, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                           relative_attention_max_distance=128, shard="40KB")),
    ("relu", dict(num_layers=2, feed_forward_proj="relu", relative_attention_num_buckets=16,
                  relative_attention_max_distance=20)),
])
def test_other_configs_against_transformers(tmp_path, name, config):
    folder = _random_t5(tmp_path, name, **config)
    assert (folder / "model.safetensors.index.json").is_file() == ("shard" in config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 120, (2, 150))  # long enough for the logarithmic buckets and the far ones
    mask = np.ones_like(ids)
    mask[1, 90:] = 0
    ours, _ = encode(folder, ids, mask)
    assert rel_err(ours, reference(folder, ids, mask)) < RTOL
    ours, _ = encode(folder, ids, lazy_read=False)
    assert rel_err(ours, reference(folder, ids)) < RTOL


def test_position_buckets_equal_transformers():
    torch = require("torch")
    require("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    for length, buckets, distance in ((512, 32, 128), (77, 8, 16), (300, 16, 20)):
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        theirs = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, distance), theirs)


def test_stored_dtypes_are_kept(tmp_path):
    """A bfloat16 release converts to bfloat16 parameters (lazily) and computes like transformers
    does in float32 on the same (rounded) weights; bfloat16 compute stays close."""
    torch = require("torch")
    transformers = require("transformers")
    folder = _random_t5(tmp_path, "bf16", num_layers=2, feed_forward_proj="gated-gelu")
    model = transformers.T5EncoderModel.from_pretrained(folder)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16_saved")
    config, state_dict = t5.load_folder(tmp_path / "bf16_saved", lazy=True)
    assert all(isinstance(v, lazy.LazyArray) for v in state_dict.values())
    variables = t5.convert_state_dict("T5EncoderModel", config, state_dict)
    assert {np.asarray(x).dtype.name for x in jax.tree.leaves(variables)} == {"bfloat16"}
    ids = np.random.default_rng(1).integers(0, 120, (2, 20))
    ours, _ = encode(tmp_path / "bf16_saved", ids)
    model.float()
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert rel_err(ours, theirs) < RTOL
    low, _ = encode(tmp_path / "bf16_saved", ids, dtype=jnp.bfloat16)
    assert low.dtype == np.float32 and rel_err(low, theirs) < 0.05


def test_tied_embedding_names(flux):
    folder = flux[0] / "text_encoder_2"
    config, state_dict = t5.load_folder(folder)
    shared = state_dict["shared.weight"]
    for sd in ({**state_dict, "encoder.embed_tokens.weight": shared * 0},   # shared wins, as in transformers
               {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state_dict.items()}):
        variables = t5.convert_state_dict("T5EncoderModel", config, sd)
        np.testing.assert_array_equal(variables["params"]["embed_tokens"]["embedding"], shared)
    # a full T5's decoder is ignored, as transformers' T5EncoderModel does
    t5.convert_state_dict("T5EncoderModel", config, {**state_dict, "decoder.block.0.x.weight": shared})


def test_truncation_warns_once(flux):
    transformers = require("transformers")
    folder = flux[0] / "tokenizer_2"
    tok = t5.T5Tokenizer.from_folder(folder)
    prompts = ["a photo of the cat " * 6, "an astronaut", "riding a horse on the mountain at night " * 3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok(prompts, max_length=12)
    assert len(caught) == 1 and "max_sequence_length" in str(caught[0].message)
    assert "cat" in str(caught[0].message) and "night" in str(caught[0].message)
    theirs = transformers.T5TokenizerFast.from_pretrained(folder)(
        prompts, padding="max_length", max_length=12, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, theirs)
    assert (ids[:, -1] == tok.eos_token_id).sum() == 2 and ids[1, -1] == tok.pad_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a cat"], max_length=12)  # short prompts: no warning


def one_line_error(fn, *args, match=None, **kwargs):
    with pytest.raises(ValueError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_errors(flux, tmp_path):
    folder = flux[0]
    config, state_dict = t5.load_folder(folder / "text_encoder_2")
    one_line_error(t5.build, "T5EncoderModel", {**config, "model_type": "mt5"}, match="model_type")
    one_line_error(t5.build, "T5EncoderModel", {**config, "feed_forward_proj": "gated-swish"}, match="feed_forward_proj")
    one_line_error(t5.build, "T5Model", config, match="unsupported T5 class")
    missing = {k: v for k, v in state_dict.items() if "block.1.layer.1" not in k}
    message = one_line_error(t5.convert_state_dict, "T5EncoderModel", config, missing, match="missing keys")
    assert "encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in message
    wrong = {**state_dict, "encoder.final_layer_norm.weight": np.ones(7, np.float32)}
    one_line_error(t5.convert_state_dict, "T5EncoderModel", config, wrong, match="shape mismatches")
    one_line_error(t5.load_folder, folder / "text_encoder", match="not a T5")
    one_line_error(t5.T5Tokenizer.from_folder, folder / "tokenizer", match="no tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    one_line_error(t5.T5Tokenizer.from_folder, tmp_path, match="not a tokenizers file")
    # a truncated weights file fails when its folder is read, before any conversion
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = (folder / "text_encoder_2" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    one_line_error(t5.load_folder, tmp_path, lazy=True, match="truncated")

"""Flax port of transformers' ``T5EncoderModel`` (T5 v1.1, the text encoder of FLUX.1 and Stable
Diffusion 3), and its tokenizer.

Written from the architecture; reproduces ``T5EncoderModel(input_ids).last_hidden_state`` once the
weights are converted::

    config, state_dict = load_folder("FLUX.1-dev/text_encoder_2")    # config.json + (sharded) safetensors
    module = build("T5EncoderModel", config)                         # dtype=jnp.bfloat16 optional
    variables = convert_state_dict("T5EncoderModel", config, state_dict)
    ids = T5Tokenizer.from_folder("FLUX.1-dev/tokenizer_2")(prompts, max_length=512)
    hidden = module.apply(variables, ids)                            # [B, 512, d_model] float32

Architecture: token embeddings (``shared``), then ``num_layers`` pre-norm blocks (self-attention,
then a feed-forward network, each added to its input) and a final norm. The norms are T5's RMS
norm: ``x / sqrt(mean(x^2) + eps) * weight``, no mean subtracted, no bias. Attention has no biases
and does not scale its logits by 1/sqrt(d_kv); instead a learned bias per head and relative
position bucket (:func:`relative_position_buckets`: exact up to ``num_buckets / 4`` tokens apart,
then logarithmic up to ``relative_attention_max_distance``, bidirectional) is added to the logits;
the first block owns the bias table and every block uses it. The feed-forward network is
``wo(act(wi_0 x) * wi_1 x)`` for the gated variants of v1.1 (``feed_forward_proj="gated-gelu"``:
GELU with the tanh approximation, transformers' ``gelu_new``) or ``wo(act(wi x))`` (original T5:
``"relu"``). ``attention_mask`` (1: attend) is optional: the FLUX.1 and SD3 pipelines pass none, so
padding tokens are attended as well.

Variables ``{"params": ...}`` with regular names, so that sharding rules can name attention heads
and MLP columns: ``embed_tokens``, ``relative_attention_bias`` ``[buckets, heads]``,
``blocks_<i>/{attn_norm, attn/{q,k,v,out}, mlp_norm, mlp/{gate,in,out}}`` (``gate``: ``wi_0``,
``in``: ``wi_1`` or ``wi``, ``out``: ``wo``), ``final_norm``; :data:`LAYOUT` maps them to the
transformers names. A state dict holding ``shared.weight`` and ``encoder.embed_tokens.weight`` (tied
in transformers) uses the first; decoder tensors of a full T5 are ignored, as transformers does.

Precision: ``dtype`` is the compute type of the linear layers and attention; the residual stream,
the norms, the position bias and the softmax are float32, the output float32. Stored float16 or
bfloat16 parameters are kept as they are (cast when computing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from jdiffsample.nets.formats import diffusers_folder, statedict
from jdiffsample.nets.formats.checkpoint import read_json
from jdiffsample.tokenizer import fixed_length

__all__ = ["T5EncoderModel", "T5Tokenizer", "build", "example_inputs", "convert_state_dict", "load_folder",
           "relative_position_buckets", "RMSNorm", "LAYOUT", "CLASS_NAMES", "TOKENIZER_FILES"]

Dtype = Any
CLASS_NAMES = ("T5EncoderModel",)
#: ``feed_forward_proj`` -> (activation, gated), as transformers' ``T5Config`` reads it.
_FEED_FORWARD = {
    "relu": (jax.nn.relu, False), "gated-relu": (jax.nn.relu, True),
    "gelu": (functools.partial(jax.nn.gelu, approximate=False), False),
    "gated-gelu": (functools.partial(jax.nn.gelu, approximate=True), True),  # transformers' gelu_new
    "silu": (jax.nn.silu, False), "gated-silu": (jax.nn.silu, True),
}


class RMSNorm(nn.Module):
    """T5's RMS norm (also FLUX's query/key norm) in float32: ``x / sqrt(mean(x^2) + eps) * scale``
    over the last axis; the output is float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * scale.astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 ``[length, length]``: the bucket of key position j for query position i (bidirectional,
    as T5's encoder), computed in float32 exactly as transformers' ``_relative_position_bucket``."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    far = np.maximum(distance, max_exact).astype(np.float32)  # the nearer ones take the exact buckets below
    large = max_exact + (np.log(far / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    out = (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)
    out.flags.writeable = False
    return out


class _Attention(nn.Module):
    """Multi-head self-attention without biases or logit scaling; ``bias`` [1, heads, L, L]."""

    heads: int
    d_kv: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, length, d_model = x.shape
        x = x.astype(self.dtype)
        inner = self.heads * self.d_kv

        def project(name):
            out = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(x)
            return out.reshape(b, length, self.heads, self.d_kv)

        a = jax.nn.dot_product_attention(project("q"), project("k"), project("v"), bias=bias, scale=1.0)
        return nn.Dense(d_model, use_bias=False, dtype=self.dtype, name="out")(a.reshape(b, length, inner))


class _FeedForward(nn.Module):
    d_ff: int
    feed_forward_proj: str
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act, gated = _FEED_FORWARD[self.feed_forward_proj]
        x = x.astype(self.dtype)
        h = nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="gate" if gated else "in")(x)
        h = act(h)
        if gated:
            h = h * nn.Dense(self.d_ff, use_bias=False, dtype=self.dtype, name="in")(x)
        return nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="out")(h)


class _Block(nn.Module):
    heads: int
    d_kv: int
    d_ff: int
    feed_forward_proj: str
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        h = RMSNorm(self.eps, name="attn_norm")(x)
        x = x + _Attention(self.heads, self.d_kv, self.dtype, name="attn")(h, bias).astype(jnp.float32)
        h = RMSNorm(self.eps, name="mlp_norm")(x)
        return x + _FeedForward(self.d_ff, self.feed_forward_proj, self.dtype, name="mlp")(h).astype(jnp.float32)


class T5EncoderModel(nn.Module):
    """transformers ``T5EncoderModel``; attributes are the config entries that shape the network
    (defaults as in transformers' ``T5Config``). ``__call__(input_ids, attention_mask=None)``:
    int ``[B, L]`` -> the last hidden state, float32 ``[B, L, d_model]``."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.feed_forward_proj not in _FEED_FORWARD:
            raise ValueError(f"T5EncoderModel: feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                             f"allowed: {', '.join(_FEED_FORWARD)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"T5EncoderModel: relative_attention_num_buckets must be >= 4, got "
                             f"{self.relative_attention_num_buckets}")
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
        length = input_ids.shape[1]
        x = nn.Embed(self.vocab_size, self.d_model, name="embed_tokens")(input_ids).astype(jnp.float32)
        table = self.param("relative_attention_bias", nn.initializers.normal(1.0),
                           (self.relative_attention_num_buckets, self.num_heads), jnp.float32)
        buckets = relative_position_buckets(length, self.relative_attention_num_buckets,
                                            self.relative_attention_max_distance)
        bias = jnp.asarray(table, jnp.float32)[buckets].transpose(2, 0, 1)[None]  # [1, heads, L, L]
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
            bias = jnp.where(keep, bias, jnp.finfo(jnp.float32).min)
        for i in range(self.num_layers):
            x = _Block(self.num_heads, self.d_kv, self.d_ff, self.feed_forward_proj, self.layer_norm_epsilon,
                       self.dtype, name=f"blocks_{i}")(x, bias)
        return RMSNorm(self.layer_norm_epsilon, name="final_norm")(x)


_FIELDS = tuple(f.name for f in dataclasses.fields(T5EncoderModel) if f.name not in ("dtype", "parent", "name"))


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> T5EncoderModel:
    """The module for a transformers ``config.json`` dict (the entries that shape the encoder are read,
    the rest ignored). ``ValueError`` for another class, a ``model_type`` other than ``t5`` or an
    unsupported value."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unsupported T5 class {class_name!r}; supported: {', '.join(CLASS_NAMES)}")
    if kwargs.get("model_type") != "t5":
        raise ValueError(f"{class_name}: model_type={kwargs.get('model_type')!r} is not supported; allowed: 't5'")
    return T5EncoderModel(**{k: kwargs[k] for k in _FIELDS if kwargs.get(k) is not None}, dtype=dtype)


def example_inputs(module: T5EncoderModel) -> tuple:
    """``(input_ids,)`` for ``module.init``."""
    return (jnp.zeros((1, 4), jnp.int32),)


_BLOCK = re.compile(r"^blocks_(\d+)$")
_NAMES = {("attn_norm",): "layer.0.layer_norm", ("mlp_norm",): "layer.1.layer_norm",
          **{("attn", n): f"layer.0.SelfAttention.{t}" for n, t in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))},
          ("mlp", "gate"): "layer.1.DenseReluDense.wi_0", ("mlp", "out"): "layer.1.DenseReluDense.wo"}


def _torch_key(path: tuple, gated: bool = True) -> str:
    """transformers' name of a Flax parameter path (``blocks_3/mlp/in/kernel`` ->
    ``encoder.block.3.layer.1.DenseReluDense.wi_1.weight``)."""
    *modules, leaf = path
    weight = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if modules == ["embed_tokens"]:
        return "shared.weight"
    if not modules and leaf == "relative_attention_bias":
        return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if modules == ["final_norm"]:
        return "encoder.final_layer_norm.weight"
    m = _BLOCK.match(modules[0]) if modules else None
    rest = tuple(modules[1:])
    name = _NAMES.get(rest) or (f"layer.1.DenseReluDense.{'wi_1' if gated else 'wi'}" if rest == ("mlp", "in") else None)
    if m is None or name is None:
        return ".".join(path)  # not a T5 parameter: the matcher reports it as missing
    return f"encoder.block.{m[1]}.{name}.{weight}"


#: Flax paths <-> transformers names (layouts: linear kernels transposed).
LAYOUT = statedict.Layout(key=_torch_key)
_EMBED_ALIAS = "encoder.embed_tokens.weight"


def _ignored(key: str) -> bool:
    return key.startswith("decoder.") or key == "lm_head.weight"


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                       dtype=None) -> dict:
    """Flax ``{"params": ...}`` from a transformers T5 state dict, strictly matched (one ``ValueError``
    naming every missing or unexpected key and wrong shape). Floating tensors keep their stored
    dtype unless ``dtype`` is given; :class:`jdiffsample.nets.formats.lazy.LazyArray` s stay lazy."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    state_dict = dict(state_dict)
    if _EMBED_ALIAS in state_dict:  # tied to shared.weight in transformers, which wins
        alias = state_dict.pop(_EMBED_ALIAS)
        state_dict.setdefault("shared.weight", alias)
    gated = _FEED_FORWARD[module.feed_forward_proj][1]
    layout = statedict.Layout(key=functools.partial(_torch_key, gated=gated))
    return statedict.match(abstract, state_dict, layout=layout, ignore=_ignored, what=class_name, dtype=dtype)


def load_folder(path, *, lazy: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, state_dict)`` of a transformers T5 folder (a pipeline's ``text_encoder_2/`` or
    ``text_encoder_3/``): ``config.json`` and ``model.safetensors``, a sharded
    ``model.safetensors.index.json`` or ``pytorch_model.bin``. ``lazy``: tensors as
    :class:`jdiffsample.nets.formats.lazy.LazyArray` s (read when needed)."""
    config = diffusers_folder.read_config(path)
    names = config.get("architectures") or ["T5EncoderModel"]
    if config.get("model_type") != "t5":
        raise ValueError(f"{path}: config.json is for model_type {config.get('model_type')!r}, not a T5 ({names[0]})")
    read = diffusers_folder.lazy_weights if lazy else diffusers_folder.read_weights
    return config, read(path, stem="model", bin_stem="pytorch_model")


# ----------------------------------------------------------------------------------------------
# The tokenizer


#: The files of a T5 tokenizer folder that :meth:`T5Tokenizer.from_folder` reads (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class T5Tokenizer:
    """Prompts -> T5 token ids as the FLUX.1 and SD3 pipelines ask transformers' ``T5TokenizerFast``
    for them (``padding="max_length", truncation=True``): the folder's ``tokenizer.json`` pipeline
    (normalizer, pre-tokenizer, SentencePiece model) without special tokens, then ``</s>``, padded
    with the pad token; a longer prompt is cut to ``max_length - 1`` pieces before ``</s>``, and one
    warning per call names what was removed (diffusers logs one)."""

    def __init__(self, backend: Tokenizer, *, eos_token: str = "</s>", pad_token: str = "<pad>",
                 model_max_length: int = 512):
        self.backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id, self.pad_token_id = backend.token_to_id(eos_token), backend.token_to_id(pad_token)
        if self.eos_token_id is None or self.pad_token_id is None:
            raise ValueError(f"T5Tokenizer: the end token {eos_token!r} or pad token {pad_token!r} is not in the vocabulary")
        self.model_max_length = int(model_max_length)

    @classmethod
    def from_folder(cls, folder) -> T5Tokenizer:
        """The tokenizer of a ``tokenizer_2/`` (FLUX.1) or ``tokenizer_3/`` (SD3) folder; ``ValueError``
        when it has no readable ``tokenizer.json``."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder}: no tokenizer.json (a T5 tokenizer folder as diffusers saves it has one)")
        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # the Rust reader raises plain Exceptions
            raise ValueError(f"{folder}/tokenizer.json is not a tokenizers file ({err})") from None
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (folder / name).is_file():
                config.update(read_json(folder / name, name))

        def token(key, default):
            value = config.get(key, default)
            return value.get("content", default) if isinstance(value, Mapping) else value

        max_length = config.get("model_max_length", 512)
        if not isinstance(max_length, int) or max_length > 10**6:  # transformers' "no limit" marker
            max_length = 512
        return cls(backend, eos_token=token("eos_token", "</s>"), pad_token=token("pad_token", "<pad>"),
                   model_max_length=max_length)

    def encode(self, prompt: str) -> list[int]:
        """The ids of one prompt with ``</s>`` at the end, neither truncated nor padded."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        return [*self.backend.encode(prompt, add_special_tokens=False).ids, self.eos_token_id]

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """int32 ``[B, max_length]`` (default ``model_max_length``) ids of ``prompts``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.model_max_length if max_length is None else int(max_length)
        if length < 1:
            raise ValueError(f"max_length must be >= 1, got {length}")
        out, removed = fixed_length([self.encode(p) for p in prompts], length, self.pad_token_id, self.eos_token_id)
        if removed:
            warnings.warn(f"The following part of your input was truncated because `max_sequence_length` is set to "
                          f"{length} tokens: {[self.backend.decode(ids) for ids in removed]}", stacklevel=2)
        return out

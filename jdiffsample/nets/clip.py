"""Flax port of transformers' ``CLIPTextModel`` and ``CLIPTextModelWithProjection``: the text
encoders of Stable Diffusion (SD 1.x: CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H; SDXL: both ViT-L and
OpenCLIP ViT-bigG with its projection).

Written from the architecture; reproduces the transformers outputs once the weights are
converted::

    config, state_dict = load_folder("stable-diffusion-xl-base-1.0/text_encoder_2")
    module = build("CLIPTextModelWithProjection", config)        # dtype=jnp.bfloat16 optional
    variables = convert_state_dict("CLIPTextModelWithProjection", config, state_dict)
    out = module.apply(variables, input_ids)                     # int [B, L], L <= max_position_embeddings
    out["last_hidden_state"], out["hidden_states"][-2], out["pooler_output"], out["text_embeds"]

Architecture: token + position embeddings; ``num_hidden_layers`` pre-LayerNorm layers (causal
multi-head self-attention with biases, then an MLP ``fc2(act(fc1(x)))``, ``hidden_act``
``quick_gelu`` (``x * sigmoid(1.702 x)``) or ``gelu`` (exact)), each added to its input; a final
LayerNorm. Outputs (a dict of float32 arrays):

* ``last_hidden_state`` ``[B, L, D]``: after the final LayerNorm (SD 1.x/2.x's context);
* ``hidden_states``: a tuple of ``num_hidden_layers + 1`` states, the embeddings and every layer's
  output, without the final LayerNorm (``hidden_states[-2]`` is SDXL's context);
* ``pooler_output`` ``[B, D]``: ``last_hidden_state`` at the end-of-text token, found as transformers
  does: the first position holding ``eos_token_id``, or, for old configs with ``eos_token_id == 2``,
  the position of the largest id (the end token has the largest id in CLIP's vocabulary);
* ``text_embeds`` ``[B, projection_dim]`` (``CLIPTextModelWithProjection`` only):
  ``text_projection(pooler_output)``, no bias.

No attention mask besides the causal one (Stable Diffusion pipelines pass none). Variables
``{"params": ...}``; ``text_model.encoder.layers.0.self_attn.q_proj.weight`` (or the same without
the ``text_model.`` prefix, as newer transformers write ``CLIPTextModel``) is the Flax path
``encoder/layers_0/self_attn/q_proj/kernel``; an old checkpoint's ``position_ids`` buffer is checked
and dropped.

Precision: ``dtype`` is the compute type of the linear layers and attention; the residual stream,
LayerNorms and softmax are float32, the outputs float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets.formats import diffusers_folder, statedict
from jdiffsample.nets.diffusers_blocks import torch_key

__all__ = ["CLIPTextModel", "build", "example_inputs", "convert_state_dict", "load_folder", "CLASS_NAMES",
           "LAYOUT"]

Dtype = Any
CLASS_NAMES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
_LEGACY_EOS = 2  # configs written before transformers PR #24773 say eos_token_id=2


def _layer_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)(x.astype(jnp.float32))


class _Attention(nn.Module):
    """``CLIPAttention``: ``q_proj``/``k_proj``/``v_proj``/``out_proj`` with biases, causal."""

    heads: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, dim = x.shape
        x = x.astype(self.dtype)

        def project(name):
            return nn.Dense(dim, dtype=self.dtype, name=name)(x).reshape(b, length, self.heads, dim // self.heads)

        a = jax.nn.dot_product_attention(project("q_proj"), project("k_proj"), project("v_proj"), is_causal=True)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(a.reshape(b, length, dim))


class _MLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x.astype(self.dtype))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(_ACTIVATIONS[self.hidden_act](h))


class _EncoderLayer(nn.Module):
    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _Attention(self.heads, self.dtype, name="self_attn")(_layer_norm(x, self.eps, "layer_norm1"))
        h = _MLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
            _layer_norm(x, self.eps, "layer_norm2"))
        return x + h.astype(jnp.float32)


class _Encoder(nn.Module):
    """``CLIPEncoder``: returns every layer's output."""

    num_layers: int
    layer: Mapping[str, Any]

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        states = []
        for i in range(self.num_layers):
            x = _EncoderLayer(**self.layer, name=f"layers_{i}")(x)
            states.append(x)
        return states


class _Embeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, name="position_embedding")(
            jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel`` (``projection_dim=None``) or ``CLIPTextModelWithProjection``
    (``projection_dim`` set); attributes are the config's entries that shape the network (defaults
    as in transformers' ``CLIPTextConfig``). ``__call__(input_ids)`` returns the dict described in
    the module docstring."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPTextModel: hidden_act={self.hidden_act!r} is not supported; allowed: "
                             f"{', '.join(map(repr, _ACTIVATIONS))}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextModel: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        super().__post_init__()

    def setup(self):
        self.embeddings = _Embeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size)
        layer = dict(heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                     hidden_act=self.hidden_act, eps=self.layer_norm_eps, dtype=self.dtype)
        self.encoder = _Encoder(self.num_hidden_layers, layer)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32, use_fast_variance=False)
        if self.projection_dim is not None:
            self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def final_norm(self, state: jax.Array) -> jax.Array:
        """The final LayerNorm applied to a hidden state (diffusers' ``clip_skip`` for SD 1.x/2.x
        normalises ``hidden_states[-(clip_skip + 1)]`` this way)."""
        return self.final_layer_norm(state.astype(jnp.float32))

    def __call__(self, input_ids: jax.Array) -> dict[str, Any]:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"input_ids must be [B, L] with L <= {self.max_position_embeddings}, got "
                             f"{input_ids.shape}")
        x = self.embeddings(input_ids)
        states = self.encoder(x)
        last = self.final_norm(states[-1] if states else x)
        ids = input_ids.astype(jnp.int32)
        eos = jnp.argmax(ids if self.eos_token_id == _LEGACY_EOS else (ids == self.eos_token_id).astype(jnp.int32),
                         axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        out = dict(last_hidden_state=last, hidden_states=(x, *states), pooler_output=pooled)
        if self.projection_dim is not None:
            out["text_embeds"] = self.text_projection(pooled).astype(jnp.float32)
        return out


_FIELDS = tuple(f.name for f in dataclasses.fields(CLIPTextModel) if f.name not in ("dtype", "parent", "name"))


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> CLIPTextModel:
    """The module for a transformers ``text_encoder/config.json`` dict: the entries that shape the
    network are read (``projection_dim`` only for ``CLIPTextModelWithProjection``), the rest (dropout,
    token ids other than ``eos_token_id``, generation settings) ignored, as are nulls. ``ValueError``
    for another class, a ``model_type`` other than ``clip_text_model`` (transformers always writes
    it), or an unsupported value."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unsupported text encoder class {class_name!r}; supported: {', '.join(CLASS_NAMES)}")
    model_type = kwargs.get("model_type")
    if model_type != "clip_text_model":
        raise ValueError(f"{class_name}: model_type={model_type!r} is not supported; allowed: 'clip_text_model'")
    config = {k: kwargs[k] for k in _FIELDS if kwargs.get(k) is not None and k != "projection_dim"}
    if class_name == "CLIPTextModelWithProjection":
        config["projection_dim"] = kwargs.get("projection_dim", 512)
    return CLIPTextModel(**config, dtype=dtype)


def example_inputs(module: CLIPTextModel) -> tuple:
    """``(input_ids,)`` for ``module.init``: one sequence of the full length."""
    return (jnp.zeros((1, module.max_position_embeddings), jnp.int32),)


#: Flax paths <-> transformers names (``layers_0`` -> ``layers.0``, ``embedding``/``scale`` -> ``weight``).
LAYOUT = statedict.Layout(key=torch_key)
_PREFIX = "text_model."
_POSITION_IDS = "embeddings.position_ids"


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
    """Flax ``{"params": ...}`` (float32 NumPy) from a transformers CLIP text model state dict, with
    or without the ``text_model.`` prefix. Strict (:func:`statedict.match`): missing and unexpected
    keys and wrong shapes raise one ``ValueError``; a ``position_ids`` buffer must be
    ``arange(max_position_embeddings)``."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    renamed = {k.removeprefix(_PREFIX): v for k, v in state_dict.items()}
    if len(renamed) < len(state_dict):  # a name with and without the prefix: let the matcher name it
        renamed = dict(state_dict)
    buffers = None
    if _POSITION_IDS in renamed:
        buffers = {_POSITION_IDS: (np.arange(module.max_position_embeddings)[None], 0)}
    return statedict.match(abstract, renamed, layout=LAYOUT, buffers=buffers, what=class_name)


def load_folder(path, class_name: str | None = None) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """``(class_name, config, state_dict)`` of a transformers CLIP text model folder (a pipeline's
    ``text_encoder/``): ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read
    without executing code). ``class_name`` defaults to the config's ``architectures``."""
    config = diffusers_folder.read_config(path)
    if class_name is None:
        names = config.get("architectures") or ["CLIPTextModel"]
        class_name = names[0]
    if class_name not in CLASS_NAMES:
        raise ValueError(f"{path}: {class_name!r} is not a supported text encoder ({', '.join(CLASS_NAMES)})")
    return class_name, config, diffusers_folder.read_weights(path, stem="model", bin_stem="pytorch_model")

"""Flax port of diffusers' ``FluxTransformer2DModel``, the FLUX.1 rectified-flow transformer
(black-forest-labs/flux), and the packing of its latents.

Written from the architecture; reproduces diffusers' forward once the weights are converted::

    config, state_dict = load_folder("FLUX.1-dev/transformer", lazy=True)   # sharded bf16 safetensors
    module = build("FluxTransformer2DModel", config)                       # dtype=jnp.bfloat16 optional
    variables = convert_state_dict("FluxTransformer2DModel", config, state_dict)
    tokens = pack_latents(latents)                        # [B, h, w, 16] NHWC -> [B, (h/2)(w/2), 64]
    v = module.apply(variables, tokens, t5_embeds, pooled_clip, sigma, latent_image_ids(h, w),
                     text_ids(t5_embeds.shape[1]), guidance)   # the velocity, [B, (h/2)(w/2), 64]
    velocity = unpack_latents(v, h, w)                    # [B, h, w, 16]

Inputs as diffusers' forward takes them: ``timestep`` and ``guidance`` are the flow time (sigma in
[0, 1]) and the distilled guidance scale, each embedded after the x1000 the model applies (the
pipeline passes ``t / 1000``); ``guidance`` is required exactly when ``guidance_embeds`` (FLUX.1-dev;
schnell has no guidance embedding). ``img_ids`` ``[N, 3]`` hold (0, row, col) of each 2x2 patch,
``txt_ids`` ``[L, 3]`` zeros; NumPy ids give rotary tables computed in float64 as diffusers does (a
traced array: float32).

Architecture: ``x_embedder`` and ``context_embedder`` lift image tokens and T5 states to the width
``heads * head_dim``; the conditioning vector is the sum of MLP embeddings of the sinusoidal time,
the guidance and the pooled CLIP output. ``num_layers`` double-stream blocks keep image and text
streams with their own weights (AdaLayerNorm-Zero modulation, query/key RMS norms, one joint
attention over [text, image] with 3-axis rotary embeddings of ``axes_dims_rope``, GELU-tanh MLPs);
``num_single_layers`` single-stream blocks run on the concatenation with attention and MLP in
parallel; a final modulated LayerNorm and linear map back to ``in_channels``.

Variables ``{"params": ...}`` with regular names for sharding rules (attention heads: ``q``, ``k``,
``v`` columns and ``out`` rows; MLP columns: ``in`` columns and ``out`` rows)::

    transformer_blocks_<i>/{img_norm, txt_norm, img_attn/{q,k,v,out,q_norm,k_norm}, txt_attn/...,
                            img_mlp/{in,out}, txt_mlp/{in,out}}
    single_transformer_blocks_<i>/{norm, attn/{q,k,v,out,q_norm,k_norm}, mlp/{in,out}}

The single-stream block's ``proj_out`` (input: attention output and MLP activations concatenated)
is split by rows into ``attn/out`` (with the bias) and ``mlp/out``; :data:`LAYOUT` and
:func:`convert_state_dict` map everything to diffusers' names. Stored bfloat16/float16 tensors are
kept as they are.

Precision: ``dtype`` is the compute type of every linear layer and of attention; the residual
streams, LayerNorms, RMS norms, rotary embeddings, softmax and output are float32.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets import diffusers_folder, statedict
from jdiffsample.nets.t5 import RMSNorm

__all__ = ["FluxTransformer2DModel", "build", "example_inputs", "convert_state_dict", "load_folder", "LAYOUT",
           "pack_latents", "unpack_latents", "latent_image_ids", "text_ids", "rotary_embedding", "CLASS_NAMES"]

Dtype = Any
CLASS_NAMES = ("FluxTransformer2DModel",)
_EPS = 1e-6
_THETA = 10000.0  # FluxPosEmbed(theta=10000), as BFL's EmbedND


# ----------------------------------------------------------------------------------------------
# Latent packing and positions (diffusers' FluxPipeline._pack_latents & co., NHWC)


def pack_latents(latents: jax.Array) -> jax.Array:
    """``[B, h, w, C]`` -> ``[B, (h/2)(w/2), 4C]``: 2x2 patches, row-major, each patch's features
    ordered (channel, dy, dx) as the pipeline's ``_pack_latents`` orders them."""
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches: the latent height and width must be even, got {h} x {w}")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """The inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C]`` -> ``[B, h, w, C]``."""
    b, n, f = tokens.shape
    if n != (h // 2) * (w // 2) or h % 2 or w % 2 or f % 4:
        raise ValueError(f"{n} tokens of {f} features do not unpack to {h} x {w} latents")
    x = tokens.reshape(b, h // 2, w // 2, f // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, f // 4)


def latent_image_ids(h: int, w: int) -> np.ndarray:
    """float32 ``[(h/2)(w/2), 3]``: (0, row, col) of each packed token of ``h`` x ``w`` latents."""
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)


def text_ids(length: int) -> np.ndarray:
    """float32 ``[length, 3]`` zeros: the text tokens' positions."""
    return np.zeros((length, 3), np.float32)


def rotary_embedding(ids, axes_dims, theta: float = _THETA):
    """``(cos, sin)``, float32 ``[S, sum(axes_dims)]``, of the positions ``ids`` ``[S, n_axes]``: per
    axis of width d, angles ``pos / theta ** (2i / d)`` each repeated twice (interleaved pairs).
    Computed in float64 with NumPy when ``ids`` is a NumPy array, in float32 otherwise."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    ids = ids.astype(np.float64 if xp is np else jnp.float32)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (xp.arange(0, dim, 2, dtype=ids.dtype) / dim)
        angles = ids[:, axis, None] * freqs[None]
        cos.append(xp.repeat(xp.cos(angles), 2, axis=-1))
        sin.append(xp.repeat(xp.sin(angles), 2, axis=-1))
    return (xp.concatenate(cos, -1).astype(np.float32), xp.concatenate(sin, -1).astype(np.float32))


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding of ``x`` ``[B, S, H, D]`` (float32) on interleaved pairs."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


# ----------------------------------------------------------------------------------------------
# Blocks


def _layer_norm(x: jax.Array) -> jax.Array:
    """Affine-free LayerNorm over the last axis, eps 1e-6, in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + _EPS)


def _modulation(temb: jax.Array, chunks: int, dtype: Dtype, name: str) -> list[jax.Array]:
    """SiLU -> Linear(D, chunks * D), split into ``chunks`` float32 [B, 1, D] (AdaLayerNorm)."""
    out = nn.Dense(chunks * temb.shape[-1], dtype=dtype, name=name)(nn.silu(temb).astype(dtype))
    return jnp.split(out.astype(jnp.float32)[:, None, :], chunks, axis=-1)


class _Attention(nn.Module):
    """One stream's projections: ``q``/``k``/``v`` (with biases) and RMS norms of the queries and
    keys per head; ``out`` (``out_bias``), applied by the caller after the joint attention."""

    heads: int
    head_dim: int
    dtype: Dtype
    out_bias: bool = True

    def setup(self):
        inner = self.heads * self.head_dim
        self.q, self.k, self.v = (nn.Dense(inner, dtype=self.dtype) for _ in range(3))
        self.q_norm, self.k_norm = RMSNorm(_EPS), RMSNorm(_EPS)
        self.out = nn.Dense(inner, use_bias=self.out_bias, dtype=self.dtype)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = x.astype(self.dtype)
        split = lambda y: y.reshape(*y.shape[:2], self.heads, self.head_dim)  # noqa: E731
        return self.q_norm(split(self.q(x))), self.k_norm(split(self.k(x))), split(self.v(x))

    def project(self, a: jax.Array) -> jax.Array:
        return self.out(a.reshape(*a.shape[:2], -1).astype(self.dtype)).astype(jnp.float32)


def _attend(q, k, v, rope, dtype) -> jax.Array:
    """Softmax attention (float32 logits and softmax) after the rotary embedding of q and k."""
    cos, sin = rope
    q, k = (_rotate(y.astype(jnp.float32), cos, sin).astype(dtype) for y in (q, k))
    return jax.nn.dot_product_attention(q, k, v.astype(dtype))


class _MLP(nn.Module):
    """``out(gelu_tanh(in(x)))``; ``out`` without bias in the single-stream block (its bias is
    ``attn/out``'s)."""

    hidden: int
    dtype: Dtype
    out_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="in")(x.astype(self.dtype)), approximate=True)
        return nn.Dense(x.shape[-1], use_bias=self.out_bias, dtype=self.dtype, name="out")(h).astype(jnp.float32)


class _DoubleBlock(nn.Module):
    """``FluxTransformerBlock``: image and text streams, joint attention over [text, image]."""

    heads: int
    head_dim: int
    dtype: Dtype

    @nn.compact
    def __call__(self, img, txt, temb, rope):
        dim, length = img.shape[-1], txt.shape[1]
        streams = {}
        for name, x in (("txt", txt), ("img", img)):
            shift, scale, gate, shift2, scale2, gate2 = _modulation(temb, 6, self.dtype, f"{name}_norm")
            attn = _Attention(self.heads, self.head_dim, self.dtype, name=f"{name}_attn")
            streams[name] = (attn, attn.qkv(_layer_norm(x) * (1 + scale) + shift), (gate, shift2, scale2, gate2))
        q, k, v = (jnp.concatenate([streams["txt"][1][i], streams["img"][1][i]], axis=1) for i in range(3))
        a = _attend(q, k, v, rope, self.dtype)
        out = {}
        for name, x, part in (("txt", txt, a[:, :length]), ("img", img, a[:, length:])):
            attn, _, (gate, shift2, scale2, gate2) = streams[name]
            x = x + gate * attn.project(part)
            h = _layer_norm(x) * (1 + scale2) + shift2
            out[name] = x + gate2 * _MLP(4 * dim, self.dtype, name=f"{name}_mlp")(h)
        return out["img"], out["txt"]


class _SingleBlock(nn.Module):
    """``FluxSingleTransformerBlock`` on the concatenated stream: ``x + gate * (attention out +
    MLP out)`` of the modulated LayerNorm of ``x``."""

    heads: int
    head_dim: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x, temb, rope):
        shift, scale, gate = _modulation(temb, 3, self.dtype, "norm")
        h = _layer_norm(x) * (1 + scale) + shift
        attn = _Attention(self.heads, self.head_dim, self.dtype, name="attn")
        a = attn.project(_attend(*attn.qkv(h), rope, self.dtype))
        return x + gate * (a + _MLP(4 * x.shape[-1], self.dtype, out_bias=False, name="mlp")(h))


class _Embedder(nn.Module):
    """diffusers' ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``: linear_1, SiLU, linear_2."""

    dim: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x.astype(self.dtype)))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(h).astype(jnp.float32)


def _sinusoid(values: jax.Array, dim: int = 256) -> jax.Array:
    """diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos, sin]."""
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
    angles = values.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class _TimeTextEmbed(nn.Module):
    """``CombinedTimestep[Guidance]TextProjEmbeddings``: embeddings of the time (x1000), the guidance
    (x1000) and the pooled text, summed."""

    dim: int
    guidance_embeds: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, timestep, guidance, pooled):
        temb = _Embedder(self.dim, self.dtype, name="timestep_embedder")(_sinusoid(timestep * 1000.0))
        if self.guidance_embeds:
            temb = temb + _Embedder(self.dim, self.dtype, name="guidance_embedder")(_sinusoid(guidance * 1000.0))
        return temb + _Embedder(self.dim, self.dtype, name="text_embedder")(pooled)


class FluxTransformer2DModel(nn.Module):
    """diffusers ``FluxTransformer2DModel`` with its constructor arguments (see the module docstring).

    ``module.apply(variables, hidden_states, encoder_hidden_states, pooled_projections, timestep,
    img_ids, txt_ids, guidance=None)``: ``[B, N, in_channels]`` image tokens, ``[B, L,
    joint_attention_dim]`` text states, ``[B, pooled_projection_dim]``, ``[B]`` (or scalar) times in
    [0, 1], ``[N, 3]`` and ``[L, 3]`` ids, ``[B]`` (or scalar) guidance; returns float32
    ``[B, N, patch_size**2 * out_channels]``.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        dims = tuple(self.axes_dims_rope)
        if sum(dims) != self.attention_head_dim or any(d % 2 for d in dims):
            raise ValueError(f"FluxTransformer2DModel: axes_dims_rope {list(dims)} must be even and sum to "
                             f"attention_head_dim={self.attention_head_dim}")
        super().__post_init__()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        if (guidance is None) == self.guidance_embeds:
            raise ValueError("this FLUX transformer " + ("embeds the guidance scale (FLUX.1-dev): pass guidance"
                                                         if self.guidance_embeds else
                                                         "has no guidance embedding (schnell): pass guidance=None"))
        b, n = hidden_states.shape[:2]
        length = encoder_hidden_states.shape[1]
        if tuple(img_ids.shape) != (n, len(self.axes_dims_rope)) or tuple(txt_ids.shape) != (length, len(self.axes_dims_rope)):
            raise ValueError(f"img_ids must be [{n}, {len(self.axes_dims_rope)}] and txt_ids [{length}, "
                             f"{len(self.axes_dims_rope)}], got {tuple(img_ids.shape)} and {tuple(txt_ids.shape)}")
        dim, dtype = self.inner_dim, self.dtype
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        g = None if guidance is None else jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
        temb = _TimeTextEmbed(dim, self.guidance_embeds, dtype, name="time_text_embed")(t, g, pooled_projections)
        img = nn.Dense(dim, dtype=dtype, name="x_embedder")(hidden_states.astype(dtype)).astype(jnp.float32)
        txt = nn.Dense(dim, dtype=dtype, name="context_embedder")(encoder_hidden_states.astype(dtype)).astype(jnp.float32)
        ids = (np.concatenate([txt_ids, img_ids]) if isinstance(img_ids, np.ndarray) and isinstance(txt_ids, np.ndarray)
               else jnp.concatenate([jnp.asarray(txt_ids), jnp.asarray(img_ids)]))
        rope = tuple(jnp.asarray(r) for r in rotary_embedding(ids, self.axes_dims_rope))
        heads, head_dim = self.num_attention_heads, self.attention_head_dim
        for i in range(self.num_layers):
            img, txt = _DoubleBlock(heads, head_dim, dtype, name=f"transformer_blocks_{i}")(img, txt, temb, rope)
        x = jnp.concatenate([txt, img], axis=1)
        for i in range(self.num_single_layers):
            x = _SingleBlock(heads, head_dim, dtype, name=f"single_transformer_blocks_{i}")(x, temb, rope)
        scale, shift = _modulation(temb, 2, dtype, "norm_out")  # AdaLayerNormContinuous: scale first
        x = _layer_norm(x[:, length:]) * (1 + scale) + shift
        out = self.patch_size ** 2 * (self.out_channels or self.in_channels)
        return nn.Dense(out, dtype=dtype, name="proj_out")(x.astype(dtype)).astype(jnp.float32)


_FIELDS = tuple(f.name for f in dataclasses.fields(FluxTransformer2DModel) if f.name not in ("dtype", "parent", "name"))
_METADATA = ("_class_name", "_diffusers_version", "_name_or_path")


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> FluxTransformer2DModel:
    """The module for a diffusers ``transformer/config.json`` dict; ``ValueError`` for another class or
    an unknown entry."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unsupported FLUX transformer class {class_name!r}; supported: {', '.join(CLASS_NAMES)}")
    config = {k: v for k, v in kwargs.items() if k not in _METADATA}
    unknown = sorted(set(config) - set(_FIELDS))
    if unknown:
        raise ValueError(f"FluxTransformer2DModel: unsupported config entries {unknown}; supported: {list(_FIELDS)}")
    if "axes_dims_rope" in config:
        config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    return FluxTransformer2DModel(**config, dtype=dtype)


def example_inputs(module: FluxTransformer2DModel, h: int = 2, w: int = 2, length: int = 1) -> tuple:
    """``(hidden_states, encoder_hidden_states, pooled, timestep, img_ids, txt_ids, guidance)`` of
    batch 1 for ``module.init`` (``h`` x ``w`` latents, ``length`` text tokens)."""
    n = (h // 2) * (w // 2)
    return (jnp.zeros((1, n, module.in_channels)), jnp.zeros((1, length, module.joint_attention_dim)),
            jnp.zeros((1, module.pooled_projection_dim)), jnp.ones((1,)), latent_image_ids(h, w), text_ids(length),
            jnp.ones((1,)) if module.guidance_embeds else None)


# ----------------------------------------------------------------------------------------------
# Conversion


_LEAVES = {"kernel": "weight", "scale": "weight"}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)_(\d+)$")
_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "q_norm": "norm_q", "k_norm": "norm_k"}
_CONTEXT = {"q": "add_q_proj", "k": "add_k_proj", "v": "add_v_proj", "q_norm": "norm_added_q", "k_norm": "norm_added_k"}
_DOUBLE = {("img_norm",): "norm1.linear", ("txt_norm",): "norm1_context.linear",
           ("img_attn", "out"): "attn.to_out.0", ("txt_attn", "out"): "attn.to_add_out",
           ("img_mlp", "in"): "ff.net.0.proj", ("img_mlp", "out"): "ff.net.2",
           ("txt_mlp", "in"): "ff_context.net.0.proj", ("txt_mlp", "out"): "ff_context.net.2",
           **{("img_attn", k): f"attn.{v}" for k, v in _ATTENTION.items()},
           **{("txt_attn", k): f"attn.{v}" for k, v in _CONTEXT.items()}}
_SINGLE = {("norm",): "norm.linear", ("mlp", "in"): "proj_mlp", **{("attn", k): f"attn.{v}" for k, v in _ATTENTION.items()}}
#: The rows of a single-stream block's ``proj_out.weight`` ([dim, dim + mlp]) that feed the attention
#: output and the MLP activations, named apart before matching (``attn/out`` keeps ``proj_out.bias``).
_SPLIT = {("attn", "out", "kernel"): "proj_out.weight:attn", ("attn", "out", "bias"): "proj_out.bias",
          ("mlp", "out", "kernel"): "proj_out.weight:mlp"}


def _torch_key(path: tuple) -> str:
    """diffusers' name of a Flax parameter path (``transformer_blocks_0/txt_attn/q/kernel`` ->
    ``transformer_blocks.0.attn.add_q_proj.weight``)."""
    m = _BLOCK.match(path[0])
    if m is None:
        name = "norm_out.linear" if path[:-1] == ("norm_out",) else ".".join(path[:-1])
        return f"{name}.{_LEAVES.get(path[-1], path[-1])}"
    *rest, leaf = path[1:]
    prefix = f"{m[1]}.{m[2]}"
    if m[1] == "single_transformer_blocks" and tuple(path[1:]) in _SPLIT:
        return f"{prefix}.{_SPLIT[tuple(path[1:])]}"
    name = (_DOUBLE if m[1] == "transformer_blocks" else _SINGLE).get(tuple(rest))
    if name is None:
        return ".".join(path)  # not a FLUX parameter: reported as missing
    return f"{prefix}.{name}.{_LEAVES.get(leaf, leaf)}"


#: Flax paths <-> diffusers names (the single blocks' ``proj_out.weight`` split by rows).
LAYOUT = statedict.Layout(key=_torch_key)


def _split_proj_out(state_dict: Mapping[str, Any], dim: int) -> dict[str, Any]:
    """``single_transformer_blocks.N.proj_out.weight`` [dim, dim + mlp] -> its ``:attn`` (first dim
    input columns) and ``:mlp`` parts; other shapes are left for the matcher to report."""
    out = {}
    for key, value in state_dict.items():
        if (key.startswith("single_transformer_blocks.") and key.endswith(".proj_out.weight")
                and len(value.shape) == 2 and value.shape[0] == dim and value.shape[1] > dim):
            out[f"{key}:attn"], out[f"{key}:mlp"] = value[:, :dim], value[:, dim:]
        else:
            out[key] = value
    return out


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                       dtype=None) -> dict:
    """Flax ``{"params": ...}`` from a diffusers ``FluxTransformer2DModel`` state dict, strictly matched
    (one ``ValueError`` naming every missing or unexpected key and wrong shape). Floating tensors keep
    their stored dtype unless ``dtype`` is given; lazy arrays stay lazy (read when saved)."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    return statedict.match(abstract, _split_proj_out(state_dict, module.inner_dim), layout=LAYOUT,
                           what=f"{class_name} ({module.num_layers} + {module.num_single_layers} blocks, width "
                                f"{module.inner_dim})", dtype=dtype)


def load_folder(path, *, lazy: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, state_dict)`` of a diffusers FLUX transformer folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors`` or its sharded index); ``lazy``: tensors as
    :class:`jdiffsample.nets.lazy.LazyArray` s."""
    config = diffusers_folder.read_config(path)
    name = config.get("_class_name", CLASS_NAMES[0])
    if name not in CLASS_NAMES:
        raise ValueError(f"{path}: config.json is for {name!r}, not {CLASS_NAMES[0]}")
    read = diffusers_folder.lazy_weights if lazy else diffusers_folder.read_weights
    return config, read(path)

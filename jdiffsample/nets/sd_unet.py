"""Flax port of diffusers' ``UNet2DConditionModel``: the Stable Diffusion UNet (SD 1.x, SD 2.x,
SDXL), NHWC.

Written from the architecture; reproduces ``unet(sample, timestep, encoder_hidden_states,
added_cond_kwargs=...).sample`` of diffusers once the weights are converted::

    config, state_dict = load_folder("stable-diffusion-v1-5/unet")     # config.json + weights
    module = build("UNet2DConditionModel", config)                      # dtype=jnp.bfloat16 optional
    variables = convert_state_dict("UNet2DConditionModel", config, state_dict)
    out = module.apply(variables, x_nhwc, timesteps, context)           # SD 1.x / 2.x
    out = module.apply(variables, x_nhwc, timesteps, context,
                       dict(text_embeds=pooled, time_ids=time_ids))      # SDXL

``timesteps`` are the training step indices (a scalar or ``[B]``, fractional allowed),
``context`` the text encoder states ``[B, L, cross_attention_dim]``; the output (epsilon, v or
the sample, as the scheduler's ``prediction_type`` says) is float32 NHWC.

Architecture. Sinusoidal time embedding (``flip_sin_to_cos``, ``freq_shift``) -> ``time_embedding``
MLP; SDXL (``addition_embed_type="text_time"``) adds ``add_embedding`` of the pooled text
embedding concatenated with the sinusoidal embedding of each of the 6 ``time_ids``. ``conv_in``,
down blocks (``DownBlock2D``: ResNets; ``CrossAttnDownBlock2D``: a ResNet then a
``Transformer2DModel`` per layer; a stride-2 conv after every block but the last), the mid block
(ResNet, transformer, ResNet), up blocks (``layers_per_block + 1`` layers, each concatenating one
long skip before its ResNet; nearest x2 and a conv after every block but the last), group norm,
SiLU, ``conv_out``. A ``Transformer2DModel`` is a group norm (eps 1e-6), ``proj_in`` (1x1 conv, or
a linear layer with ``use_linear_projection``), ``transformer_layers_per_block`` basic blocks
(LayerNorm + self-attention, LayerNorm + cross-attention on ``context``, LayerNorm + GEGLU
feed-forward, each residual), ``proj_out`` and the residual. ``attention_head_dim`` is, as in
diffusers, the *number of heads* of each block (a legacy misnomer; ``num_attention_heads`` must
be unset).

Variables: ``{"params": ..., "skip": ...}``; ``params`` mirror the diffusers module tree
(``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight`` is the Flax path
``down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel``).

Skip-Tuning: ``variables["skip"]`` holds one float32 scalar per long skip, named
``f"{j:02d}_up_blocks.{i}.resnets.{k}"`` where ``j`` counts the skips in the order the up blocks
consume them (``j = 0`` is the deepest) and ``up_blocks.{i}.resnets.{k}`` is the ResNet whose input
concatenates ``[x, rho_j * skip]``. All 1.0 after conversion, which leaves the output
bit-identical.

Precision: ``dtype`` is the compute type of the convolutions, linear layers and attention; the
time embeddings compute in float32, group/layer norms and the attention softmax in float32, the
output is float32. On GPUs, float32 matmuls default to TF32; use
``jax.default_matmul_precision("highest")`` for a float32-exact match.
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

from jdiffsample.nets.formats import diffusers_folder, statedict
from jdiffsample.nets.diffusers_blocks import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    group_norm,
)

__all__ = ["UNet2DConditionModel", "Transformer2DModel", "BasicTransformerBlock", "timestep_embedding",
           "build", "example_inputs", "convert_state_dict", "load_folder", "skip_name", "LAYOUT", "CLASS_NAMES"]

Dtype = Any
CLASS_NAMES = ("UNet2DConditionModel",)
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn", None)
_TRANSFORMER_EPS = 1e-6  # Transformer2DModel's group norm
_LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's layer norms


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' sinusoidal embedding: frequencies ``exp(-ln(max_period) i / (dim/2 - freq_shift))``,
    ``[sin, cos]`` (``[cos, sin]`` when ``flip_sin_to_cos``), a zero column for odd ``dim``;
    float32 ``[B, dim]`` (the operations in float32 in the original's order)."""
    half = dim // 2
    exponent = jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(max_period))
    freqs = jnp.exp(exponent / jnp.float32(half - freq_shift))
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class _TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: ``linear_2(silu(linear_1(x)))``, float32."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, name="linear_1")(x.astype(jnp.float32))
        return nn.Dense(self.features, name="linear_2")(nn.silu(x))


def _layer_norm(x: jax.Array, name: str) -> jax.Array:
    """``torch.nn.LayerNorm`` (affine, eps 1e-5) in float32, returned in ``x.dtype``."""
    norm = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=jnp.float32, use_fast_variance=False, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class _GEGLU(nn.Module):
    """diffusers ``GEGLU``: ``proj`` to twice ``features``, then ``h * gelu(gate)`` (exact GELU)."""

    features: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class _FeedForward(nn.Module):
    """diffusers ``FeedForward`` with ``activation_fn="geglu"``, ``mult=4``: ``net.2(net.0(x))``."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (``norm_type="layer_norm"``): self-attention,
    cross-attention on ``context``, GEGLU feed-forward (``4 * dim`` hidden), each after a LayerNorm
    and added to its input. Tokens ``[B, L, dim]``."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = dict(heads=self.heads, dim_head=self.dim_head, dtype=self.dtype)
        x = x + Attention(**attn, name="attn1")(_layer_norm(x, "norm1"))
        x = x + Attention(**attn, name="attn2")(_layer_norm(x, "norm2"), context)
        return x + _FeedForward(self.dtype, name="ff")(_layer_norm(x, "norm3"))


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` on an NHWC map (continuous input): group norm, ``proj_in``,
    ``num_layers`` :class:`BasicTransformerBlock`, ``proj_out``, plus the input. The projections are
    1x1 convs, or linear layers on the tokens when ``use_linear_projection``."""

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, channels = x.shape
        if channels % self.heads:
            raise ValueError(f"Transformer2DModel: {channels} channels are not divisible into {self.heads} heads")
        dim_head = channels // self.heads
        h = group_norm(x, self.groups, _TRANSFORMER_EPS, "norm")
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, channels))
        else:
            h = conv2d(channels, "proj_in", self.dtype, kernel=1)(h).reshape(b, hgt * wid, channels)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, dim_head, self.dtype, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(b, hgt, wid, channels)
        else:
            h = conv2d(channels, "proj_out", self.dtype, kernel=1)(h.reshape(b, hgt, wid, channels))
        return h + x


@dataclasses.dataclass(frozen=True)
class _Block:
    """One down, mid or up block, resolved from the config."""

    kind: str  # a name from _DOWN, _MID or _UP
    out_channels: int
    num_layers: int  # ResNets (the mid block: transformers, with one more ResNet)
    heads: int
    transformer_layers: tuple[int, ...]  # per layer (empty without attention)
    resample: bool  # downsample after a down block, upsample after an up block

    @property
    def attention(self) -> bool:
        return self.kind.startswith(("CrossAttn", "UNetMidBlock2DCrossAttn"))


def skip_name(j: int, block: int, layer: int) -> str:
    """The Skip-Tuning scale of the ``j``-th skip consumed (deepest first), by ``up_blocks.{block}.resnets.{layer}``."""
    return f"{j:02d}_up_blocks.{block}.resnets.{layer}"


class _Stage(nn.Module):
    """What the UNet's down, mid and up blocks share: their layout, ResNet settings and transformers."""

    block: _Block
    resnet: Mapping[str, Any]
    groups: int
    use_linear_projection: bool
    dtype: Dtype

    def _resnet(self, i, x, temb):
        return ResnetBlock2D(self.block.out_channels, **self.resnet, name=f"resnets_{i}")(x, temb)

    def _transformer(self, i, x, context):
        return Transformer2DModel(self.block.heads, self.block.transformer_layers[i], self.groups,
                                  self.use_linear_projection, self.dtype, name=f"attentions_{i}")(x, context)


class _DownBlock(_Stage):
    """``DownBlock2D`` / ``CrossAttnDownBlock2D``: returns the output and the skips it leaves."""

    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        b, skips = self.block, []
        for i in range(b.num_layers):
            x = self._resnet(i, x, temb)
            if b.attention:
                x = self._transformer(i, x, context)
            skips.append(x)
        if b.resample:
            x = Downsample2D(b.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class _MidBlock(_Stage):
    """``UNetMidBlock2DCrossAttn``: ResNet, then (transformer, ResNet) per layer."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self._resnet(0, x, temb)
        for i in range(self.block.num_layers):
            x = self._resnet(i + 1, self._transformer(i, x, context), temb)
        return x


class _UpBlock(_Stage):
    """``UpBlock2D`` / ``CrossAttnUpBlock2D``: each layer concatenates ``[x, scale * skip]`` (the
    last skip first), then a ResNet (and a transformer); upsampling to ``output_size`` at the end."""

    @nn.compact
    def __call__(self, x, temb, context, skips, scales, output_size):
        b = self.block
        for i, (skip, scale) in enumerate(zip(skips, scales)):
            x = self._resnet(i, jnp.concatenate([x, (scale * skip).astype(x.dtype)], axis=-1), temb)
            if b.attention:
                x = self._transformer(i, x, context)
        if b.resample:
            x = Upsample2D(b.out_channels, dtype=self.dtype, name="upsamplers_0")(x, output_size)
        return x


def _per_block(value, n: int, key: str) -> tuple:
    """An int (or None) for every block, or a list of ``n`` values, as a tuple of ``n``."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(f"UNet2DConditionModel: {key} {list(value)} must have one entry per block ({n})")
        return tuple(value)
    return (value,) * n


def _per_layer(value, n: int, key: str) -> tuple[int, ...]:
    """A block's transformer depth: an int for all of its ``n`` layers, or one per layer."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) < n or not all(isinstance(v, int) and v >= 1 for v in values[:n]):
        raise ValueError(f"UNet2DConditionModel: {key} entry {value!r} must be a positive int or {n} of them")
    return values[:n]


# Config entries that must keep the value given here (what this port implements), and what is allowed.
_FIXED = {
    "num_attention_heads": (None, "null (diffusers reads the head counts from attention_head_dim)"),
    "act_fn": (("silu", "swish"), "'silu'"),
    "class_embed_type": (None, "null"),
    "num_class_embeds": (None, "null"),
    "addition_embed_type": ((None, "text_time"), "null or 'text_time'"),
    "encoder_hid_dim": (None, "null"),
    "encoder_hid_dim_type": (None, "null"),
    "time_embedding_type": ("positional", "'positional'"),
    "time_embedding_act_fn": (None, "null"),
    "timestep_post_act": (None, "null"),
    "time_cond_proj_dim": (None, "null"),
    "attention_type": ("default", "'default'"),
    "dual_cross_attention": (False, "false"),
    "mid_block_only_cross_attention": ((None, False), "null or false"),
    "class_embeddings_concat": (False, "false"),
    "cross_attention_norm": (None, "null"),
    "resnet_skip_time_act": (False, "false"),
    "resnet_time_scale_shift": (("default", "scale_shift"), "'default' or 'scale_shift'"),
    "downsample_padding": ((0, 1), "0 or 1"),
    "mid_block_type": (_MID, "'UNetMidBlock2DCrossAttn' or null"),
}


def _resolve(m: UNet2DConditionModel) -> tuple[tuple[_Block, ...], _Block | None, tuple[_Block, ...]]:
    """The blocks of a UNet config: (down, mid or None, up); ``ValueError`` for anything this port
    does not implement."""
    for key, (allowed, text) in _FIXED.items():
        value = getattr(m, key)
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise ValueError(f"UNet2DConditionModel: {key}={value!r} is not supported; allowed: {text}")
    n = len(m.block_out_channels)
    for key, allowed in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        types = tuple(getattr(m, key))
        bad = sorted(set(types) - set(allowed))
        if bad or len(types) != n:
            raise ValueError(f"UNet2DConditionModel: {key} {list(types)} is not supported; one of "
                             f"{', '.join(allowed)} per block_out_channels entry ({n})")
    cross = _per_block(m.cross_attention_dim, n, "cross_attention_dim")
    if len(set(cross)) != 1:
        raise ValueError(f"UNet2DConditionModel: cross_attention_dim {list(cross)} is not supported; allowed: "
                         f"one value for all blocks")
    if any(_per_block(m.only_cross_attention, n, "only_cross_attention")):
        raise ValueError("UNet2DConditionModel: only_cross_attention is not supported; allowed: false")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if getattr(m, key) % 2 != 1:
            raise ValueError(f"UNet2DConditionModel: {key}={getattr(m, key)} is not supported; allowed: odd")
    if m.addition_embed_type == "text_time" and not (
            m.addition_time_embed_dim and m.projection_class_embeddings_input_dim):
        raise ValueError("UNet2DConditionModel: addition_embed_type 'text_time' needs addition_time_embed_dim "
                         "and projection_class_embeddings_input_dim")
    heads = _per_block(m.attention_head_dim, n, "attention_head_dim")
    layers = _per_block(m.layers_per_block, n, "layers_per_block")
    depth = m.transformer_layers_per_block
    nested = isinstance(depth, (tuple, list)) and any(isinstance(d, (tuple, list)) for d in depth)
    if nested and m.reverse_transformer_layers_per_block is None:
        raise ValueError("UNet2DConditionModel: transformer_layers_per_block per layer needs "
                         "reverse_transformer_layers_per_block")
    depth = _per_block(depth, n, "transformer_layers_per_block")
    up_depth = (tuple(reversed(depth)) if m.reverse_transformer_layers_per_block is None
                else _per_block(m.reverse_transformer_layers_per_block, n, "reverse_transformer_layers_per_block"))
    channels = tuple(m.block_out_channels)
    down = tuple(_Block(kind, channels[i], layers[i], heads[i],
                        _per_layer(depth[i], layers[i], "transformer_layers_per_block")
                        if kind == _DOWN[0] else (), i < n - 1)
                 for i, kind in enumerate(m.down_block_types))
    mid = None
    if m.mid_block_type is not None:
        mid = _Block(m.mid_block_type, channels[-1], 1, heads[-1],
                     _per_layer(depth[-1], 1, "transformer_layers_per_block"), False)
    rev_heads, rev_layers = heads[::-1], layers[::-1]
    up = tuple(_Block(kind, channels[::-1][i], rev_layers[i] + 1, rev_heads[i],
                      _per_layer(up_depth[i], rev_layers[i] + 1, "reverse_transformer_layers_per_block")
                      if kind == _UP[0] else (), i < n - 1)
               for i, kind in enumerate(m.up_block_types))
    return down, mid, up


class UNet2DConditionModel(nn.Module):
    """diffusers ``UNet2DConditionModel`` with its ``config.json`` entries as attributes (defaults as
    in diffusers), NHWC; see the module docstring.

    ``__call__(x, timesteps, context, added_cond=None)``: ``x`` ``[B, H, W, in_channels]``,
    ``timesteps`` a scalar or ``[B]``, ``context`` ``[B, L, cross_attention_dim]``, ``added_cond``
    ``{"text_embeds": [B, D], "time_ids": [B, T]}`` for ``addition_embed_type="text_time"``
    (SDXL: D = 1280, T = 6). Returns float32 ``[B, H, W, out_channels]``.

    ``sample_size``, ``dropout``, ``upcast_attention`` (the softmax is float32 anyway),
    ``resnet_out_scale_factor`` (unused by these block types in diffusers too) and
    ``addition_embed_type_num_heads`` are recorded and have no effect.
    """

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: Any = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        _resolve(self)
        super().__post_init__()

    @property
    def blocks(self) -> tuple[tuple[_Block, ...], _Block | None, tuple[_Block, ...]]:
        """(down blocks, mid block or None, up blocks), resolved from the config."""
        return _resolve(self)


    @property
    def skip_names(self) -> tuple[str, ...]:
        """Skip-Tuning variable names, in the order the up blocks consume the skips."""
        names = [(i, k) for i, b in enumerate(self.blocks[2]) for k in range(b.num_layers)]
        return tuple(skip_name(j, i, k) for j, (i, k) in enumerate(names))

    def _embedding(self, timesteps, batch, added_cond):
        time_dim = self.time_embedding_dim or 4 * self.block_out_channels[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        emb = _TimestepEmbedding(time_dim, name="time_embedding")(t_emb)
        if self.addition_embed_type == "text_time":
            if not isinstance(added_cond, Mapping) or not {"text_embeds", "time_ids"} <= set(added_cond):
                raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs added_cond="
                                 "dict(text_embeds=[B, D], time_ids=[B, T])")
            time_ids = jnp.asarray(added_cond["time_ids"])
            text_embeds = jnp.asarray(added_cond["text_embeds"], jnp.float32)
            time_embeds = timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                             self.flip_sin_to_cos, self.freq_shift)
            add = jnp.concatenate([text_embeds, time_embeds.reshape(text_embeds.shape[0], -1)], axis=-1)
            if add.shape[-1] != self.projection_class_embeddings_input_dim:
                raise ValueError(f"added_cond gives {add.shape[-1]} features (text_embeds + time_ids embedded); the "
                                 f"UNet expects projection_class_embeddings_input_dim="
                                 f"{self.projection_class_embeddings_input_dim}")
            emb = emb + _TimestepEmbedding(time_dim, name="add_embedding")(add)
        elif added_cond is not None:
            raise ValueError("added_cond is only for UNets with addition_embed_type 'text_time' (SDXL)")
        return emb

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array,
                 added_cond: Mapping[str, jax.Array] | None = None) -> jax.Array:
        down, mid, up = self.blocks
        emb = self._embedding(timesteps, x.shape[0], added_cond)
        context = jnp.asarray(context).astype(self.dtype)
        resnet = dict(groups=self.norm_num_groups, eps=self.norm_eps, time_embedding_norm=self.resnet_time_scale_shift,
                      dtype=self.dtype)
        common = dict(groups=self.norm_num_groups, use_linear_projection=self.use_linear_projection, dtype=self.dtype)
        x = x.astype(jnp.float32)
        if self.center_input_sample:
            x = 2 * x - 1.0
        h = conv2d(self.block_out_channels[0], "conv_in", self.dtype, kernel=self.conv_in_kernel)(x.astype(self.dtype))
        skips = [h]
        for i, block in enumerate(down):
            h, out = _DownBlock(block, resnet, downsample_padding=self.downsample_padding,
                                name=f"down_blocks_{i}", **common)(h, emb, context)
            skips += out
        if mid is not None:
            h = _MidBlock(mid, dict(resnet, output_scale_factor=self.mid_block_scale_factor), name="mid_block",
                          **common)(h, emb, context)
        names = iter(self.skip_names)
        for i, block in enumerate(up):
            mine, skips = skips[-block.num_layers:][::-1], skips[:-block.num_layers]
            scales = [self.variable("skip", next(names), lambda: jnp.ones((), jnp.float32)).value for _ in mine]
            size = skips[-1].shape[1:3] if block.resample else None
            h = _UpBlock(block, resnet, name=f"up_blocks_{i}", **common)(h, emb, context, mine, scales, size)
        h = nn.silu(group_norm(h.astype(jnp.float32), self.norm_num_groups, self.norm_eps, "conv_norm_out"))
        h = conv2d(self.out_channels, "conv_out", self.dtype, kernel=self.conv_out_kernel)(h.astype(self.dtype))
        return h.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Building and converting

_INDEX = re.compile(r"_(\d+)$")
_KEEP = ("linear_1", "linear_2")  # TimestepEmbedding's layer names end in a digit


def _torch_key(path: tuple) -> str:
    """Flax path -> diffusers name: a trailing ``_N`` is an index (``resnets_0`` -> ``resnets.0``)
    except in ``linear_1``/``linear_2``."""
    parts = tuple(p if p in _KEEP else _INDEX.sub(r".\1", p) for p in path[:-1])
    return statedict.torch_key((*parts, path[-1]))


#: The :class:`statedict.Layout` of :class:`UNet2DConditionModel`.
LAYOUT = statedict.Layout(key=_torch_key)

# config.json entries that describe the file, not the network.
_METADATA_PREFIX = "_"


def _hashable(value: Any) -> Any:
    """JSON lists -> tuples (recursively), so that the module stays hashable."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> UNet2DConditionModel:
    """The module for a diffusers ``unet/config.json`` dict (entries starting with ``_`` are
    ignored); ``ValueError`` for anything unsupported."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unsupported UNet class {class_name!r}; supported: {', '.join(CLASS_NAMES)}")
    fields = {f.name for f in dataclasses.fields(UNet2DConditionModel)} - {"dtype", "parent", "name"}
    config = {k: v for k, v in kwargs.items() if not k.startswith(_METADATA_PREFIX)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"UNet2DConditionModel: unsupported config entries {unknown}")
    return UNet2DConditionModel(**{k: _hashable(v) for k, v in config.items()}, dtype=dtype)


def example_inputs(module: UNet2DConditionModel) -> tuple:
    """``(x, timesteps, context, added_cond)`` for ``module.init``: the smallest latent the
    resampling allows, one context token."""
    size = 2 ** (len(module.block_out_channels) - 1)
    cross = module.cross_attention_dim
    cross = cross[0] if isinstance(cross, tuple) else cross
    added = None
    if module.addition_embed_type == "text_time":
        n_time = 6
        text = module.projection_class_embeddings_input_dim - n_time * module.addition_time_embed_dim
        added = dict(text_embeds=jnp.zeros((1, text), jnp.float32), time_ids=jnp.zeros((1, n_time), jnp.float32))
    return (jnp.zeros((1, size, size, module.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, cross), jnp.float32), added)


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
    """Flax ``{"params": ..., "skip": ...}`` (float32 NumPy, skip scales 1.0) from a diffusers
    ``UNet2DConditionModel`` state dict. Strict (:func:`statedict.match`): missing and unexpected
    keys and wrong shapes raise one ``ValueError`` naming them."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    return statedict.match(abstract, state_dict, layout=LAYOUT, what=class_name)


def load_folder(path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, state_dict)`` of a diffusers ``UNet2DConditionModel`` folder (a pipeline's ``unet/``)."""
    config = diffusers_folder.read_config(path)
    name = config.get("_class_name", "UNet2DConditionModel")
    if name not in CLASS_NAMES:
        raise ValueError(f"{path}: config.json is for {name!r}, not UNet2DConditionModel")
    return config, diffusers_folder.read_weights(path)

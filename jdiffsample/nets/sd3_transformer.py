"""Flax port of diffusers' ``SD3Transformer2DModel``: the MMDiT of Stable Diffusion 3 and 3.5
(Esser et al. 2024), NHWC.

Written from the architecture; with weights converted by :func:`convert_state_dict` it reproduces
``transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep, skip_layers=...)``::

    config, state_dict = load_folder("stable-diffusion-3.5-medium/transformer")
    module = build("SD3Transformer2DModel", config)              # dtype=jnp.bfloat16 optional
    variables = convert_state_dict("SD3Transformer2DModel", config, state_dict)
    v = module.apply(variables, x, timesteps, context, pooled)   # x [B, H/8, W/8, 16] -> velocity

Inputs: ``x`` NHWC latents (height and width multiples of ``patch_size``, at most
``pos_embed_max_size`` patches each); ``timesteps`` ``[B]`` (or a scalar) in 0..1000, the shifted flow
time times 1000 as the pipeline passes it; ``context`` ``[B, L, joint_attention_dim]`` (CLIP-L/G +
T5 tokens); ``pooled`` ``[B, pooled_projection_dim]``; ``skip_layers`` (static, a tuple of block
indices) bypasses those blocks, as diffusers' ``skip_layers`` (SD3.5's skip-layer guidance).
Output float32, NHWC, ``out_channels``.

Architecture. Patch embedding (a ``patch_size``-strided conv) plus the fixed 2-D sin-cos table of a
``pos_embed_max_size`` square grid, cropped at its centre to the latent's patches (:func:`pos_embed_table`;
the table is a parameter holding the file's buffer, which the converter checks). Conditioning
``temb`` = MLP(sinusoidal(timestep, 256)) + MLP(pooled). ``context_embedder`` (linear) maps the text
tokens to the width. ``num_layers`` joint blocks: each stream (image, text) has its own adaLN-Zero
modulation, attention projections and MLP (GELU, tanh approximation, 4x); one softmax attention over
the image tokens followed by the text tokens; SD3.5 adds RMS norms of queries and keys per head
(``qk_norm="rms_norm"``) and, in ``dual_attention_layers`` (MMDiT-X), a second image-only
self-attention with its own modulation. The last block is ``context_pre_only``: its text stream only
supplies keys and values (its modulation is ``AdaLayerNormContinuous``, no text MLP or output).
Output: ``AdaLayerNormContinuous`` (scale, then shift), a linear layer, unpatchify.

Parameter names are regular: per block ``attn/{q,k,v,out}`` (image stream),
``attn/{context_q,context_k,context_v,context_out}`` (text stream), ``attn/{norm_q,norm_k,context_norm_q,
context_norm_k}``, ``attn2/{q,k,v,out,norm_q,norm_k}``, ``mlp/{in,out}`` and ``context_mlp/{in,out}``; kernels
``[in, out]`` with the output columns of ``q``/``k``/``v`` grouped by head (``heads x head_dim``).
:data:`LAYOUT` maps them to diffusers' names (``to_q``, ``add_q_proj``, ``to_add_out``, ``norm_added_q``,
``ff.net.0.proj``, ``ff.net.2``, ...). The last block's text queries are never used, so the port has
no ``context_q``/``context_norm_q`` there; the converter checks that the file has them and drops them.

Precision: ``dtype`` is the compute type of every linear layer, the patch embedding and attention;
the residual streams, LayerNorms, RMS norms, the attention logits and softmax, the timestep/pooled
embedders and the output are float32. On GPUs, float32 matmuls default to TF32; use
``jax.default_matmul_precision("highest")`` for a float32-exact match.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets import dit, sd_unet
from jdiffsample.nets.layers import attention

from jdiffsample.nets.formats import diffusers_folder, statedict

__all__ = ["SD3Transformer2DModel", "JointTransformerBlock", "pos_embed_table", "build", "example_inputs",
           "convert_state_dict", "load_folder", "LAYOUT", "CLASS_NAMES", "QK_NORMS"]

Dtype = Any
CLASS_NAMES = ("SD3Transformer2DModel",)
QK_NORMS = (None, "rms_norm")
_EPS = 1e-6
_TIME_CHANNELS = 256


def pos_embed_table(dim: int, grid: int, base_size: int) -> np.ndarray:
    """diffusers' ``get_2d_sincos_pos_embed(dim, grid, base_size=base_size)``: float32 ``[grid * grid,
    dim]``, tokens row-major, positions ``i * base_size / grid`` (:func:`jdiffsample.nets.dit.pos_embed_table`)."""
    if dim % 4:
        raise ValueError(f"the sin-cos position table needs a width divisible by 4, got {dim}")
    return dit.pos_embed_table(dim, grid, base_size / grid)


_layer_norm = dit._layer_norm  # affine-free LayerNorm, eps 1e-6, float32 (as DiT's)


class _Modulation(nn.Module):
    """The adaptive norms' ``linear(silu(temb))`` split into ``chunks`` modulations ``[B, 1, width]``."""

    chunks: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        out = nn.Dense(self.chunks * self.width, dtype=self.dtype, name="linear")(nn.silu(temb).astype(self.dtype))
        return jnp.split(out[:, None, :], self.chunks, axis=-1)


class RMSNorm(nn.Module):
    """diffusers ``RMSNorm`` with a weight (``scale``) over the last axis, in float32."""

    eps: float = _EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * scale


class _Attention(nn.Module):
    """diffusers ``Attention`` with ``JointAttnProcessor2_0``: softmax attention of the image stream's
    queries (and, with ``context``, the text stream's, unless ``context_pre_only``) over the image
    tokens followed by the text tokens. Returns ``(image_out, text_out or None)`` in ``dtype``."""

    heads: int
    head_dim: int
    qk_norm: str | None
    context_pre_only: bool = False
    dtype: Dtype = jnp.float32

    def _project(self, x: jax.Array, prefix: str, names=("q", "k", "v")) -> list[jax.Array]:
        """Projections of one stream as ``[B, heads, tokens, head_dim]``, queries and keys normed."""
        out = []
        for name in names:
            y = nn.Dense(self.heads * self.head_dim, dtype=self.dtype, name=prefix + name)(x)
            y = y.reshape(*y.shape[:2], self.heads, self.head_dim)
            if self.qk_norm is not None and name != "v":
                y = RMSNorm(name=f"{prefix}norm_{name}")(y).astype(self.dtype)
            out.append(y.transpose(0, 2, 1, 3))
        return out

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        q, k, v = self._project(x.astype(self.dtype), "")
        n_image = x.shape[1]
        if context is not None:
            names = ("k", "v") if self.context_pre_only else ("q", "k", "v")
            text = self._project(context.astype(self.dtype), "context_", names)
            k = jnp.concatenate([k, text[-2]], axis=2)
            v = jnp.concatenate([v, text[-1]], axis=2)
            if not self.context_pre_only:
                q = jnp.concatenate([q, text[0]], axis=2)
        a = attention(q * self.head_dim ** -0.5, k, v)
        width = self.heads * self.head_dim
        image = nn.Dense(width, dtype=self.dtype, name="out")(a[:, :n_image])
        if context is None or self.context_pre_only:
            return image, None
        return image, nn.Dense(width, dtype=self.dtype, name="context_out")(a[:, n_image:])


class _FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: ``out(gelu_tanh(in(x)))``, 4x wide."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(4 * x.shape[-1], dtype=self.dtype, name="in")(x.astype(self.dtype))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="out")(nn.gelu(h, approximate=True))


class JointTransformerBlock(nn.Module):
    """diffusers ``JointTransformerBlock`` on the float32 streams ``x`` (image) and ``c`` (text),
    conditioned on ``temb``; returns ``(c, x)`` updated (``c`` unchanged when ``context_pre_only``)."""

    heads: int
    head_dim: int
    context_pre_only: bool = False
    qk_norm: str | None = None
    dual_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
        d, dtype = x.shape[-1], self.dtype
        mods = _Modulation(9 if self.dual_attention else 6, d, dtype, name="norm1")(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        nx = _layer_norm(x)
        if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
            c_scale, c_shift = _Modulation(2, d, dtype, name="norm1_context")(temb)
        else:
            c_shift, c_scale, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _Modulation(
                6, d, dtype, name="norm1_context")(temb)
        nc = _layer_norm(c) * (1 + c_scale) + c_shift
        attn = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm, dtype=dtype)
        image, text = _Attention(**attn, context_pre_only=self.context_pre_only, name="attn")(
            nx * (1 + scale_msa) + shift_msa, nc)
        x = x + gate_msa * image
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2 * _Attention(**attn, name="attn2")(nx * (1 + scale_msa2) + shift_msa2)[0]
        x = x + gate_mlp * _FeedForward(dtype, name="mlp")(_layer_norm(x) * (1 + scale_mlp) + shift_mlp)
        if self.context_pre_only:
            return c, x
        c = c + c_gate_msa * text
        c = c + c_gate_mlp * _FeedForward(dtype, name="context_mlp")(_layer_norm(c) * (1 + c_scale_mlp) + c_shift_mlp)
        return c, x


#: ``linear_2(silu(linear_1(x)))`` in float32: diffusers' ``TimestepEmbedding`` and, with the same layers,
#: ``PixArtAlphaTextProjection(act_fn="silu")``.
_MLP = sd_unet._TimestepEmbedding


class _TimeTextEmbedding(nn.Module):
    """diffusers ``CombinedTimestepTextProjEmbeddings``: MLP(sinusoidal(t, 256), cos first) + MLP(pooled)."""

    features: int

    @nn.compact
    def __call__(self, timesteps: jax.Array, pooled: jax.Array) -> jax.Array:
        t = _MLP(self.features, name="timestep_embedder")(sd_unet.timestep_embedding(timesteps, _TIME_CHANNELS, True, 0))
        return t + _MLP(self.features, name="text_embedder")(pooled)


class _PatchEmbed(nn.Module):
    """diffusers ``PatchEmbed`` with ``pos_embed_max_size``: strided conv ``proj``, row-major tokens,
    plus the position table cropped at its centre to the latent's patch grid (float32)."""

    width: int
    patch_size: int
    max_size: int
    base_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, m = self.patch_size, self.max_size
        table = self.param("pos_embed", lambda key: jnp.asarray(pos_embed_table(self.width, m, self.base_size))[None])
        h = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(
            x.astype(self.dtype))
        b, rows, cols, _ = h.shape
        top, left = (m - rows) // 2, (m - cols) // 2
        pos = table.reshape(m, m, self.width)[top:top + rows, left:left + cols].reshape(1, rows * cols, self.width)
        return h.reshape(b, rows * cols, self.width).astype(jnp.float32) + pos.astype(jnp.float32)


class SD3Transformer2DModel(nn.Module):
    """diffusers ``SD3Transformer2DModel`` with its constructor arguments (defaults as diffusers'):
    ``module.apply(variables, x, timesteps, context, pooled, skip_layers=())`` (see the module docstring)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check(self)
        super().__post_init__()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def check_size(self, height: int, width: int) -> None:
        """``ValueError`` unless a latent of ``height`` x ``width`` fits the patching and the position grid."""
        p, m = self.patch_size, self.pos_embed_max_size
        if height % p or width % p or height < p or width < p:
            raise ValueError(f"the latent's height and width must be positive multiples of the patch size {p}, "
                             f"got {height} x {width}")
        if height // p > m or width // p > m:
            raise ValueError(f"the latent is {height // p} x {width // p} patches; the position grid allows at "
                             f"most {m} x {m} (pos_embed_max_size)")

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array, pooled: jax.Array,
                 skip_layers: tuple[int, ...] = ()) -> jax.Array:
        b, height, width, _ = x.shape
        self.check_size(height, width)
        bad = [i for i in skip_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)]
        if bad:
            raise ValueError(f"skip_layers must be block indices in [0, {self.num_layers - 1}], got {list(skip_layers)}")
        d, p = self.inner_dim, self.patch_size
        h = _PatchEmbed(d, p, self.pos_embed_max_size, self.sample_size // p, self.dtype, name="pos_embed")(x)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        temb = _TimeTextEmbedding(d, name="time_text_embed")(t, pooled)
        c = nn.Dense(self.caption_projection_dim, dtype=self.dtype, name="context_embedder")(
            context.astype(self.dtype)).astype(jnp.float32)
        for i in range(self.num_layers):
            if i in skip_layers:
                continue
            c, h = JointTransformerBlock(self.num_attention_heads, self.attention_head_dim,
                                         context_pre_only=i == self.num_layers - 1, qk_norm=self.qk_norm,
                                         dual_attention=i in self.dual_attention_layers, dtype=self.dtype,
                                         name=f"transformer_blocks_{i}")(h, c, temb)
        scale, shift = _Modulation(2, d, self.dtype, name="norm_out")(temb)
        h = _layer_norm(h) * (1 + scale) + shift
        out = nn.Dense(p * p * self.output_channels, dtype=self.dtype, name="proj_out")(h.astype(self.dtype))
        rows, cols = height // p, width // p
        out = out.astype(jnp.float32).reshape(b, rows, cols, p, p, self.output_channels)
        return out.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, self.output_channels)


def _check(m: SD3Transformer2DModel) -> None:
    """One-line ``ValueError`` for constructor arguments this port does not take."""
    for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                 "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                 "pos_embed_max_size"):
        value = getattr(m, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SD3Transformer2DModel: {name} must be a positive int, got {value!r}")
    if m.qk_norm not in QK_NORMS:
        raise ValueError(f"SD3Transformer2DModel: qk_norm={m.qk_norm!r} is not supported; allowed: None, 'rms_norm'")
    if m.caption_projection_dim != m.inner_dim:
        raise ValueError(f"SD3Transformer2DModel: caption_projection_dim={m.caption_projection_dim} must equal "
                         f"num_attention_heads * attention_head_dim = {m.inner_dim} (the joint blocks' width)")
    if m.inner_dim % 4:
        raise ValueError(f"SD3Transformer2DModel: the width {m.inner_dim} must be divisible by 4 (sin-cos positions)")
    bad = [i for i in m.dual_attention_layers if isinstance(i, bool) or not isinstance(i, int)
           or not 0 <= i < m.num_layers]
    if bad:
        raise ValueError(f"SD3Transformer2DModel: dual_attention_layers must be block indices in "
                         f"[0, {m.num_layers - 1}], got {list(m.dual_attention_layers)}")


# ----------------------------------------------------------------------------------------------
# Building and converting

_FIELDS = tuple(f.name for f in dataclasses.fields(SD3Transformer2DModel) if f.name not in ("dtype", "parent", "name"))
_ATTENTION_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0", "context_q": "add_q_proj",
                    "context_k": "add_k_proj", "context_v": "add_v_proj", "context_out": "to_add_out",
                    "norm_q": "norm_q", "norm_k": "norm_k", "context_norm_q": "norm_added_q",
                    "context_norm_k": "norm_added_k"}
_MLP_NAMES = {"mlp": "ff", "context_mlp": "ff_context"}
_MLP_LAYERS = {"in": "net.0.proj", "out": "net.2"}
_BLOCK = re.compile(r"^transformer_blocks_(\d+)$")


def _torch_key(path: tuple) -> str:
    """Flax path -> diffusers name (see the module docstring)."""
    parts = []
    for i, name in enumerate(path[:-1]):
        parent = path[i - 1] if i else None
        if parent in ("attn", "attn2"):
            name = _ATTENTION_NAMES[name]
        elif parent in _MLP_NAMES:
            name = _MLP_LAYERS[name]
        elif name in _MLP_NAMES:
            name = _MLP_NAMES[name]
        elif _BLOCK.match(name):
            name = "transformer_blocks." + _BLOCK.match(name)[1]
        parts.append(name)
    return statedict.torch_key((*parts, path[-1]))


#: Flax paths <-> diffusers names and layouts.
LAYOUT = statedict.Layout(key=_torch_key)


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> SD3Transformer2DModel:
    """The module for a diffusers ``transformer/config.json`` dict (entries starting with ``_`` are
    ignored); ``ValueError`` for another class, an unknown entry or an unsupported value."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unsupported transformer class {class_name!r}; supported: {', '.join(CLASS_NAMES)}")
    config = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    unknown = sorted(set(config) - set(_FIELDS))
    if unknown:
        raise ValueError(f"SD3Transformer2DModel: unsupported config entries {unknown}; supported: {list(_FIELDS)}")
    return SD3Transformer2DModel(**{k: _hashable(v) for k, v in config.items()}, dtype=dtype)


def example_inputs(module: SD3Transformer2DModel) -> tuple:
    """``(x, timesteps, context, pooled)`` for ``module.init``: one patch, one text token."""
    p = module.patch_size
    return (jnp.zeros((1, p, p, module.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, module.joint_attention_dim), jnp.float32),
            jnp.zeros((1, module.pooled_projection_dim), jnp.float32))


def _unused(module: SD3Transformer2DModel) -> set[str]:
    """diffusers tensors the port does not hold: the last block's text-query projection and norm."""
    prefix = f"transformer_blocks.{module.num_layers - 1}.attn."
    names = {prefix + "add_q_proj.weight", prefix + "add_q_proj.bias"}
    return names | ({prefix + "norm_added_q.weight"} if module.qk_norm else set())


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                       dtype=np.float32) -> dict:
    """Flax ``{"params": ...}`` from a diffusers ``SD3Transformer2DModel`` state dict, strict
    (:func:`statedict.match`: every problem in one ``ValueError``). The position table must equal
    :func:`pos_embed_table` (to 1e-5, or the stored type's rounding); the last block's unused text-query tensors
    must be present and are dropped. ``dtype`` as for :func:`statedict.match` (None keeps the file's)."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    unused = _unused(module)
    missing = sorted(unused - set(state_dict))
    if missing:
        raise ValueError(f"state_dict does not fit {class_name}: missing keys ({statedict.listing(missing)})")
    kept = {k: v for k, v in state_dict.items() if k not in unused}
    table = pos_embed_table(module.inner_dim, module.pos_embed_max_size, module.sample_size // module.patch_size)
    stored = np.asarray(kept.get("pos_embed.pos_embed", table[None]))
    # the values lie in [-1, 1], so a float16 / bfloat16 copy differs by at most its machine epsilon
    tolerance = max(1e-5, float(np.finfo(stored.dtype).eps) if np.issubdtype(stored.dtype, np.floating) else 0.0)
    stored = stored.astype(np.float32)
    if stored.shape == table[None].shape and not np.allclose(stored, table[None], rtol=0, atol=tolerance):
        raise ValueError(f"state_dict does not fit {class_name}: pos_embed.pos_embed is not the sin-cos table of a "
                         f"{module.pos_embed_max_size}-square grid with base size "
                         f"{module.sample_size // module.patch_size} (max difference "
                         f"{np.abs(stored - table[None]).max():.3g})")
    return statedict.match(abstract, kept, layout=LAYOUT, what=class_name, dtype=dtype)


def load_folder(path, *, lazy: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, state_dict)`` of a diffusers ``SD3Transformer2DModel`` folder (a pipeline's
    ``transformer/``; single or sharded safetensors, see :mod:`jdiffsample.nets.formats.diffusers_folder`).
    ``lazy``: tensors as :class:`jdiffsample.nets.formats.lazy.LazyArray` s, read when needed."""
    config = diffusers_folder.read_config(path)
    name = config.get("_class_name", CLASS_NAMES[0])
    if name not in CLASS_NAMES:
        raise ValueError(f"{path}: config.json is for {name!r}, not SD3Transformer2DModel")
    return config, (diffusers_folder.lazy_weights if lazy else diffusers_folder.read_weights)(path)

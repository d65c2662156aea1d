"""Building blocks of diffusers' 2-D networks (``AutoencoderKL``, the Stable Diffusion UNet), NHWC.

Written from the architecture; submodule names follow diffusers' ``state_dict`` keys with ``.``
before an index written as ``_`` (``to_out.0`` is the Flax module ``to_out_0``), so that
:func:`torch_key` maps every Flax parameter path to its diffusers name.

Precision: every block takes ``dtype``, the compute type of its convolutions and linear layers;
group norms and the attention logits and softmax are computed in float32 (the results are cast
back to ``dtype``).

* :class:`ResnetBlock2D` -- GroupNorm-SiLU-conv twice, optional time embedding (added, or
  ``scale_shift``), 1x1 ``conv_shortcut`` when the channel count changes, ``output_scale_factor``.
* :class:`Downsample2D` -- stride-2 3x3 conv; ``padding=0`` pads (0, 1, 0, 1) first (the VAE),
  ``padding=1`` pads symmetrically (the UNets).
* :class:`Upsample2D` -- nearest-neighbour x2 (or to ``output_size``), then a 3x3 conv.
* :class:`Attention` -- diffusers ``Attention``: optional group norm, ``to_q``/``to_k``/``to_v``,
  ``to_out.0``, multi-head, self- or cross-attention, optional residual and output rescaling.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiffsample.nets.formats import statedict
from jdiffsample.nets.layers import Conv2d, GroupNorm, attention

__all__ = ["torch_key", "LAYOUT", "group_norm", "conv2d", "ResnetBlock2D", "Downsample2D",
           "Upsample2D", "Attention", "nearest_resize"]

Dtype = Any
_INDEX = re.compile(r"_(\d+)$")


def torch_key(path: tuple) -> str:
    """The diffusers name of a Flax parameter path (``down_blocks_0/resnets_1/conv1/kernel`` ->
    ``down_blocks.0.resnets.1.conv1.weight``)."""
    return statedict.torch_key(tuple(_INDEX.sub(r".\1", p) for p in path[:-1]) + (path[-1],))


#: The :class:`statedict.Layout` of every network built from these blocks.
LAYOUT = statedict.Layout(key=torch_key)


def group_norm(x: jax.Array, num_groups: int, eps: float, name: str) -> jax.Array:
    """``torch.nn.GroupNorm`` (affine, contiguous channel groups) computed in float32, returned in
    ``x.dtype`` (:func:`jdiffsample.nets.layers.group_norm`); call inside a compact method (the
    parameters are ``name/scale``, ``name/bias``)."""
    if x.shape[-1] % num_groups:
        raise ValueError(f"{name}: {x.shape[-1]} channels are not divisible into {num_groups} groups")
    return GroupNorm(eps=eps, dtype=x.dtype, num_groups=num_groups, name=name)(x)


def conv2d(features: int, name: str | None, dtype: Dtype, kernel: int = 3, stride: int = 1,
           padding: Any = None, use_bias: bool = True) -> nn.Module:
    """``torch.nn.Conv2d`` (symmetric zero padding ``kernel // 2`` unless ``padding`` is given);
    ``name=None`` in ``setup``, where the attribute names the module. A plain 1x1 convolution is
    computed as a matrix product (:class:`jdiffsample.nets.layers.Conv2d`, same parameters)."""
    if kernel == 1 and stride == 1 and padding is None:
        return Conv2d(features, 1, use_bias=use_bias, dtype=dtype, name=name)
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (``pre_norm``, no resampling), NHWC.

    ``h = conv1(silu(norm1(x)))``; with ``temb`` (``[B, T]``) ``time_emb_proj(silu(temb))`` is added
    to ``h`` (``time_embedding_norm="default"``) or applied after ``norm2`` as
    ``h * (1 + scale) + shift`` (``"scale_shift"``); then ``conv2(silu(norm2(h)))``. The shortcut
    is the 1x1 ``conv_shortcut`` when ``use_in_shortcut`` (default: when the channel count
    changes). Output ``(shortcut + h) / output_scale_factor``. ``time_emb_proj`` exists only in
    blocks called with ``temb``. Dropout is omitted (inference).
    """

    out_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    conv_shortcut_bias: bool = True
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D: time_embedding_norm {self.time_embedding_norm!r} is not "
                             f"supported; use 'default' or 'scale_shift'")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        out = self.out_channels or x.shape[-1]
        h = nn.silu(group_norm(x, self.groups, self.eps, "norm1"))
        h = conv2d(out, "conv1", self.dtype)(h)
        scale_shift = None
        if temb is None and self.time_embedding_norm == "scale_shift":
            raise ValueError("ResnetBlock2D: time_embedding_norm 'scale_shift' needs temb")
        if temb is not None:
            width = 2 * out if self.time_embedding_norm == "scale_shift" else out
            t = nn.Dense(width, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb.astype(self.dtype)))
            t = t[:, None, None, :]
            if self.time_embedding_norm == "scale_shift":
                scale_shift = jnp.split(t, 2, axis=-1)
            else:
                h = h + t
        h = group_norm(h, self.groups_out or self.groups, self.eps, "norm2")
        if scale_shift is not None:
            h = h * (1 + scale_shift[0]) + scale_shift[1]
        h = conv2d(out, "conv2", self.dtype)(nn.silu(h))
        shortcut = self.use_in_shortcut if self.use_in_shortcut is not None else x.shape[-1] != out
        if shortcut:
            x = conv2d(out, "conv_shortcut", self.dtype, kernel=1, use_bias=self.conv_shortcut_bias)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D`` with ``use_conv``: a stride-2 3x3 conv (``conv``).

    ``padding=0`` zero-pads one row at the bottom and one column at the right first (the VAE's
    asymmetric (0, 1, 0, 1) pad); ``padding=1`` pads one pixel on every side (the UNets).
    """

    out_channels: int | None = None
    padding: int = 1
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.padding not in (0, 1):
            raise ValueError(f"Downsample2D: padding must be 0 or 1, got {self.padding}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((1, 1), (1, 1))
        return conv2d(self.out_channels or x.shape[-1], "conv", self.dtype, stride=2, padding=pad)(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(mode="nearest")`` to ``size`` on NHWC: output pixel ``i`` takes input pixel
    ``floor(i * in / out)`` (float32 arithmetic, as PyTorch)."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            scale = jnp.float32(n) / jnp.float32(out)
            idx = jnp.minimum(jnp.floor(jnp.arange(out, dtype=jnp.float32) * scale).astype(jnp.int32), n - 1)
            x = jnp.take(x, idx, axis=axis)
    return x


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D`` with ``use_conv``: nearest-neighbour x2 (or to ``output_size``,
    ``(H, W)``, as the SD UNet asks for when a skip's size is odd), then a 3x3 conv (``conv``)."""

    out_channels: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        size = output_size or (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x.astype(self.dtype), tuple(size))
        return conv2d(self.out_channels or x.shape[-1], "conv", self.dtype)(x)


class Attention(nn.Module):
    """diffusers ``Attention`` (scaled dot-product, ``1/sqrt(dim_head)``), on ``[B, L, C]`` tokens or
    an NHWC map (its pixels are the tokens).

    ``group_norm`` (when ``norm_num_groups``) normalises the input first, then ``to_q`` on it,
    ``to_k``/``to_v`` on ``context`` (cross-attention, ``[B, L', C']``) or on the normalised input;
    ``heads`` heads of ``dim_head`` channels (default ``C // heads``); ``to_out.0`` back to ``C``;
    plus the input when ``residual_connection``; divided by ``rescale_output_factor``. The VAE mid
    block uses one head with ``dim_head = C``, a group norm, biases and the residual.
    """

    heads: int = 1
    dim_head: int | None = None
    norm_num_groups: int | None = None
    eps: float = 1e-5
    use_bias: bool = False
    out_bias: bool = True
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        shape = x.shape
        x = x.astype(self.dtype).reshape(shape[0], -1, shape[-1])
        channels = shape[-1]
        dim_head = self.dim_head or channels // self.heads
        inner = dim_head * self.heads
        h = x if self.norm_num_groups is None else group_norm(x, self.norm_num_groups, self.eps, "group_norm")
        context = h if context is None else context.astype(self.dtype)

        def project(name, y):  # -> [B, heads, tokens, dim_head]
            y = nn.Dense(inner, use_bias=self.use_bias, dtype=self.dtype, name=name)(y)
            return y.reshape(*y.shape[:2], self.heads, dim_head).transpose(0, 2, 1, 3)

        q, k, v = project("to_q", h), project("to_k", context), project("to_v", context)
        # float32 logits and softmax, the weights cast back to dtype for the sum over v
        a = attention(q * dim_head**-0.5, k, v)
        out = nn.Dense(channels, use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(a)
        if self.residual_connection:
            out = out + x
        return (out / self.rescale_output_factor).reshape(shape)

"""Flax layers shared by the network families, laid out NHWC: EDM's resampling convolution and
FIR resampling, the float32 group norm every UNet here uses, float32-softmax attention, sinusoidal
embeddings, and the Skip-Tuning scale variables.

Convolution kernels are HWIO, dense kernels ``[in, out]``, group-norm weights ``scale`` and ``bias``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Conv2d", "GroupNorm", "group_norm", "attention", "positional_embedding", "downsample", "upsample",
           "skip_variables", "filter_2d", "NHWC"]

Dtype = Any
NHWC = ("NHWC", "HWIO", "NHWC")


def filter_2d(resample_filter: Sequence[int]) -> np.ndarray:
    """The separable resampling filter ``outer(f, f) / sum(f)**2`` as ``[F, F]`` float32."""
    f = np.asarray(resample_filter, np.float32)
    return np.outer(f, f) / np.square(f.sum())


def _depthwise(x: jax.Array, taps: np.ndarray, *, stride: int, padding: int,
               lhs_dilation: int = 1) -> jax.Array:
    """Convolve every channel of ``x`` with the same 2-D ``taps``."""
    channels = x.shape[-1]
    kernel = jnp.tile(jnp.asarray(taps, x.dtype)[:, :, None, None], (1, 1, 1, channels))
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
        lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=NHWC,
        feature_group_count=channels)


def downsample(x: jax.Array, resample_filter: Sequence[int], padding: int) -> jax.Array:
    """Blur with the filter and keep every second pixel (2x2 mean for ``[1, 1]``).

    For ``[1, 1]`` (the default of every EDM/EDM2 network) and even sizes this is a reshape and a
    sum times 1/4: the depthwise convolution it replaces multiplies each of the same four pixels by
    the tap 1/4, a power of two, so only the order of the three additions can differ. XLA:CPU runs
    the depthwise convolution far slower.
    """
    b, h, w, c = x.shape
    if tuple(resample_filter) == (1, 1) and padding == 0 and h % 2 == 0 and w % 2 == 0:
        return x.reshape(b, h // 2, 2, w // 2, 2, c).sum((2, 4)) * 0.25
    return _depthwise(x, filter_2d(resample_filter), stride=2, padding=padding)


def upsample(x: jax.Array, resample_filter: Sequence[int]) -> jax.Array:
    """Transposed stride-2 convolution with ``4 * filter`` (nearest neighbour for ``[1, 1]``).

    ``conv_transpose2d(padding=p)`` equals a convolution of the 2x-dilated input, padded by
    ``F - 1 - p``, with the spatially flipped kernel. For ``[1, 1]`` every output pixel is one
    input pixel times the tap 4/4 = 1, so the nearest-neighbour copy below is exact (and much
    cheaper than the dilated depthwise convolution).
    """
    if tuple(resample_filter) == (1, 1):
        b, h, w, c = x.shape
        return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    taps = 4 * filter_2d(resample_filter)[::-1, ::-1]
    pad = len(resample_filter) - 1 - (len(resample_filter) - 1) // 2
    return _depthwise(x, taps, stride=1, padding=pad, lhs_dilation=2)


class Conv2d(nn.Module):
    """EDM convolution: optional 2x up/down-sampling with a FIR filter, then a ``kernel`` x ``kernel``
    convolution (``kernel=0``: resampling only, no parameters).

    ``fused_down`` is the original's ``fused_resample`` with ``down``: convolve first (padded by
    the filter's extra margin), then blur and subsample without padding.
    """

    features: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: tuple[int, ...] = (1, 1)
    fused_down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        f_pad = (len(self.resample_filter) - 1) // 2
        weight = None
        if self.kernel:
            weight = self.param("kernel", nn.initializers.lecun_normal(),
                                (self.kernel, self.kernel, x.shape[-1], self.features))
            weight = weight.astype(self.dtype)

        def conv(h, padding):
            if self.kernel == 1 and padding == 0:
                return h @ weight[0, 0]  # a 1x1 convolution; XLA:CPU runs the matmul ~2x faster
            return jax.lax.conv_general_dilated(h, weight, (1, 1), [(padding, padding)] * 2,
                                                dimension_numbers=NHWC)

        if self.fused_down:
            x = conv(x, self.kernel // 2 + f_pad)
            x = downsample(x, self.resample_filter, padding=0)
        else:
            if self.up:
                x = upsample(x, self.resample_filter)
            if self.down:
                x = downsample(x, self.resample_filter, padding=f_pad)
            if weight is not None:
                x = conv(x, self.kernel // 2)
        if self.kernel and self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return x


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
    """``torch.nn.GroupNorm`` on channels-last ``[B, ..., C]`` (contiguous channel groups); float32.

    Two passes (mean, then the mean square deviation), as numerically safe as the textbook form.
    Each pass first sums every channel over the pixels (a reduction along the contiguous channel
    axis that XLA vectorises well), then adds the ``C / groups`` channel sums of a group on the
    small ``[B, C]`` result; only the order of the additions differs from summing each group at
    once.
    """
    b, c = x.shape[0], x.shape[-1]
    pixels = tuple(range(1, x.ndim - 1))
    count = x.size // (b * groups)

    def group_mean(per_channel):  # [B, C] channel sums -> [B, 1.., C] mean of each channel's group
        sums = per_channel.reshape(b, groups, c // groups).sum(-1, keepdims=True)
        means = jnp.broadcast_to(sums / count, (b, groups, c // groups))
        return means.reshape((b,) + (1,) * len(pixels) + (c,))

    mean = group_mean(x.sum(pixels))
    var = group_mean(jnp.square(x - mean).sum(pixels))
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias


class GroupNorm(nn.Module):
    """Group norm computed in float32 (see :func:`group_norm`), returned in ``dtype``;
    ``num_groups=None`` is EDM's ``min(32, C // 4)``. Parameters ``scale`` and ``bias``."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    num_groups: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        groups = self.num_groups or min(32, channels // 4)
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        return group_norm(x.astype(jnp.float32), scale, bias, groups, self.eps).astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T) v`` per head for ``q``, ``k``, ``v`` laid out ``[B, heads, tokens, ch]``
    (the caller scales ``q`` or ``k``); logits and softmax in float32. Returns ``[B, tokens,
    heads * ch]`` in ``v.dtype``.

    The head-major layout makes both products plain batched matmuls, which XLA:CPU fuses with the
    softmax; ``jax.nn.dot_product_attention`` on ``[B, tokens, heads, ch]`` transposes inside and
    ran about 2x slower on the CPU.
    """
    logits = jnp.einsum("bhqc,bhkc->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkc->bhqc", weights, v).transpose(0, 2, 1, 3)
    return out.reshape(*out.shape[:2], -1)


def positional_embedding(x: jax.Array, num_channels: int, max_positions: int = 10000,
                         endpoint: bool = False) -> jax.Array:
    """``[cos(x f), sin(x f)]`` with ``f_i = (1 / max_positions) ** (i / (C/2 - endpoint))``."""
    half = num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
    freqs = (1 / max_positions) ** freqs
    x = jnp.outer(x.astype(jnp.float32), freqs)
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def skip_variables(module: nn.Module, names: Sequence[str]) -> list[jax.Array]:
    """The Skip-Tuning scales, as variables of ``module`` in the flat ``"skip"`` collection."""
    return [module.variable("skip", n, lambda: jnp.ones((), jnp.float32)).value for n in names]

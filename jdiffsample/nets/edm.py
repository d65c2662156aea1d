"""Flax ports of the NVlabs/edm networks (Karras et al., 2022): ``SongUNet`` (DDPM++ / NCSN++),
``DhariwalUNet`` (ADM) and the preconditioners ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond`` and
``EDMPrecond``.

The networks are written from the published architecture description, laid out NHWC, and
reproduce ``net(x, sigma, class_labels)`` of the PyTorch originals once the weights are converted::

    module = build("EDMPrecond", kwargs)          # kwargs: the original constructor kwargs
    variables = convert_state_dict("EDMPrecond", kwargs, state_dict)   # name -> numpy array
    denoised = module.apply(variables, x_nhwc, sigma, class_labels)    # D(x; sigma), float32

``sigma`` is a scalar or has shape ``[B]``; ``class_labels`` are one-hot ``[B, label_dim]`` (zeros
when omitted, as in the original); ``augment_labels`` may be passed as a keyword.

Variables
---------
``variables["params"]`` mirrors the PyTorch module tree: the state_dict key
``model.enc.16x16_block0.conv0.weight`` is the Flax path ``model/enc/16x16_block0/conv0/kernel``.
Convolution kernels are HWIO, dense kernels ``[in, out]``, group-norm weights are ``scale``. The
NCSN++ Fourier frequencies (a buffer in the original) are kept as ``model/map_noise/freqs`` and
never receive gradients. The other buffers are constants recomputed here: ``resample_filter``
(every resampling convolution) and ``u`` (``iDDPMPrecond``); the converter checks their values and
drops them.

Skip-Tuning
-----------
``variables["skip"]`` is a flat dict of float32 scalars, one per long skip connection, at the top
level of the module that is applied (a preconditioner, or a bare UNet)::

    variables["skip"]["00_8x8_block0"], ..., variables["skip"]["15_64x64_block3"]

The key is ``f"{j:02d}_{name}"``: ``j`` counts the skips in the order the decoder consumes them
(``j = 0`` is the deepest) and ``name`` is the decoder block that concatenates it, so sorted keys
are in consumption order (``module.skip_names`` lists them). The decoder concatenates
``[x, rho_j * skip]``; the encoder path and the SongUNet auxiliary paths (``aux_*`` blocks:
NCSN++ input pyramid, 'skip' decoder output pyramid) are never scaled. For the 'skip' and
'residual' encoders the scaled tensor is the stack entry as updated by the ``aux`` block, which is
what the original concatenates. The scales initialise to 1.0, which leaves the output
bit-identical to the unscaled network.

Precision
---------
``dtype`` (default float32; e.g. ``jnp.bfloat16``) sets the compute type of the convolutions and the
attention matmuls. As in the original fp16 mode, the noise/label mapping network and each block's
``affine`` projection run in float32 (the original feeds them float32 noise labels), group norms
and the attention softmax always compute in float32, and the preconditioner returns float32.
``use_fp16`` is accepted and recorded but has no effect; choose ``dtype`` instead. On GPUs,
float32 convolutions and matmuls default to TF32 (about 1e-3 relative error against the
original); run under ``jax.default_matmul_precision("highest")`` for a float32-exact match.

Dropout and label dropout are applied only when ``deterministic=False`` (they need a
``"dropout"`` rng); the default is the original's eval-mode forward. The random initialisation of
:meth:`flax.linen.Module.init` gives valid shapes, not the original init scheme.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from jdiffsample.nets import family, statedict, torchfile

__all__ = [
    "Conv2d",
    "GroupNorm",
    "group_norm",
    "attention",
    "UNetBlock",
    "SongUNet",
    "DhariwalUNet",
    "VPPrecond",
    "VEPrecond",
    "iDDPMPrecond",
    "EDMPrecond",
    "FourierEmbedding",
    "positional_embedding",
    "build",
    "example_inputs",
    "convert_state_dict",
    "convert",
    "FAMILY",
]

Dtype = Any
_NHWC = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------------------------
# Layers.


def _filter_2d(resample_filter: Sequence[int]) -> np.ndarray:
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
        lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=_NHWC,
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
    return _depthwise(x, _filter_2d(resample_filter), stride=2, padding=padding)


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
    taps = 4 * _filter_2d(resample_filter)[::-1, ::-1]
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
                                                dimension_numbers=_NHWC)

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


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """A float32 linear layer (mapping network and block ``affine``), named as in the original."""
    return nn.Dense(features, use_bias=use_bias, dtype=jnp.float32, name=name)


@dataclasses.dataclass(frozen=True)
class _BlockStyle:
    """The UNetBlock settings that differ between SongUNet and DhariwalUNet."""

    num_heads: int | None          # fixed head count, or None for out_channels // channels_per_head
    skip_scale: float
    eps: float
    resample_filter: tuple[int, ...]
    resample_proj: bool            # 1x1 projection on the shortcut of up/down blocks
    adaptive_scale: bool           # scale/shift modulation (ADM) instead of an additive bias
    dropout: float
    channels_per_head: int = 64


class UNetBlock(nn.Module):
    """EDM ``UNetBlock``: GN-SiLU-conv, embedding modulation, GN-SiLU-dropout-conv, shortcut,
    optional multi-head self-attention. Submodule names follow the original."""

    out_channels: int
    style: _BlockStyle
    up: bool = False
    down: bool = False
    attention: bool = False
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        s, out = self.style, self.out_channels
        resample = dict(up=self.up, down=self.down, resample_filter=s.resample_filter,
                        dtype=self.dtype)

        orig = x
        x = Conv2d(out, 3, name="conv0", **resample)(nn.silu(self._norm("norm0")(x)))
        params = _dense(out * (2 if s.adaptive_scale else 1), "affine")(emb)
        params = params[:, None, None, :].astype(x.dtype)
        if s.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + self._norm("norm1")(x) * (scale + 1))
        else:
            x = nn.silu(self._norm("norm1")(x + params))
        x = nn.Dropout(s.dropout)(x, deterministic=self.deterministic)
        x = Conv2d(out, 3, dtype=self.dtype, name="conv1")(x)

        if out != orig.shape[-1] or self.up or self.down:
            kernel = 1 if s.resample_proj or out != orig.shape[-1] else 0
            orig = Conv2d(out, kernel, name="skip", **resample)(orig)
        x = (x + orig) * s.skip_scale

        if self.num_heads:
            x = x + self._attention(self._norm("norm2")(x), self.num_heads)
            x = x * s.skip_scale
        return x

    @property
    def num_heads(self) -> int:
        """Attention heads; 0 (no attention) also when ``out_channels < channels_per_head``."""
        if not self.attention:
            return 0
        s = self.style
        return s.num_heads if s.num_heads is not None else self.out_channels // s.channels_per_head

    def _norm(self, name: str) -> GroupNorm:
        return GroupNorm(eps=self.style.eps, dtype=self.dtype, name=name)

    def _attention(self, x: jax.Array, heads: int) -> jax.Array:
        """Self-attention over all pixels; the qkv channels are interleaved as
        ``(head * ch + c) * 3 + {0: q, 1: k, 2: v}``, as in the original."""
        b, h, w, c = x.shape
        qkv = Conv2d(3 * c, 1, dtype=self.dtype, name="qkv")(x)
        q, k, v = qkv.reshape(b, h * w, heads, c // heads, 3).transpose(4, 0, 2, 1, 3)
        a = attention(q, k / math.sqrt(c // heads), v)
        return Conv2d(c, 1, dtype=self.dtype, name="proj")(a.reshape(b, h, w, c))


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


class FourierEmbedding(nn.Module):
    """NCSN++ noise embedding ``[cos(2 pi x f), sin(2 pi x f)]`` with fixed random ``freqs``."""

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        freqs = self.param("freqs", nn.initializers.normal(self.scale), (self.num_channels // 2,))
        x = jnp.outer(x.astype(jnp.float32), 2 * np.pi * jax.lax.stop_gradient(freqs))
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


# ----------------------------------------------------------------------------------------------
# Encoder / decoder layouts.


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One entry of the original ``enc`` / ``dec`` ModuleDicts.

    ``kind`` is 'conv' (input convolution), 'block' (UNetBlock), or one of the SongUNet auxiliary
    paths 'aux_down', 'aux_skip', 'aux_residual' (encoder) and 'aux_up', 'aux_norm', 'aux_conv'
    (decoder). ``takes_skip`` marks decoder blocks that first concatenate a long skip.
    """

    name: str
    kind: str
    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    takes_skip: bool = False


def _song_layers(img_resolution, in_channels, out_channels, model_channels, channel_mult,
                 num_blocks, attn_resolutions, encoder_type, decoder_type):
    """The SongUNet encoder and decoder entries, in the original order."""
    enc, dec = [], []
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
        res = f"{img_resolution >> level}x{img_resolution >> level}"
        if level == 0:
            cout = model_channels
            enc.append(_Layer(f"{res}_conv", "conv", cout))
        else:
            enc.append(_Layer(f"{res}_down", "block", cout, down=True))
            if encoder_type == "skip":
                enc.append(_Layer(f"{res}_aux_down", "aux_down", caux, down=True))
                enc.append(_Layer(f"{res}_aux_skip", "aux_skip", cout))
            if encoder_type == "residual":
                enc.append(_Layer(f"{res}_aux_residual", "aux_residual", cout, down=True))
                caux = cout
        for idx in range(num_blocks):
            cout = model_channels * mult
            attn = (img_resolution >> level) in attn_resolutions
            enc.append(_Layer(f"{res}_block{idx}", "block", cout, attention=attn))

    last = len(channel_mult) - 1
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = f"{img_resolution >> level}x{img_resolution >> level}"
        if level == last:
            dec.append(_Layer(f"{res}_in0", "block", cout, attention=True))
            dec.append(_Layer(f"{res}_in1", "block", cout))
        else:
            dec.append(_Layer(f"{res}_up", "block", cout, up=True))
        for idx in range(num_blocks + 1):
            cout = model_channels * mult
            attn = idx == num_blocks and (img_resolution >> level) in attn_resolutions
            dec.append(_Layer(f"{res}_block{idx}", "block", cout, attention=attn, takes_skip=True))
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < last:
                dec.append(_Layer(f"{res}_aux_up", "aux_up", out_channels, up=True))
            dec.append(_Layer(f"{res}_aux_norm", "aux_norm", cout))
            dec.append(_Layer(f"{res}_aux_conv", "aux_conv", out_channels))
    return tuple(enc), tuple(dec)


def _dhariwal_layers(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                     attn_resolutions):
    """The DhariwalUNet encoder and decoder entries, in the original order."""
    enc, dec = [], []
    cout = in_channels
    for level, mult in enumerate(channel_mult):
        res = f"{img_resolution >> level}x{img_resolution >> level}"
        attn = (img_resolution >> level) in attn_resolutions
        if level == 0:
            cout = model_channels * mult
            enc.append(_Layer(f"{res}_conv", "conv", cout))
        else:
            enc.append(_Layer(f"{res}_down", "block", cout, down=True))
        for idx in range(num_blocks):
            cout = model_channels * mult
            enc.append(_Layer(f"{res}_block{idx}", "block", cout, attention=attn))
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = f"{img_resolution >> level}x{img_resolution >> level}"
        attn = (img_resolution >> level) in attn_resolutions
        if level == len(channel_mult) - 1:
            dec.append(_Layer(f"{res}_in0", "block", cout, attention=True))
            dec.append(_Layer(f"{res}_in1", "block", cout))
        else:
            dec.append(_Layer(f"{res}_up", "block", cout, up=True))
        for idx in range(num_blocks + 1):
            cout = model_channels * mult
            dec.append(_Layer(f"{res}_block{idx}", "block", cout, attention=attn, takes_skip=True))
    return tuple(enc), tuple(dec)


def _skip_names(decoder: Sequence[_Layer]) -> tuple[str, ...]:
    """Skip-Tuning variable names ``f"{j:02d}_{block}"`` in the order the decoder consumes them."""
    consumers = [layer.name for layer in decoder if layer.takes_skip]
    return tuple(f"{j:02d}_{name}" for j, name in enumerate(consumers))


class _Encoder(nn.Module):
    """The original ``enc`` ModuleDict; returns the main path and the stack of long skips."""

    layers: tuple[_Layer, ...]
    style: _BlockStyle
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips, aux = [], x
        filt = self.style.resample_filter
        for layer in self.layers:
            n, c = layer.name, layer.out_channels
            if layer.kind == "aux_down":
                aux = Conv2d(c, 0, down=True, resample_filter=filt, dtype=self.dtype, name=n)(aux)
            elif layer.kind == "aux_skip":
                x = skips[-1] = x + Conv2d(c, 1, dtype=self.dtype, name=n)(aux)
            elif layer.kind == "aux_residual":
                conv = Conv2d(c, 3, down=True, resample_filter=filt, fused_down=True,
                              dtype=self.dtype, name=n)
                x = skips[-1] = aux = (x + conv(aux)) / math.sqrt(2)
            elif layer.kind == "conv":
                x = Conv2d(c, 3, dtype=self.dtype, name=n)(x)
                skips.append(x)
            else:
                x = _block(layer, self.style, self.dtype, self.deterministic)(x, emb)
                skips.append(x)
        return x, skips


class _Decoder(nn.Module):
    """The original ``dec`` ModuleDict. Returns the main path and the SongUNet aux output."""

    layers: tuple[_Layer, ...]
    style: _BlockStyle
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, emb, skips, skip_scales):
        skips, scales = list(skips), iter(skip_scales)
        aux = tmp = None
        for layer in self.layers:
            n, c = layer.name, layer.out_channels
            if layer.kind == "aux_up":
                aux = Conv2d(c, 0, up=True, resample_filter=self.style.resample_filter,
                             dtype=self.dtype, name=n)(aux)
            elif layer.kind == "aux_norm":
                tmp = GroupNorm(eps=1e-6, dtype=self.dtype, name=n)(x)
            elif layer.kind == "aux_conv":
                tmp = Conv2d(c, 3, dtype=self.dtype, name=n)(nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if layer.takes_skip:
                    skip = (next(scales) * skips.pop()).astype(x.dtype)
                    x = jnp.concatenate([x, skip], axis=-1)
                x = _block(layer, self.style, self.dtype, self.deterministic)(x, emb)
        return x, aux


def _block(layer: _Layer, style: _BlockStyle, dtype: Dtype, deterministic: bool) -> UNetBlock:
    return UNetBlock(layer.out_channels, style, up=layer.up, down=layer.down,
                     attention=layer.attention, dtype=dtype, deterministic=deterministic,
                     name=layer.name)


def skip_variables(module: nn.Module, names: Sequence[str]) -> list[jax.Array]:
    """The Skip-Tuning scales, as variables of ``module`` in the flat ``"skip"`` collection."""
    return [module.variable("skip", n, lambda: jnp.ones((), jnp.float32)).value for n in names]


class _UNet(nn.Module):
    """Shared parts of the two EDM UNets: skip scales, class and augmentation labels."""

    def _skip_scales(self, skip_scales: Sequence[jax.Array] | None) -> Sequence[jax.Array]:
        """The given scales, or this module's own ``"skip"`` variables when it is the top level."""
        return skip_variables(self, self.skip_names) if skip_scales is None else skip_scales

    def _labels(self, class_labels: jax.Array | None, batch: int) -> jax.Array:
        if class_labels is None:
            raise ValueError(f"{type(self).__name__} has label_dim={self.label_dim}: "
                             "class_labels are required")
        labels = jnp.asarray(class_labels, jnp.float32)
        if not self.deterministic and self.label_dropout:
            keep = jax.random.uniform(self.make_rng("dropout"), (batch, 1)) >= self.label_dropout
            labels = labels * keep.astype(labels.dtype)
        return labels

    def _augment(self, augment_labels, batch: int, features: int) -> jax.Array:
        """``map_augment(augment_labels)``; absent labels contribute exactly zero (the
        parameters exist either way, as in the original)."""
        if augment_labels is None:
            augment_labels = jnp.zeros((batch, self.augment_dim), jnp.float32)
        return _dense(features, "map_augment", use_bias=False)(augment_labels)

    @property
    def skip_names(self) -> tuple[str, ...]:
        """Skip-Tuning variable names, in the order the decoder consumes the skips."""
        return _skip_names(self.layers[1])


class SongUNet(_UNet):
    """DDPM++ / NCSN++ UNet (EDM's reimplementation of Song et al.), NHWC.

    Attributes are the original constructor arguments, plus ``dtype`` and ``deterministic``.
    ``__call__(x, noise_labels, class_labels=None, augment_labels=None, skip_scales=None)``
    returns the raw network output ``F`` (``[B, H, W, out_channels]``, in ``dtype``).
    """

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[int, ...] = (1, 1)
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @property
    def layers(self) -> tuple[tuple[_Layer, ...], tuple[_Layer, ...]]:
        for attr, allowed in (("embedding_type", ("fourier", "positional")),
                              ("encoder_type", ("standard", "skip", "residual")),
                              ("decoder_type", ("standard", "skip"))):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"SongUNet: unsupported {attr}={getattr(self, attr)!r}; "
                                 f"supported: {', '.join(allowed)}")
        return _song_layers(self.img_resolution, self.in_channels, self.out_channels,
                            self.model_channels, tuple(self.channel_mult), self.num_blocks,
                            tuple(self.attn_resolutions), self.encoder_type, self.decoder_type)

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None,
                 skip_scales=None):
        enc_layers, dec_layers = self.layers
        noise_channels = self.model_channels * self.channel_mult_noise
        emb_channels = self.model_channels * self.channel_mult_emb
        style = _BlockStyle(num_heads=1, skip_scale=math.sqrt(0.5), eps=1e-6,
                            resample_filter=tuple(self.resample_filter), resample_proj=True,
                            adaptive_scale=False, dropout=self.dropout)

        # Mapping: noise embedding with its halves swapped to [sin, cos], labels, augmentation.
        if self.embedding_type == "positional":
            emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
        else:
            emb = FourierEmbedding(noise_channels, name="map_noise")(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1)[:, ::-1].reshape(emb.shape)
        if self.label_dim:
            labels = self._labels(class_labels, x.shape[0]) * math.sqrt(self.label_dim)
            emb = emb + _dense(noise_channels, "map_label")(labels)
        if self.augment_dim:
            emb = emb + self._augment(augment_labels, x.shape[0], noise_channels)
        emb = nn.silu(_dense(emb_channels, "map_layer0")(emb))
        emb = nn.silu(_dense(emb_channels, "map_layer1")(emb))

        encoder = _Encoder(enc_layers, style, self.dtype, self.deterministic, name="enc")
        decoder = _Decoder(dec_layers, style, self.dtype, self.deterministic, name="dec")
        x, skips = encoder(x, emb)
        _, aux = decoder(x, emb, skips, self._skip_scales(skip_scales))
        return aux


class DhariwalUNet(_UNet):
    """ADM UNet (EDM's reimplementation of Dhariwal & Nichol), NHWC.

    Attributes are the original constructor arguments, plus ``dtype`` and ``deterministic``.
    ``__call__(x, noise_labels, class_labels=None, augment_labels=None, skip_scales=None)``
    returns the raw network output ``F`` (``[B, H, W, out_channels]``, in ``dtype``).
    """

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    resample_filter = (1, 1)  # fixed: nearest-neighbour up, 2x2 mean down

    @property
    def layers(self) -> tuple[tuple[_Layer, ...], tuple[_Layer, ...]]:
        return _dhariwal_layers(self.img_resolution, self.in_channels, self.model_channels,
                                tuple(self.channel_mult), self.num_blocks,
                                tuple(self.attn_resolutions))

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None,
                 skip_scales=None):
        enc_layers, dec_layers = self.layers
        emb_channels = self.model_channels * self.channel_mult_emb
        style = _BlockStyle(num_heads=None, skip_scale=1.0, eps=1e-5,
                            resample_filter=self.resample_filter, resample_proj=False,
                            adaptive_scale=True, dropout=self.dropout)

        # Mapping: [cos, sin] embedding, augmentation, MLP, then labels (no sqrt scaling).
        emb = positional_embedding(noise_labels, self.model_channels)
        if self.augment_dim:
            emb = emb + self._augment(augment_labels, x.shape[0], self.model_channels)
        emb = nn.silu(_dense(emb_channels, "map_layer0")(emb))
        emb = _dense(emb_channels, "map_layer1")(emb)
        if self.label_dim:
            labels = self._labels(class_labels, x.shape[0])
            emb = emb + _dense(emb_channels, "map_label", use_bias=False)(labels)
        emb = nn.silu(emb)

        encoder = _Encoder(enc_layers, style, self.dtype, self.deterministic, name="enc")
        decoder = _Decoder(dec_layers, style, self.dtype, self.deterministic, name="dec")
        x, skips = encoder(x, emb)
        x, _ = decoder(x, emb, skips, self._skip_scales(skip_scales))
        x = nn.silu(GroupNorm(eps=1e-5, dtype=self.dtype, name="out_norm")(x))
        return Conv2d(self.out_channels, 3, dtype=self.dtype, name="out_conv")(x)


_UNETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# ----------------------------------------------------------------------------------------------
# Preconditioners.


class _Precond(nn.Module):
    """Shared preconditioner: ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``.

    Subclasses define :meth:`_coefficients`. ``model_kwargs`` holds the UNet's own constructor
    arguments (everything in the original ``**model_kwargs``).
    """

    img_resolution: int
    img_channels: int
    label_dim: int = 0
    use_fp16: bool = False
    model_kwargs: Mapping[str, Any] = FrozenDict()
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    out_channel_factor = 1  # UNet output channels per image channel

    def _model_spec(self) -> tuple[type[_UNet], dict[str, Any]]:
        """The UNet class and its constructor arguments; validates ``model_type`` and the kwargs."""
        unet = _UNETS.get(self.model_type)
        if unet is None:
            raise ValueError(f"{type(self).__name__}: unsupported model_type {self.model_type!r}; "
                             f"supported: {', '.join(_UNETS)}")
        reserved = {"img_resolution", "in_channels", "out_channels", "label_dim", "dtype",
                    "deterministic", "parent", "name"}
        accepted = {f.name for f in dataclasses.fields(unet)} - reserved
        unknown = sorted(set(self.model_kwargs) - accepted)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unsupported {self.model_type} kwargs "
                             f"{unknown}; supported: {sorted(accepted)}")
        return unet, dict(img_resolution=self.img_resolution, in_channels=self.img_channels,
                          out_channels=self.img_channels * self.out_channel_factor,
                          label_dim=self.label_dim, dtype=self.dtype,
                          deterministic=self.deterministic, **self.model_kwargs)

    @property
    def model(self) -> _UNet:
        """The UNet as a detached module, for inspecting its layout."""
        unet, kwargs = self._model_spec()
        return unet(**kwargs, parent=None)

    @property
    def skip_names(self) -> tuple[str, ...]:
        """Keys of ``variables["skip"]``, in the order the decoder consumes the skips."""
        return self.model.skip_names

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = jnp.zeros((1, self.label_dim), jnp.float32)
        else:
            class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim)

        unet, kwargs = self._model_spec()
        model = unet(**kwargs, name="model")
        scales = skip_variables(self, model.skip_names)
        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        c_noise = jnp.broadcast_to(c_noise.reshape(-1), (x.shape[0],))
        f_x = model((c_in * x).astype(self.dtype), c_noise, class_labels, augment_labels,
                    skip_scales=scales)
        return c_skip * x + c_out * f_x[..., : self.img_channels].astype(jnp.float32)

    def round_sigma(self, sigma):
        """The noise level the network is evaluated at (identity except for iDDPM)."""
        return jnp.asarray(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021): c_noise = (M - 1) t(sigma)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5
    model_type: str = "SongUNet"

    def sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.sqrt(jnp.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1)

    def sigma_inv(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        return (jnp.sqrt(self.beta_min**2 + 2 * self.beta_d * jnp.log(1 + sigma**2))
                - self.beta_min) / self.beta_d

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.epsilon_t))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))

    def _coefficients(self, sigma):
        return 1, -sigma, 1 / jnp.sqrt(sigma**2 + 1), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021): c_noise = log(sigma / 2)."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    model_type: str = "SongUNet"

    def _coefficients(self, sigma):
        return 1, sigma, 1, jnp.log(0.5 * sigma)


def _iddpm_u(C_1: float, C_2: float, M: int) -> np.ndarray:
    """The iDDPM noise levels ``u[0..M]`` (decreasing), with the original's float32 recursion.

    Matches the original buffer to ~3e-5 relative; not bit-exactly, since float32 ``sin`` is
    not correctly rounded and differs by ulps between numpy and torch.
    """
    f32 = np.float32

    def alpha_bar(j):
        return np.sin(f32(0.5 * np.pi) * f32(j) / f32(M) / f32(C_2 + 1)) ** 2

    u = np.zeros(M + 1, f32)
    for j in range(M, 0, -1):
        ratio = np.maximum(alpha_bar(j - 1) / alpha_bar(j), f32(C_1))
        u[j - 1] = np.sqrt((u[j] ** 2 + f32(1)) / ratio - f32(1))
    return u


class iDDPMPrecond(_Precond):  # noqa: N801 (original name)
    """Improved-DDPM preconditioning: c_noise is the index of the nearest of the M + 1 discrete
    noise levels ``u``; the UNet predicts 2 * img_channels and the first half is used."""

    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    model_type: str = "DhariwalUNet"

    out_channel_factor = 2

    @property
    def u(self) -> np.ndarray:
        return _iddpm_u(self.C_1, self.C_2, self.M)

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def _index(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        distance = jnp.abs(sigma.reshape(-1, 1) - jnp.asarray(self.u)[None, :])
        return jnp.argmin(distance, axis=1).reshape(sigma.shape)

    def round_sigma(self, sigma):
        return jnp.asarray(self.u)[self._index(sigma)]

    def _coefficients(self, sigma):
        c_noise = (self.M - 1 - self._index(sigma)).astype(jnp.float32)
        return 1, -sigma, 1 / jnp.sqrt(sigma**2 + 1), c_noise


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022), with data standard deviation ``sigma_data``."""

    sigma_min: float = 0.0
    sigma_max: float = float("inf")
    sigma_data: float = 0.5
    model_type: str = "DhariwalUNet"

    def _coefficients(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1 / jnp.sqrt(sd2 + sigma**2)
        return c_skip, c_out, c_in, jnp.log(sigma) / 4


_PRECONDS = {c.__name__: c for c in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)}


# ----------------------------------------------------------------------------------------------
# Construction and weight conversion.


def _hashable(value: Any) -> Any:
    """JSON lists -> tuples, so that modules stay hashable (usable as static jit arguments)."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> _Precond:
    """The preconditioned EDM network ``class_name`` built from the original constructor kwargs.

    ``kwargs`` are those of the original class (``img_resolution``, ``img_channels``,
    ``label_dim``, ``use_fp16``, the preconditioner's own parameters, ``model_type`` and the UNet's
    keyword arguments), e.g. the ``kwargs`` of a fixture's ``config.json``.
    """
    cls = _PRECONDS.get(class_name)
    if cls is None:
        raise ValueError(f"unsupported EDM network class {class_name!r}; "
                         f"supported: {', '.join(_PRECONDS)}")
    own = {f.name for f in dataclasses.fields(cls)} - {"model_kwargs", "dtype", "deterministic",
                                                        "parent", "name"}
    precond_kwargs = {k: _hashable(v) for k, v in kwargs.items() if k in own}
    model_kwargs = {k: _hashable(v) for k, v in kwargs.items() if k not in own}
    module = cls(**precond_kwargs, model_kwargs=FrozenDict(model_kwargs), dtype=dtype)
    module._model_spec()  # validates model_type and the UNet kwargs
    return module


def example_inputs(module: _Precond):
    x = jnp.zeros((1, module.img_resolution, module.img_resolution, module.img_channels))
    labels = jnp.zeros((1, module.label_dim)) if module.label_dim else None
    return x, jnp.ones((1,)), labels


def _expected_buffers(module: _Precond) -> dict[str, np.ndarray]:
    """The non-parameter buffers the original registers, with the values they must hold."""
    model = module.model
    enc, dec = model.layers
    filt = _filter_2d(model.resample_filter)[None, None]
    buffers = {}
    for prefix, layers in (("model.enc", enc), ("model.dec", dec)):
        for layer in layers:
            if layer.kind == "block" and (layer.up or layer.down):
                buffers[f"{prefix}.{layer.name}.conv0.resample_filter"] = filt
                buffers[f"{prefix}.{layer.name}.skip.resample_filter"] = filt
            elif layer.kind in ("aux_down", "aux_residual", "aux_up"):
                buffers[f"{prefix}.{layer.name}.resample_filter"] = filt
    if isinstance(module, iDDPMPrecond):
        buffers["u"] = module.u
    return buffers


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any],
                       state_dict: Mapping[str, np.ndarray]) -> dict:
    """Flax ``variables`` ``{"params": ..., "skip": ...}`` from an original EDM ``state_dict``.

    ``state_dict`` maps the original keys (``model.enc.16x16_conv.weight``, ...) to arrays. The
    match is strict (:func:`jdiffsample.nets.statedict.match`): missing and unexpected keys, shape
    mismatches and buffers whose values differ from the constants this port uses raise
    ``ValueError`` naming them. Resampling filters are exact; ``u`` comes from a float32 recursion
    whose sin() differs by ulps between libraries, which grows to ~3e-5 relative over 1000 steps.
    """
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    buffers = {k: (v, 1e-4 if k == "u" else 0.0) for k, v in _expected_buffers(module).items()}
    return statedict.match(abstract, state_dict, buffers=buffers, what=f"{class_name}({module.model_type})")


# ----------------------------------------------------------------------------------------------
# The family: conversion, schedule and denoiser.

#: Default sampling range of EDM networks (NVlabs/edm generate.py), clipped to each
#: preconditioner's own [sigma_min, sigma_max].
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def convert(src, dst, *, kwargs=None, key=None, overwrite: bool = False) -> dict:
    """Convert an NVlabs/edm network to a jdiffsample checkpoint at ``dst`` (torch not needed).

    ``src``: an EDM snapshot pickle (``network-snapshot-*.pkl``, ``edm-*.pkl``: class and kwargs are
    read from it, never executing its embedded source) or a ``torch.save`` state dict (then
    ``kwargs`` is required). ``kwargs``: ``{"class_name": ..., "kwargs": {...}}`` (a dict or JSON
    file, like the fixtures' ``config.json``); with a pickle its kwargs override the stored ones.
    ``key``: the entry of a wrapped state-dict file (e.g. ``"ema"``).
    """
    import time

    from jdiffsample.nets import checkpoint

    start = time.perf_counter()
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    cfg = checkpoint.read_json(kwargs, "config") if kwargs is not None else None
    if torchfile.file_kind(src) in ("zip", "legacy"):
        if cfg is None:
            raise ValueError(f"{src} is a state_dict file: a config with class_name and kwargs is required "
                             f"(--kwargs JSON_FILE)")
        state_dict = torchfile.load_state_dict(src, key=key)
        class_name, ctor = cfg.get("class_name"), cfg.get("kwargs")
        source = dict(kind="state_dict", file=src.name)
    else:
        class_name, ctor, state_dict = torchfile.load_edm_pickle(src)
        source = dict(kind="edm_pickle", file=src.name)
        if cfg is not None:
            if cfg.get("class_name", class_name) != class_name:
                raise ValueError(f"config class_name {cfg['class_name']!r} disagrees with the pickle's {class_name!r}")
            ctor = {**ctor, **cfg.get("kwargs", {})}
    if not isinstance(class_name, str) or not isinstance(ctor, Mapping):
        raise ValueError("the config needs a 'class_name' string and a 'kwargs' object")
    ctor = torchfile.check_edm_class(class_name, ctor)
    variables = convert_state_dict(class_name, ctor, state_dict)
    tensors = len(state_dict)
    del state_dict  # frees the raw checkpoint before writing
    return checkpoint.save_converted(dst, "edm", class_name, ctor, variables, tensors=tensors, started=start,
                                     extra=dict(source=source), overwrite=overwrite)


def _convert_arguments(parser) -> None:
    parser.add_argument("--kwargs", metavar="JSON_FILE",
                        help='{"class_name": ..., "kwargs": {...}} (required for a state_dict .pt)')
    parser.add_argument("--key", help="entry of a wrapped state_dict file (e.g. ema)")


def _schedule_info(class_name: str, kwargs: Mapping[str, Any], extra) -> dict:
    """EDM's sampling range: generate.py's [0.002, 80] clipped to the network's own range."""
    module = build(class_name, kwargs)
    lo, hi = float(module.sigma_min), float(module.sigma_max)
    return dict(type="VE", sigma_min=max(SIGMA_MIN, lo), sigma_max=min(SIGMA_MAX, hi))


def ve_schedule(info: Mapping[str, Any]):
    """The VE schedule of a config's ``{"type": "VE", "sigma_min", "sigma_max"}``."""
    from jdiffsample import schedules

    if info.get("type") != "VE":
        raise ValueError(f"EDM-style networks sample on a VE schedule, the config says {info.get('type')!r}")
    return schedules.VE(sigma_min=float(info.get("sigma_min", SIGMA_MIN)),
                        sigma_max=float(info.get("sigma_max", SIGMA_MAX)))


def denoise(module, variables, x, t, labels, schedule):
    """D(x; sigma) with t = sigma (VE) and one-hot labels; -1 (or None) gives the original's
    all-zero labels. The same call serves EDM2's preconditioned networks."""
    onehot = None if labels is None else jax.nn.one_hot(labels, module.label_dim, dtype=jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return module.apply(variables, x, sigma, onehot)


FAMILY = family.Family(
    name="edm", description="NVlabs/edm networks (SongUNet DDPM++/NCSN++, DhariwalUNet; VP/VE/iDDPM/EDM precond)",
    build=lambda class_name, kwargs, dtype=jnp.float32: build(class_name, kwargs, dtype=dtype),
    example_inputs=example_inputs, convert=convert, convert_arguments=_convert_arguments,
    schedule_info=_schedule_info, schedule=ve_schedule, denoise=denoise,
    sample_shape=lambda m: (m.img_resolution, m.img_resolution, m.img_channels),
    num_classes=lambda m: int(m.label_dim), skip_tuning=True,
    # the all-zero label is the unconditional model only if training dropped labels
    has_null_label=lambda m: bool(m.label_dim) and float(m.model_kwargs.get("label_dropout", 0)) > 0,
)

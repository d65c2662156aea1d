"""The magnitude-preserving ``UNet`` of NVlabs/edm2 (Karras et al., 2024) in Flax, with its primitives
(``normalize``, ``mp_silu``, ``mp_sum``, ``mp_cat``, ``MPConv``, ``MPFourier``) and ``Block``; the
preconditioner, the converters and the family are in :mod:`jdiffsample.nets.edm2`, which documents
the variables, Skip-Tuning and precision."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets.layers import NHWC, attention, downsample, skip_variables, upsample

__all__ = ["MPConv", "MPFourier", "Block", "BlockKwargs", "UNet", "normalize", "mp_silu", "mp_sum", "mp_cat"]

Dtype = Any


# ----------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.


def normalize(x: jax.Array, axes: Sequence[int], eps: float = 1e-4) -> jax.Array:
    """``x / (eps + |x| / sqrt(n))`` with the norm over ``axes`` (``n`` elements), computed in
    float32 and returned in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    n = math.prod(x.shape[a] for a in axes)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=tuple(axes), keepdims=True))
    return (xf / (eps + norm * math.sqrt(1 / n))).astype(x.dtype)


def mp_silu(x: jax.Array) -> jax.Array:
    """SiLU scaled to unit magnitude for unit-normal input: ``silu(x) / 0.596``."""
    return jax.nn.silu(x) / 0.596


def _lerp(a: jax.Array, b: jax.Array, t: float) -> jax.Array:
    """``a + t (b - a)``, evaluated from the nearer end as ``torch.lerp`` does."""
    return a + t * (b - a) if t < 0.5 else b - (b - a) * (1 - t)


def mp_sum(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """Magnitude-preserving weighted sum ``lerp(a, b, t) / sqrt((1 - t)^2 + t^2)``."""
    return _lerp(a, b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """Magnitude-preserving channel concatenation: ``[wa a, wb b]`` with
    ``wa = C (1 - t) / sqrt(Na)``, ``wb = C t / sqrt(Nb)``, ``C = sqrt((Na + Nb) / ((1-t)^2 + t^2))``."""
    na, nb = a.shape[-1], b.shape[-1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return jnp.concatenate([c / math.sqrt(na) * (1 - t) * a, c / math.sqrt(nb) * t * b], axis=-1)


class MPFourier(nn.Module):
    """Fourier features ``sqrt(2) cos(x freqs + phases)`` with fixed random ``freqs``/``phases``."""

    num_channels: int
    bandwidth: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        freqs = self.param("freqs", nn.initializers.normal(2 * np.pi * self.bandwidth),
                           (self.num_channels,))
        phases = self.param("phases", nn.initializers.uniform(2 * np.pi), (self.num_channels,))
        y = jnp.outer(x.astype(jnp.float32), jax.lax.stop_gradient(freqs).astype(jnp.float32))
        return jnp.cos(y + jax.lax.stop_gradient(phases).astype(jnp.float32)) * math.sqrt(2)


class MPConv(nn.Module):
    """Weight-normalised convolution (``kernel`` x ``kernel``, 'same' padding) or, with
    ``kernel=0``, linear layer, without bias; ``__call__(x, gain=1)``."""

    features: int
    kernel: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gain: float | jax.Array = 1.0) -> jax.Array:
        k, cin = self.kernel, x.shape[-1]
        shape = (k, k, cin, self.features) if k else (cin, self.features)
        w = self.param("kernel", nn.initializers.normal(1.0), shape).astype(jnp.float32)
        fan_in = w.size // self.features
        w = normalize(w, axes=range(w.ndim - 1))
        w = (w * (gain / math.sqrt(fan_in))).astype(self.dtype)
        x = x.astype(self.dtype)
        if not k:
            return x @ w
        if k == 1:
            return x @ w[0, 0]  # a 1x1 convolution; XLA:CPU runs the matmul ~2x faster
        return jax.lax.conv_general_dilated(x, w, (1, 1), [(k // 2, k // 2)] * 2,
                                            dimension_numbers=NHWC)


# ----------------------------------------------------------------------------------------------
# Blocks and the UNet.


@dataclasses.dataclass(frozen=True)
class BlockKwargs:
    """The original ``**block_kwargs`` shared by every UNet block."""

    resample_filter: tuple[int, ...] = (1, 1)
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256


class Block(nn.Module):
    """EDM2 encoder (``flavor='enc'``) or decoder (``'dec'``) block: resample, (enc) 1x1 projection
    and pixel norm, residual branch modulated by the embedding, (dec) 1x1 projection, ``mp_sum``,
    optional cosine self-attention, activation clipping. Submodule names follow the original."""

    out_channels: int
    flavor: str
    resample_mode: str = "keep"
    attention: bool = False
    kw: BlockKwargs = BlockKwargs()
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        kw, out = self.kw, self.out_channels
        project = x.shape[-1] != out
        x = x.astype(self.dtype)
        if self.resample_mode == "down":
            x = downsample(x, kw.resample_filter, padding=(len(kw.resample_filter) - 1) // 2)
        elif self.resample_mode == "up":
            x = upsample(x, kw.resample_filter)
        if self.flavor == "enc":
            if project:
                x = self._conv(out, 1, "conv_skip")(x)
            x = normalize(x, axes=(-1,))  # pixel norm

        y = self._conv(out, 3, "conv_res0")(mp_silu(x))
        gain = self.param("emb_gain", nn.initializers.zeros, ()).astype(jnp.float32)
        c = MPConv(out, 0, dtype=jnp.float32, name="emb_linear")(emb, gain=gain) + 1
        y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
        y = nn.Dropout(kw.dropout)(y, deterministic=self.deterministic)
        y = self._conv(out, 3, "conv_res1")(y)
        if self.flavor == "dec" and project:
            x = self._conv(out, 1, "conv_skip")(x)
        x = mp_sum(x, y, t=kw.res_balance)

        heads = out // kw.channels_per_head if self.attention else 0
        if heads:
            x = mp_sum(x, self._attention(x, heads), t=kw.attn_balance)
        if kw.clip_act is not None:
            x = jnp.clip(x, -kw.clip_act, kw.clip_act)
        return x

    def _conv(self, features: int, kernel: int, name: str) -> MPConv:
        return MPConv(features, kernel, dtype=self.dtype, name=name)

    def _attention(self, x: jax.Array, heads: int) -> jax.Array:
        """Cosine self-attention over all pixels; the qkv channels are interleaved as
        ``(head * ch + c) * 3 + {0: q, 1: k, 2: v}``, as in the original."""
        b, h, w, c = x.shape
        ch = c // heads
        qkv = self._conv(3 * c, 1, "attn_qkv")(x)
        # -> [q/k/v, batch, head, pixel, channel], then the pixel norm of q, k, v per head
        qkv = normalize(qkv.reshape(b, h * w, heads, ch, 3).transpose(4, 0, 2, 1, 3), axes=(4,))
        q, k, v = qkv
        y = attention(q, k / math.sqrt(ch), v).reshape(b, h, w, c)
        return self._conv(c, 1, "attn_proj")(y)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One entry of the original ``enc`` / ``dec`` ModuleDicts (``kind``: 'conv' or 'block')."""

    name: str
    kind: str
    out_channels: int
    resample_mode: str = "keep"
    attention: bool = False
    takes_skip: bool = False


def _layers(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions):
    """The encoder and decoder entries, in the original order."""
    enc, dec = [], []
    cout = 0
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            enc.append(_Layer(f"{res}x{res}_conv", "conv", model_channels * mult))
        else:
            enc.append(_Layer(f"{res}x{res}_down", "block", cout, resample_mode="down"))
        cout = model_channels * mult
        for idx in range(num_blocks):
            enc.append(_Layer(f"{res}x{res}_block{idx}", "block", cout,
                              attention=res in attn_resolutions))
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec.append(_Layer(f"{res}x{res}_in0", "block", cout, attention=True))
            dec.append(_Layer(f"{res}x{res}_in1", "block", cout))
        else:
            dec.append(_Layer(f"{res}x{res}_up", "block", cout, resample_mode="up"))
        cout = model_channels * mult
        for idx in range(num_blocks + 1):
            dec.append(_Layer(f"{res}x{res}_block{idx}", "block", cout,
                              attention=res in attn_resolutions, takes_skip=True))
    return tuple(enc), tuple(dec)


class _Encoder(nn.Module):
    """The original ``enc`` ModuleDict; returns the main path and every layer's output."""

    layers: tuple[_Layer, ...]
    kw: BlockKwargs
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, emb):
        skips = []
        for layer in self.layers:
            if layer.kind == "conv":
                x = MPConv(layer.out_channels, 3, dtype=self.dtype, name=layer.name)(x)
            else:
                x = Block(layer.out_channels, "enc", layer.resample_mode, layer.attention, self.kw,
                          self.dtype, self.deterministic, name=layer.name)(x, emb)
            skips.append(x)
        return x, skips


class _Decoder(nn.Module):
    """The original ``dec`` ModuleDict: ``mp_cat`` of the scaled skips, then the blocks."""

    layers: tuple[_Layer, ...]
    kw: BlockKwargs
    concat_balance: float
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, emb, skips, skip_scales):
        skips, scales = list(skips), iter(skip_scales)
        for layer in self.layers:
            if layer.takes_skip:
                skip = (next(scales) * skips.pop()).astype(x.dtype)
                x = mp_cat(x, skip, t=self.concat_balance)
            x = Block(layer.out_channels, "dec", layer.resample_mode, layer.attention, self.kw,
                      self.dtype, self.deterministic, name=layer.name)(x, emb)
        return x


class UNet(nn.Module):
    """The EDM2 magnitude-preserving UNet, NHWC.

    Attributes are the original constructor arguments (``**block_kwargs`` as the fields of
    :class:`BlockKwargs`), plus ``dtype`` and ``deterministic``.
    ``__call__(x, noise_labels, class_labels=None, skip_scales=None)`` returns ``F`` in ``dtype``;
    without ``skip_scales`` the UNet owns the ``"skip"`` variables.
    """

    img_resolution: int
    img_channels: int
    label_dim: int
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    resample_filter: tuple[int, ...] = (1, 1)
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @property
    def layers(self) -> tuple[tuple[_Layer, ...], tuple[_Layer, ...]]:
        """The encoder and decoder entries (validates the layout kwargs)."""
        if not self.channel_mult or min(self.channel_mult) < 1 or self.model_channels < 1:
            raise ValueError(f"UNet: model_channels={self.model_channels} and channel_mult="
                             f"{tuple(self.channel_mult)} must be positive and non-empty")
        if self.img_resolution % (1 << (len(self.channel_mult) - 1)):
            raise ValueError(f"UNet: img_resolution={self.img_resolution} must be divisible by "
                             f"2**{len(self.channel_mult) - 1} for {len(self.channel_mult)} levels")
        if len(self.resample_filter) % 2:
            raise ValueError(f"UNet: resample_filter={tuple(self.resample_filter)} must have an "
                             "even length")
        return _layers(self.img_resolution, self.model_channels, tuple(self.channel_mult),
                       self.num_blocks, tuple(self.attn_resolutions))

    @property
    def skip_names(self) -> tuple[str, ...]:
        """Keys of ``variables["skip"]``, in the order the decoder consumes the skips."""
        consumers = [layer.name for layer in self.layers[1] if layer.takes_skip]
        return tuple(f"{j:02d}_{name}" for j, name in enumerate(consumers))

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, skip_scales=None):
        enc_layers, dec_layers = self.layers
        cblock = [self.model_channels * m for m in self.channel_mult]
        cnoise = (self.model_channels * self.channel_mult_noise
                  if self.channel_mult_noise is not None else cblock[0])
        cemb = (self.model_channels * self.channel_mult_emb
                if self.channel_mult_emb is not None else max(cblock))
        # The block kwargs are the UNet's fields of the same names (the original passes them through).
        kw = BlockKwargs(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BlockKwargs)})
        kw = dataclasses.replace(kw, resample_filter=tuple(kw.resample_filter))
        if skip_scales is None:
            skip_scales = skip_variables(self, self.skip_names)

        # Embedding (float32): Fourier noise features, plus the labels scaled by sqrt(label_dim).
        emb = MPConv(cemb, 0, name="emb_noise")(MPFourier(cnoise, name="emb_fourier")(noise_labels))
        if self.label_dim:
            if class_labels is None:
                raise ValueError(f"UNet has label_dim={self.label_dim}: class_labels are required")
            labels = jnp.asarray(class_labels, jnp.float32) * math.sqrt(self.label_dim)
            emb = mp_sum(emb, MPConv(cemb, 0, name="emb_label")(labels), t=self.label_balance)
        emb = mp_silu(emb)

        x = x.astype(self.dtype)
        x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
        x, skips = _Encoder(enc_layers, kw, self.dtype, self.deterministic, name="enc")(x, emb)
        x = _Decoder(dec_layers, kw, self.concat_balance, self.dtype, self.deterministic,
                     name="dec")(x, emb, skips, skip_scales)
        gain = self.param("out_gain", nn.initializers.zeros, ()).astype(jnp.float32)
        return MPConv(self.img_channels, 3, dtype=self.dtype, name="out_conv")(x, gain=gain)



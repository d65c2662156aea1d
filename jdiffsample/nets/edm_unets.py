"""The UNets of NVlabs/edm (Karras et al., 2022) in Flax: ``SongUNet`` (DDPM++ / NCSN++) and
``DhariwalUNet`` (ADM), with their ``UNetBlock``; the preconditioners that wrap them, the converter
and the family are in :mod:`jdiffsample.nets.edm`, which documents the variables and Skip-Tuning."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets.layers import Conv2d, GroupNorm, attention, positional_embedding, skip_variables

__all__ = ["UNetBlock", "UNet", "SongUNet", "DhariwalUNet", "FourierEmbedding", "UNETS"]

Dtype = Any


# ----------------------------------------------------------------------------------------------
# Layers.


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


class UNet(nn.Module):
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


class SongUNet(UNet):
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


class DhariwalUNet(UNet):
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


UNETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}



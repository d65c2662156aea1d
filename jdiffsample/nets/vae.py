"""Flax port of diffusers' ``AutoencoderKL``: the Stable Diffusion VAE (SD 1.x/2.x, SDXL, and the
latent space of DiT and EDM2), NHWC.

Written from the architecture; reproduces ``vae.decode(z).sample`` and
``vae.encode(x).latent_dist`` of diffusers once the weights are converted::

    config, state_dict = load_folder("sd-vae-ft-mse")          # config.json + weights, no torch
    module = build("AutoencoderKL", config)                     # dtype=jnp.bfloat16 optional
    variables = convert_state_dict("AutoencoderKL", config, state_dict)
    images = module.apply(variables, latents, method="decode")  # raw output, [-1, 1] for SD
    mean = module.apply(variables, images, method="encode")     # posterior mean
    mean, logvar = module.apply(variables, images, method="posterior")

Everything is NHWC float32 in and out. ``decode`` takes the raw latents: undo the diffusion
model's scaling first (``latents / scaling_factor + shift_factor``; ``scaling_factor``,
``shift_factor``, ``latents_mean``, ``latents_std``, ``force_upcast`` and ``sample_size`` are kept
on the module, unused by the forward pass). ``sample_latents`` draws from the posterior.

Architecture. Encoder: ``conv_in``; one ``DownEncoderBlock2D`` per entry of
``block_out_channels`` (``layers_per_block`` ResNets, then a stride-2 conv after the (0, 1, 0, 1)
pad, except in the last block); a mid block (ResNet, single-head self-attention with group norm
and residual, ResNet; without the attention when ``mid_block_add_attention`` is false); group norm,
SiLU, ``conv_out`` to ``2 * latent_channels`` (mean, log-variance clamped to [-30, 20]), then
``quant_conv``. Decoder: ``post_quant_conv``, ``conv_in``, the mid block, ``UpDecoderBlock2D``s in
reverse channel order (``layers_per_block + 1`` ResNets, then nearest x2 and a conv, except in the
last block), group norm, SiLU, ``conv_out``. All ResNets and norms: ``norm_num_groups`` groups,
eps 1e-6.

Variables: ``{"params": ...}`` mirroring the diffusers module tree (no long skips, so no
Skip-Tuning collection); ``encoder.down_blocks.0.resnets.1.conv1.weight`` is the Flax path
``encoder/down_blocks_0/resnets_1/conv1/kernel``. Old checkpoints name the attention layers
``query``/``key``/``value``/``proj_attn``; :func:`convert_state_dict` renames them as diffusers'
loader does.

Precision: ``dtype`` is the compute type of the convolutions and linear layers; group norms and
the attention softmax compute in float32; outputs are float32. On GPUs, float32 convolutions
default to TF32; use ``jax.default_matmul_precision("highest")`` for a float32-exact match.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets import family
from jdiffsample.nets.formats import checkpoint, diffusers_folder, statedict
from jdiffsample.nets.diffusers_blocks import (LAYOUT, Attention, Downsample2D, ResnetBlock2D,
                                               Upsample2D, conv2d, group_norm)

__all__ = ["AutoencoderKL", "Encoder", "Decoder", "build", "example_inputs", "convert_state_dict",
           "load_folder", "sample_latents", "CLASS_NAMES"]

Dtype = Any
CLASS_NAMES = ("AutoencoderKL",)
_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)
# config.json entries that describe the file, not the network.
_METADATA = ("_class_name", "_diffusers_version", "_name_or_path")
_ACTIVATIONS = ("silu", "swish")  # both are SiLU in diffusers


class _MidBlock(nn.Module):
    """``UNetMidBlock2D`` without time embedding: ResNet, [attention], ResNet."""

    groups: int
    attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = dict(groups=self.groups, eps=_EPS, dtype=self.dtype)
        x = ResnetBlock2D(**block, name="resnets_0")(x)
        if self.attention:
            x = Attention(heads=1, norm_num_groups=self.groups, eps=_EPS, use_bias=True,
                          residual_connection=True, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(**block, name="resnets_1")(x)


class _ResnetStack(nn.Module):
    """``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: ``num_layers`` ResNets, then the padded
    stride-2 conv (``resample='down'``) or nearest x2 and a conv (``'up'``), if any."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=_EPS, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers VAE ``Encoder`` (``double_z``): images NHWC -> ``2 * latent_channels`` moments."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    mid_block_add_attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, groups = self.block_out_channels, self.norm_num_groups
        x = conv2d(channels[0], "conv_in", self.dtype)(x.astype(self.dtype))
        for i, ch in enumerate(channels):
            resample = "down" if i < len(channels) - 1 else None
            x = _ResnetStack(ch, self.layers_per_block, groups, resample, self.dtype, name=f"down_blocks_{i}")(x)
        x = _MidBlock(groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(x, groups, _EPS, "conv_norm_out"))
        return conv2d(2 * self.latent_channels, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """diffusers VAE ``Decoder`` (group norm): latents NHWC -> ``out_channels`` images."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    norm_num_groups: int
    mid_block_add_attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        channels, groups = self.block_out_channels[::-1], self.norm_num_groups
        x = conv2d(channels[0], "conv_in", self.dtype)(z.astype(self.dtype))
        x = _MidBlock(groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(channels):
            resample = "up" if i < len(channels) - 1 else None
            x = _ResnetStack(ch, self.layers_per_block + 1, groups, resample, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(x, groups, _EPS, "conv_norm_out"))
        return conv2d(self.out_channels, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL`` with its constructor arguments (see the module docstring).

    Methods (``module.apply(variables, x, method=...)``), all NHWC float32:
    ``decode(latents)`` -> images; ``encode(images)`` -> posterior mean;
    ``posterior(images)`` -> ``(mean, logvar)``; ``__call__(images)`` = ``decode(encode(images))``
    (diffusers' forward without sampling; :func:`example_inputs` initialises every parameter).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check(self)
        super().__post_init__()

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                      mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv2d(2 * self.latent_channels, None, self.dtype, kernel=1)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv2d(self.latent_channels, None, self.dtype, kernel=1)

    def posterior(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The diagonal Gaussian posterior of ``images``: ``(mean, logvar)``, ``[B, h, w, latent]``."""
        moments = self.encoder(images)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def encode(self, images: jax.Array) -> jax.Array:
        """The posterior mean of ``images`` (what ``latent_dist.mean`` / ``.mode()`` give)."""
        return self.posterior(images)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images from raw (unscaled) latents."""
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images))


def sample_latents(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the posterior: ``mean + exp(logvar / 2) * N(0, I)``."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def _check(m: AutoencoderKL) -> None:
    """One-line ``ValueError`` for constructor arguments this port does not support."""
    n = len(m.block_out_channels)
    if n == 0:
        raise ValueError("AutoencoderKL: block_out_channels is empty")
    if m.act_fn not in _ACTIVATIONS:
        raise ValueError(f"AutoencoderKL: act_fn {m.act_fn!r} is not supported; only 'silu' (alias 'swish')")
    for field, allowed in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(getattr(m, field))
        if len(types) != n or set(types) != {allowed}:
            raise ValueError(f"AutoencoderKL: {field} {list(types)} is not supported; it must be "
                             f"{allowed!r} once per block_out_channels entry ({n})")
    bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad:
        raise ValueError(f"AutoencoderKL: block_out_channels {list(m.block_out_channels)} are not all "
                         f"divisible by norm_num_groups={m.norm_num_groups}")
    if m.layers_per_block < 1:
        raise ValueError(f"AutoencoderKL: layers_per_block must be >= 1, got {m.layers_per_block}")


def _hashable(value: Any) -> Any:
    """JSON lists -> tuples, so that the module stays hashable."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> AutoencoderKL:
    """The module for a diffusers ``config.json`` dict (its ``_class_name``, ``_diffusers_version``
    and ``_name_or_path`` entries are ignored); ``ValueError`` for anything unsupported."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unsupported VAE class {class_name!r}; supported: {', '.join(CLASS_NAMES)}")
    fields = {f.name for f in dataclasses.fields(AutoencoderKL)} - {"dtype", "parent", "name"}
    config = {k: v for k, v in kwargs.items() if k not in _METADATA}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"AutoencoderKL: unsupported config entries {unknown}; supported: {sorted(fields)}")
    return AutoencoderKL(**{k: _hashable(v) for k, v in config.items()}, dtype=dtype)


def example_inputs(module: AutoencoderKL) -> tuple:
    """Images for ``module.init``: the smallest size with a 2x2 latent."""
    size = 2 ** len(module.block_out_channels)
    return (jnp.zeros((1, size, size, module.in_channels), jnp.float32),)


_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``attentions.N.{query,key,value,proj_attn}`` -> ``attentions.N.{to_q,to_k,to_v,to_out.0}``."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_ATTENTION.match(key)
        out[f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key] = value
    return out


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any],
                       state_dict: Mapping[str, Any]) -> dict:
    """Flax ``{"params": ...}`` (float32 NumPy) from a diffusers ``AutoencoderKL`` state dict.

    Strict (:func:`statedict.match`): missing and unexpected keys and shape mismatches raise one
    ``ValueError`` naming them. Old-style attention names are renamed first; a state dict holding
    both the old and the new name of a tensor is refused (the old one is unexpected).
    """
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    renamed = _rename_legacy(state_dict)
    if len(renamed) < len(state_dict):  # an old and a new name of the same tensor
        renamed = dict(state_dict)
    return statedict.match(abstract, renamed, layout=LAYOUT, what=class_name)


def load_folder(path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, state_dict)`` of a diffusers ``AutoencoderKL`` folder (a pipeline's ``vae/``):
    ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``, or the ``.fp16``
    variants; see :mod:`jdiffsample.nets.formats.diffusers_folder`)."""
    config = diffusers_folder.read_config(path)
    name = config.get("_class_name", "AutoencoderKL")
    if name not in CLASS_NAMES:
        raise ValueError(f"{path}: config.json is for {name!r}, not AutoencoderKL")
    return config, diffusers_folder.read_weights(path)


# ----------------------------------------------------------------------------------------------
# The family: conversion (the VAE is not a diffusion model; latent models decode with it).


def convert(src, dst, *, overwrite: bool = False) -> dict:
    """Convert a diffusers ``AutoencoderKL`` folder (``config.json`` + weights) to ``dst``."""
    start = time.perf_counter()
    if not Path(src).is_dir():
        raise ValueError(f"{src}: not a folder (a diffusers AutoencoderKL folder holds config.json and the weights)")
    checkpoint.check_destination(dst, overwrite, sources=[src])
    config, state_dict = load_folder(src)
    kwargs = {k: v for k, v in config.items() if k not in _METADATA}
    variables = convert_state_dict("AutoencoderKL", kwargs, state_dict)
    tensors = len(state_dict)
    del state_dict
    return checkpoint.save_converted(dst, "vae", "AutoencoderKL", kwargs, variables, tensors=tensors, started=start,
                                     extra=dict(source=dict(kind="diffusers", folder=Path(src).name)),
                                     overwrite=overwrite, sources=[src])


FAMILY = family.Family(
    name="vae", description="diffusers AutoencoderKL (the Stable Diffusion VAE that DiT, EDM2 and SD decode with)",
    build=build, example_inputs=example_inputs, conversion=family.Conversion(convert),
)

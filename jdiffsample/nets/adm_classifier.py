"""Flax port of guided-diffusion's noisy-image classifier ``EncoderUNetModel`` (Dhariwal & Nichol, 2021).

The classifier of classifier guidance: the encoder and middle block of the ADM UNet (the blocks of
:mod:`jdiffsample.nets.adm`), then a pooling head that gives class logits for a noisy image
``x_t`` at timestep ``t``. NHWC; with weights converted by :func:`convert_state_dict` it
reproduces ``classifier(x, timesteps)`` of the PyTorch original::

    kwargs = PRESETS["256x256"]
    variables = convert_state_dict("EncoderUNetModel", kwargs, state_dict)   # name -> array
    module = build("EncoderUNetModel", kwargs)
    logits = module.apply(variables, x_nhwc, timesteps)                      # [B, 1000]
    grad = grad_log_prob(module, variables, x_nhwc, timesteps, labels)       # the guidance gradient

Pooling heads (``pool``): ``"adaptive"`` (norm, SiLU, spatial mean, 1x1 conv), ``"attention"``
(norm, SiLU, :class:`AttentionPool2d`: the released classifiers), ``"spatial"`` and
``"spatial_v2"`` (an MLP on the spatial means of every input block's and the middle block's
output; v2 with a group norm and SiLU instead of ReLU).

Differences from the original, all deliberate: inference only (``dropout``, ``use_checkpoint``
and ``num_heads_upsample`` are recorded and have no effect); precision is the attribute ``dtype``
(``use_fp16`` is only recorded): as in the original fp16 mode it applies to the input and middle
blocks, while the time embedding and the pooling head stay float32, group norms and softmax
compute in float32 and the logits are float32. :class:`AttentionPool2d` computes only the query of
the mean token, the one output the original keeps. Not a diffusion model: the family converts and
loads it, and :func:`grad_log_prob` gives what classifier guidance adds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets import adm, family
from jdiffsample.nets.formats import statedict
from jdiffsample.nets.adm import AttentionBlock, ResBlock, timestep_embedding

__all__ = ["PRESETS", "POOLS", "EncoderUNetModel", "AttentionPool2d", "build", "example_inputs", "LAYOUT",
           "convert_state_dict", "grad_log_prob", "convert", "FAMILY"]

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
_SPATIAL_WIDTH = 2048  # hidden width of the spatial heads' MLP

_CHANNEL_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4), 512: (0.5, 1, 1, 2, 2, 4, 4)}


def _preset(image_size: int, depth: int) -> dict[str, Any]:
    """``create_classifier``'s kwargs with the ``classifier_defaults`` flags (width 128, attention
    at 32, 16 and 8 pixels, 64 channels per head, scale-shift norm, resblock up/down, attention
    pooling, 1000 classes); legacy qkv order in the attention blocks."""
    return dict(image_size=image_size, in_channels=3, model_channels=128, out_channels=1000,
                num_res_blocks=depth, attention_resolutions=tuple(image_size // r for r in (32, 16, 8)),
                dropout=0.0, channel_mult=_CHANNEL_MULT[image_size], conv_resample=True, dims=2,
                use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=64, num_heads_upsample=-1,
                use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
                pool="attention")


#: ``EncoderUNetModel`` kwargs of the released classifiers (``NxN_classifier.pt``): depth 2, but
#: 4 for 64x64 (the README's ``--classifier_depth 4``).
PRESETS: dict[str, dict[str, Any]] = {
    "64x64": _preset(64, 4),
    "128x128": _preset(128, 2),
    "256x256": _preset(256, 2),
    "512x512": _preset(512, 2),
}


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling of a [B, H, W, C] map to [B, out_features].

    The tokens are the spatial mean followed by the H*W positions, plus a learned positional
    embedding ``[spatial_dim**2 + 1, C]``; multi-head attention (``C // num_head_channels``
    heads, qkv channels laid out as ``QKVAttention``: j*C + h*c_h + c) with the mean token as
    the only query; ``c_proj`` maps its output to ``out_features``. ``qkv_proj`` and ``c_proj``
    are the original's 1x1 Conv1d layers.
    """

    spatial_dim: int
    num_head_channels: int
    out_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        if hgt * wid != self.spatial_dim ** 2:
            raise ValueError(f"attention pooling was built for a {self.spatial_dim}x{self.spatial_dim} feature "
                             f"map (the model's image_size), got {hgt}x{wid}")
        heads, ch = c // self.num_head_channels, self.num_head_channels
        tokens = x.reshape(b, hgt * wid, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        pos = self.param("positional_embedding", lambda key, shape: jax.random.normal(key, shape) / math.sqrt(c),
                         (hgt * wid + 1, c))
        qkv = nn.Dense(3 * c, name="qkv_proj")(tokens + pos)
        q, k, v = (a.reshape(b, -1, heads, ch) for a in jnp.split(qkv, 3, axis=-1))
        scale = 1 / math.sqrt(math.sqrt(ch))  # on q and k separately, as the original
        weights = jax.nn.softmax(jnp.einsum("bhc,bshc->bhs", q[:, 0] * scale, k * scale), axis=-1)
        pooled = jnp.einsum("bhs,bshc->bhc", weights, v).reshape(b, c)
        return nn.Dense(self.out_features, name="c_proj")(pooled)


class EncoderUNetModel(nn.Module):
    """guided-diffusion ``EncoderUNetModel`` (NHWC), with the original constructor arguments.

    Call as ``module.apply(variables, x, timesteps)``: ``x`` [B, H, W, in_channels] (H = W =
    ``image_size`` for attention pooling), ``timesteps`` [B] or a scalar (the original's integer
    indices 0..T-1). Returns float32 logits [B, out_channels].

    ``attention_resolutions`` are downsample rates (``image_size // resolution``), as in the
    original. ``dims`` must be 2; ``num_head_channels`` must be set for attention pooling.
    ``variables`` hold ``"params"`` only (no long skips).
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    pool: str = "adaptive"
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dims != 2:
            raise ValueError(f"only dims=2 is supported, got dims={self.dims}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {', '.join(POOLS)}")
        if self.pool == "attention":
            width = int(self.channel_mult[-1] * self.model_channels)
            if self.num_head_channels < 1 or width % self.num_head_channels:
                raise ValueError(f"attention pooling needs num_head_channels dividing the final width {width}, "
                                 f"got {self.num_head_channels}")
        super().__post_init__()

    def _attention(self, name: str) -> AttentionBlock:
        return AttentionBlock(num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                              use_new_attention_order=self.use_new_attention_order, dtype=self.dtype, name=name)

    def _resblock(self, out_channels: int, name: str, **updown: bool) -> ResBlock:
        return ResBlock(out_channels, self.use_scale_shift_norm, dtype=self.dtype, name=name, **updown)

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be [B, H, W, {self.in_channels}] (NHWC), got shape {x.shape}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), x.shape[:1])
        mc = self.model_channels
        emb = nn.Dense(4 * mc, name="time_embed_0")(timestep_embedding(timesteps, mc))
        emb = nn.Dense(4 * mc, name="time_embed_2")(nn.silu(emb))

        # The UNet's encoder and middle block; `features` are every block's output.
        h, features, ds = adm.encode(self, x, emb, self._attention)
        features.append(h)

        # The head, in float32.
        h = h.astype(jnp.float32)
        if self.pool == "adaptive":
            h = nn.silu(adm.group_norm(h, "out_0")).mean(axis=(1, 2), keepdims=True)
            return adm.conv(self.out_channels, "out_3", jnp.float32, kernel=1)(h)[:, 0, 0]
        if self.pool == "attention":
            h = nn.silu(adm.group_norm(h, "out_0"))
            return AttentionPool2d(self.image_size // ds, self.num_head_channels, self.out_channels, name="out_2")(h)
        means = jnp.concatenate([f.astype(jnp.float32).mean(axis=(1, 2)) for f in features], axis=-1)
        h = nn.Dense(_SPATIAL_WIDTH, name="out_0")(means)
        if self.pool == "spatial":
            return nn.Dense(self.out_channels, name="out_2")(nn.relu(h))
        h = nn.silu(adm.group_norm(h, "out_1"))
        return nn.Dense(self.out_channels, name="out_3")(h)


def grad_log_prob(module: EncoderUNetModel, variables, x: jax.Array, timesteps: jax.Array,
                  y: jax.Array) -> jax.Array:
    """The classifier-guidance gradient ``d/dx sum_i log_softmax(logits_i)[y_i]``, shaped like ``x``.

    ``y``: int labels [B]. Each sample's term depends only on its own ``x_i``, so row i is
    ``grad_x log p(y_i | x_i, t_i)``.
    """
    def total(x):
        logp = jax.nn.log_softmax(module.apply(variables, x, timesteps), axis=-1)
        return jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=-1).sum()

    return jax.grad(total)(x)


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype=jnp.float32) -> EncoderUNetModel:
    """An :class:`EncoderUNetModel` from the original constructor kwargs (JSON lists become tuples)."""
    return adm.construct(EncoderUNetModel, class_name, kwargs, dtype, "ADM classifier")


def example_inputs(module: EncoderUNetModel) -> tuple:
    size = module.image_size
    return jnp.zeros((1, size, size, module.in_channels)), jnp.zeros((1,), jnp.int32)


_CONV1D_MODULES = ("qkv_proj", "c_proj")  # AttentionPool2d's Conv1d layers (the blocks' are in adm.LAYOUT)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "positional_embedding":
        return tuple(shape[::-1])  # [C, HW + 1] in the original
    if path[-1] == "kernel" and len(shape) == 2 and path[-2] in _CONV1D_MODULES:
        return (shape[1], shape[0], 1)
    return adm.LAYOUT.shape(path, shape)


def _to_flax(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    return w.T if path[-1] == "positional_embedding" else adm.LAYOUT.convert(path, w)


#: adm.py's layout plus the attention pool's Conv1d kernels and its transposed positional embedding.
LAYOUT = statedict.Layout(key=adm.LAYOUT.key, shape=_torch_shape, convert=_to_flax)


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
    """Flax ``variables`` ``{"params": ...}`` (float32) from a guided-diffusion classifier state_dict;
    strict (:func:`jdiffsample.nets.formats.statedict.match`)."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    return statedict.match(abstract, state_dict, layout=LAYOUT, what=f"the {class_name} kwargs")


# ----------------------------------------------------------------------------------------------
# The family: conversion only (a classifier, not a diffusion model).


def convert(src, dst, *, preset: str | None = None, config=None, key=None, overwrite: bool = False) -> dict:
    """Convert an openai/guided-diffusion classifier state_dict (``NxN_classifier.pt``) to ``dst``.

    Exactly one of ``preset`` (a name in :data:`PRESETS`) or ``config`` (the constructor kwargs,
    or ``{"class_name": ..., "kwargs": {...}}``, as a dict or JSON file); ``key`` picks the entry of
    a wrapped state dict.
    """
    started = time.perf_counter()
    class_name, kwargs, _, source = adm.released_config(preset, config, presets=PRESETS, class_name="EncoderUNetModel",
                                                        what="ADM classifier")
    build(class_name, kwargs)  # validates the class and the kwargs before the weights are read
    return adm.convert_released(src, dst, family_name="adm-classifier", class_name=class_name, kwargs=kwargs,
                                to_variables=lambda sd: convert_state_dict(class_name, kwargs, sd), key=key,
                                extra=dict(source=source), overwrite=overwrite, started=started)


def _classify(module: EncoderUNetModel, variables, x, t, schedule):
    """Logits at the diffusion model's time ``t``: the classifier sees the timestep the model sees."""
    return module.apply(variables, x, adm.model_steps(x, t, schedule))


FAMILY = family.Family(
    name="adm-classifier",
    description="openai/guided-diffusion EncoderUNetModel: the noisy-image classifier of classifier guidance",
    build=build, example_inputs=example_inputs,
    conversion=family.Conversion(
        convert, lambda p: adm.convert_arguments(p, what="classifier", class_name="EncoderUNetModel",
                                                 presets=PRESETS, diffusion=False)),
    classify=_classify,
    classifier_shape=lambda m: ((m.image_size, m.image_size, m.in_channels), int(m.out_channels)),
)

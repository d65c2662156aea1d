"""Flax port of guided-diffusion's upsampler ``SuperResModel`` (Dhariwal & Nichol, 2021).

The ADM ``UNetModel`` of :mod:`jdiffsample.nets.adm` conditioned on a low-resolution image: the
network resizes ``low_res`` bilinearly to the size of ``x`` and concatenates it to ``x`` along the
channels, so its first convolution sees ``2 * in_channels`` channels. With weights converted by
:func:`convert_state_dict` it reproduces ``model(x, timesteps, low_res=low_res, y=y)``::

    kwargs = PRESETS["64_256"]
    variables = convert_state_dict("SuperResModel", kwargs, state_dict)
    out = build("SuperResModel", kwargs).apply(variables, x, timesteps, low_res=low_res, y=labels)

``in_channels`` is the original constructor argument (3: the channels of ``x`` and of
``low_res``), not the doubled width. Everything else (dtype, Skip-Tuning scales, inference only)
is as in :mod:`jdiffsample.nets.adm`.

As a family (``adm-superres``) it is an epsilon-prediction model on the discrete VP schedule of
its diffusion settings, like ``adm``; its denoiser needs the ``low_res`` image (in [-1, 1], NHWC;
the original sampling script uses the base model's uint8 samples ``/ 127.5 - 1``) and, for the
released class-conditional upsamplers, the labels of the base samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import models
from jdiffsample.nets import adm, family
from jdiffsample.nets.formats import statedict

__all__ = ["PRESETS", "DIFFUSION_PRESETS", "SuperResModel", "resize_bilinear", "build", "example_inputs",
           "convert_state_dict", "denoise", "convert", "FAMILY"]


def _preset(large_size: int, attention_resolutions: tuple[int, ...], **heads) -> dict[str, Any]:
    """``sr_create_model``'s kwargs for the README's upsampler flags (192 channels, 2 res blocks,
    channel_mult (1, 1, 2, 2, 4, 4), scale-shift norm, resblock up/down, fp16, learned sigma,
    1000 classes; legacy qkv order, which ``sr_create_model`` leaves at its default)."""
    return dict(image_size=large_size, in_channels=3, model_channels=192, out_channels=6, num_res_blocks=2,
                attention_resolutions=tuple(large_size // r for r in attention_resolutions), dropout=0.0,
                channel_mult=(1, 1, 2, 2, 4, 4), conv_resample=True, dims=2, num_classes=1000,
                use_checkpoint=False, use_fp16=True, num_heads=4, num_head_channels=-1, num_heads_upsample=-1,
                use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False, **heads)


#: ``SuperResModel`` kwargs of the released upsamplers ``64_256_upsampler.pt`` (attention at 32,
#: 16, 8 pixels, 4 heads) and ``128_512_upsampler.pt`` (attention at 32 and 16 pixels, 64
#: channels per head).
PRESETS: dict[str, dict[str, Any]] = {
    "64_256": _preset(256, (32, 16, 8)),
    "128_512": {**_preset(512, (32, 16)), "num_head_channels": 64},
}

#: Diffusion settings of the released upsamplers (linear betas, 1000 steps, learned sigma).
DIFFUSION_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(diffusion_steps=1000, noise_schedule="linear", learn_sigma=True) for name in PRESETS}


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weight of the second tap of ``F.interpolate(mode="bilinear",
    align_corners=False)`` along one axis: position ``(i + 0.5) * in/out - 0.5``, clamped at 0."""
    pos = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.floor(pos).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """[B, h, w, C] -> [B, height, width, C] as PyTorch's ``F.interpolate(x, (height, width),
    mode="bilinear")``: half-pixel centres (``align_corners=False``), edges clamped, no antialiasing
    (also when shrinking). Separable: first along W, then along H."""
    for axis, size in ((2, width), (1, height)):
        lo, hi, frac = _linear_taps(x.shape[axis], size)
        frac = frac.reshape((-1,) + (1,) * (3 - axis)).astype(x.dtype)
        x = jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac
    return x


class SuperResModel(adm.UNetModel):
    """guided-diffusion ``SuperResModel`` (NHWC), with the original constructor arguments.

    Call as ``module.apply(variables, x, timesteps, low_res=low_res, y=None)``: ``x`` [B, H, W,
    in_channels], ``low_res`` [B, h, w, in_channels] of any size (resized bilinearly to H x W),
    ``timesteps`` and ``y`` as for :class:`jdiffsample.nets.adm.UNetModel`. Returns float32
    [B, H, W, out_channels].
    """

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, low_res: jax.Array | None = None,
                 y: jax.Array | None = None) -> jax.Array:
        if low_res is None:
            raise ValueError("SuperResModel needs the low_res image to upsample")
        if x.ndim != 4 or low_res.ndim != 4 or x.shape[-1] != self.in_channels or low_res.shape[::3] != x.shape[::3]:
            raise ValueError(f"x and low_res must be NHWC with the same batch and {self.in_channels} channels, "
                             f"got {x.shape} and {low_res.shape}")
        upsampled = resize_bilinear(low_res.astype(jnp.float32), x.shape[1], x.shape[2])
        return super().__call__(jnp.concatenate([x.astype(jnp.float32), upsampled], axis=-1), timesteps, y)


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype=jnp.float32) -> SuperResModel:
    """A :class:`SuperResModel` from the original constructor kwargs (JSON lists become tuples)."""
    return adm.construct(SuperResModel, class_name, kwargs, dtype, "ADM upsampler")


def example_inputs(module: SuperResModel) -> tuple:
    size, small, c = module.image_size, max(module.image_size // 4, 1), module.in_channels
    y = None if module.num_classes is None else jnp.zeros((1,), jnp.int32)
    return (jnp.zeros((1, size, size, c)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, small, small, c)), y)


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
    """Flax ``variables`` ``{"params": ..., "skip": ...}`` from a guided-diffusion upsampler
    state_dict (the ``UNetModel`` names and layouts); strict."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    return statedict.match(abstract, state_dict, layout=adm.LAYOUT, what=f"the {class_name} kwargs")


def denoise(module: SuperResModel, variables, x, t, labels, schedule, *, low_res=None):
    """Data prediction of the upsampler at time ``t``: the epsilon half of its output at timestep
    ``schedule.model_time(t)`` (as ``adm``'s denoiser), conditioned on ``low_res`` [B, h, w, C]
    (required) and ``labels`` (int [B], or None for an unconditional upsampler)."""
    if low_res is None:
        raise ValueError("the upsampler's denoiser needs low_res, the image to upsample ([B, h, w, C] in [-1, 1])")
    out = module.apply(variables, x, adm.model_steps(x, t, schedule), low_res=low_res, y=labels)
    return models.x0_from_eps(x, out[..., : module.in_channels], t, schedule)


# ----------------------------------------------------------------------------------------------
# The family: conversion, schedule and (conditioned) denoiser.


def convert(src, dst, *, preset: str | None = None, config=None, key=None, noise_schedule: str | None = None,
            diffusion_steps: int | None = None, overwrite: bool = False) -> dict:
    """Convert an openai/guided-diffusion upsampler state_dict (``64_256_upsampler.pt``, ...) to
    ``dst``; the options are those of :func:`jdiffsample.nets.adm.convert`."""
    return adm.convert_diffusion_model(
        src, dst, family_name="adm-superres", what="ADM upsampler",
        build_checked=lambda class_name, kwargs: adm.check_eps(build(class_name, kwargs)),
        to_variables=convert_state_dict, presets=PRESETS, diffusion_presets=DIFFUSION_PRESETS,
        class_name="SuperResModel", preset=preset, config=config, key=key, noise_schedule=noise_schedule,
        diffusion_steps=diffusion_steps, overwrite=overwrite)


FAMILY = family.Family(
    name="adm-superres",
    description="openai/guided-diffusion SuperResModel upsampler (epsilon prediction, discrete VP schedule; "
                "conditioned on low_res)",
    build=lambda class_name, kwargs, dtype=jnp.float32: adm.check_eps(build(class_name, kwargs, dtype=dtype)),
    example_inputs=example_inputs,
    conversion=family.Conversion(
        convert, lambda p: adm.convert_arguments(p, what="upsampler", class_name="SuperResModel", presets=PRESETS),
        schedule=lambda class_name, kwargs, extra: adm.diffusion_schedule(extra.get("diffusion"))),
    sampling=family.Sampling(
        denoise=denoise, sample_shape=lambda m: (m.image_size, m.image_size, m.in_channels),
        num_classes=lambda m: int(m.num_classes or 0), skip_tuning=True, conditioning=lambda m: ("low_res",)),
)

"""Latent diffusion: how a model's latents become images, through a VAE.

A latent model's ``config.json`` holds a ``latent`` entry (written by its converter)::

    {"vae": "/path/to/vae" or null or "internal", "scale": [..] or null, "bias": [..] or null,
     "range": "[-1,1]" or "[0,1]"}

``"internal"``: the checkpoint holds its own VAE and decodes with its ``decode`` method (Stable
Diffusion, whose ``decode`` undoes the VAE's scaling itself).

and its samples z are decoded as ``vae.decode((z - bias) / scale)``. ``scale``/``bias`` null take the
VAE's own ``scaling_factor``/``shift_factor`` (diffusers' convention, latents = (raw - shift) x
scaling: DiT and Stable Diffusion); EDM2 records its encoder's per-channel ``scale`` and ``bias``.
``range`` is the VAE output's pixel range: SD's [-1, 1], quantized as EDM does, or EDM2's [0, 1],
clamped and scaled by 255 as EDM2's ``StabilityVAEEncoder.decode`` does.

:class:`Decoder` is a pytree (VAE variables, scale and bias traced), decoded inside the sampling
program in the same micro-batches as the sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample.nets.formats import checkpoint

__all__ = ["Decoder", "decoder", "vae_path", "RANGES"]

RANGES = ("[-1,1]", "[0,1]")


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Latents -> uint8 images: ``vae.decode((z - bias) / scale)``, quantized for ``range``."""

    vae: Any            # a jdiffsample.nets.Model of family "vae" (or a model with its own decode)
    scale: Any          # [C]
    bias: Any           # [C]
    range: str = "[-1,1]"
    factor: int = 8     # pixels per latent along each side
    channels: int = 3   # of the images

    def image_shape(self, latent_shape) -> tuple:
        h, w, _ = latent_shape
        return (h * self.factor, w * self.factor, self.channels)

    def pixels(self, z):
        """The VAE's float output for latents ``z`` [B, h, w, C]."""
        raw = (z - self.bias.astype(z.dtype)) / self.scale.astype(z.dtype)
        return self.vae.apply(raw, method="decode").astype(jnp.float32)

    def __call__(self, z):
        y = self.pixels(z)
        if self.range == "[0,1]":
            return jnp.floor(jnp.clip(y, 0.0, 1.0) * 255.0).astype(jnp.uint8)
        return jnp.clip(jnp.floor(y * 127.5 + 128.0), 0, 255).astype(jnp.uint8)


jax.tree_util.register_dataclass(Decoder, data_fields=["vae", "scale", "bias"],
                                 meta_fields=["range", "factor", "channels"])


def decoder(spec: Mapping[str, Any], vae, channels: int) -> Decoder:
    """The :class:`Decoder` of a model's ``latent`` spec with the loaded ``vae`` (a Model; for an
    ``"internal"`` spec the model itself); ``ValueError`` when it does not fit ``channels`` latent
    channels."""
    if spec.get("vae") == "internal" and vae.family != "vae":
        config = vae.kwargs["vae"]
        return Decoder(vae, jnp.ones((channels,)), jnp.zeros((channels,)), spec.get("range", "[-1,1]"),
                       2 ** (len(config["block_out_channels"]) - 1), int(config.get("out_channels", 3)))
    if vae.family != "vae":
        raise ValueError(f"the VAE must be a converted 'vae' network (jdiffsample convert vae), got a {vae.family} one")
    latent_channels = int(vae.kwargs.get("latent_channels", 4))
    if latent_channels != channels:
        raise ValueError(f"the VAE has {latent_channels} latent channels, the model samples {channels}")
    if spec.get("range", "[-1,1]") not in RANGES:
        raise ValueError(f"latent range must be one of {RANGES}, got {spec.get('range')!r}")

    def per_channel(value, default, name):
        v = np.broadcast_to(np.asarray(default if value is None else value, np.float32), (channels,))
        if name == "scale" and np.any(v == 0):
            raise ValueError("the latent scale must be nonzero")
        return jnp.asarray(v)

    scaling = float(vae.kwargs.get("scaling_factor") or 1.0)
    shift = float(vae.kwargs.get("shift_factor") or 0.0)
    scale = per_channel(spec.get("scale"), scaling, "scale")
    bias = per_channel(spec.get("bias"), -shift * scaling, "bias")
    return Decoder(vae, scale, bias, spec.get("range", "[-1,1]"), 2 ** (len(vae.kwargs["block_out_channels"]) - 1),
                   int(vae.kwargs.get("out_channels", 3)))


def vae_path(vae, channels: int) -> str | None:
    """A converted VAE folder (or None), checked to decode ``channels`` latent channels, as the
    absolute path a latent model's config records."""
    if vae is None:
        return None
    path = checkpoint.resolve(vae)
    config = checkpoint.read_config(path)
    if config["family"] != "vae":
        raise ValueError(f"{vae} is a {config['family']} network, not a VAE (jdiffsample convert vae)")
    if int(config["kwargs"].get("latent_channels", 4)) != channels:
        raise ValueError(f"the VAE {vae} has {config['kwargs'].get('latent_channels')} latent channels, "
                         f"the model samples {channels}")
    return str(path)

"""Flax port of the NVlabs/edm2 network (Karras et al., 2024): the magnitude-preserving ``UNet``
and its preconditioner ``Precond``.

Written from the published architecture, laid out NHWC; reproduces ``net(x, sigma, class_labels)``
of the PyTorch original once the weights are converted::

    module = build("Precond", PRESETS["edm2-img512-s"])     # or a pickle's constructor kwargs
    variables = convert_state_dict("Precond", kwargs, state_dict)   # name -> array
    denoised = module.apply(variables, x_nhwc, sigma, class_labels)          # D(x; sigma), f32
    denoised, logvar = module.apply(variables, x_nhwc, sigma, class_labels, return_logvar=True)

``sigma`` is a scalar or ``[B]``; ``class_labels`` are one-hot ``[B, label_dim]`` (all zeros, or
omitted, for the unconditional embedding, as in the original). ``logvar`` is ``[B, 1, 1, 1]``.
Released pickles are read without running their code by :func:`load_pickle`.

The network has no biases and no group norms. Every weight is normalised in the forward pass
(per output channel, ``w / (1e-4 + |w| / sqrt(fan_in))``, then times ``gain / sqrt(fan_in)``), so
weights that were trained with forced weight normalisation and then averaged (the released EMA
weights are not unit-norm) give the original's output. Activations go through the
magnitude-preserving ``mp_silu``, ``mp_sum``, ``mp_cat`` and pixel norm; attention is cosine
attention (q, k, v pixel-normalised).

Variables
---------
``variables["params"]`` mirrors the PyTorch module tree: ``unet.enc.16x16_block0.conv_res0.weight``
is ``unet/enc/16x16_block0/conv_res0/kernel`` (convolutions HWIO, linears ``[in, out]``); the
scalars ``emb_gain`` and ``out_gain`` keep their names. The Fourier-feature buffers ``freqs`` and
``phases`` of ``emb_fourier`` and ``logvar_fourier`` are kept as parameters and never receive
gradients.

Skip-Tuning
-----------
``variables["skip"]`` holds one float32 scalar per long skip, keyed ``f"{j:02d}_{block}"``: ``j``
counts the skips in the order the decoder consumes them (``j = 0`` is the deepest) and ``block``
is the decoder block that consumes it (``00_8x8_block0``, ..., ``15_64x64_block3`` for the
released configurations). The decoder computes ``mp_cat(x, rho_j * skip, t=concat_balance)``;
the scales start at 1.0, which leaves the output bit-identical to the unscaled network.

Precision
---------
``dtype`` (default float32; e.g. ``jnp.bfloat16``) is the compute type of the convolutions,
attention matmuls and activations. As in the original fp16 mode, the noise/label embedding and
each block's ``emb_linear`` run in float32; weight normalisation, pixel norms and the softmax
compute in float32; the outputs are float32. ``use_fp16`` is accepted and recorded but has no
effect. On GPUs float32 convolutions default to TF32; use ``jax.default_matmul_precision("highest")``
for a float32-exact match.

Dropout applies only with ``deterministic=False`` (it needs a ``"dropout"`` rng). The random
initialisation of :meth:`flax.linen.Module.init` gives valid shapes, not a trained network.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from jdiffsample import schedules
from jdiffsample.nets import family
from jdiffsample.nets.edm import denoise
from jdiffsample.nets.formats import checkpoint, statedict, torchfile
from jdiffsample.nets.latent import vae_path
from jdiffsample.nets.edm2_unet import MPConv, MPFourier, UNet
from jdiffsample.nets.layers import skip_variables

__all__ = [
    "PRESETS",
    "ENCODER_DEFAULTS",
    "Precond",
    "build",
    "example_inputs",
    "convert_state_dict",
    "load_pickle",
    "convert",
    "FAMILY",
]

Dtype = Any


def _preset(channels: int, dropout: float, img_channels: int, label_dim: int = 1000) -> dict:
    """Constructor kwargs of a released network (``train_edm2.py`` presets; the UNet defaults
    channel_mult (1, 2, 3, 4), num_blocks 3, attn_resolutions (16, 8) apply)."""
    return dict(img_resolution=64, img_channels=img_channels, label_dim=label_dim, use_fp16=True,
                model_channels=channels, dropout=dropout)


#: The released configurations: ImageNet-512 in the 64x64x4 latent space of the SD VAE
#: (``-uncond``: the unconditional guiding networks) and ImageNet-64 in pixel space.
PRESETS: dict[str, dict[str, Any]] = {
    "edm2-img512-xs": _preset(128, 0.0, 4),
    "edm2-img512-s": _preset(192, 0.0, 4),
    "edm2-img512-m": _preset(256, 0.1, 4),
    "edm2-img512-l": _preset(320, 0.1, 4),
    "edm2-img512-xl": _preset(384, 0.1, 4),
    "edm2-img512-xxl": _preset(448, 0.1, 4),
    "edm2-img512-xs-uncond": _preset(128, 0.0, 4, label_dim=0),
    "edm2-img512-s-uncond": _preset(192, 0.0, 4, label_dim=0),
    "edm2-img64-xs": _preset(128, 0.0, 3),
    "edm2-img64-s": _preset(192, 0.0, 3),
    "edm2-img64-m": _preset(256, 0.1, 3),
    "edm2-img64-l": _preset(320, 0.1, 3),
    "edm2-img64-xl": _preset(384, 0.1, 3),
}


# ----------------------------------------------------------------------------------------------
# Preconditioning.


class Precond(nn.Module):
    """EDM preconditioning around :class:`UNet`, with the uncertainty head ``logvar``.

    ``D(x; sigma) = c_skip x + c_out F(c_in x; log(sigma) / 4)``; ``unet_kwargs`` holds the UNet's
    constructor arguments (the original ``**unet_kwargs``).
    """

    img_resolution: int
    img_channels: int
    label_dim: int
    use_fp16: bool = True
    sigma_data: float = 0.5
    logvar_channels: int = 128
    unet_kwargs: Mapping[str, Any] = FrozenDict()
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    def _unet_kwargs(self) -> dict[str, Any]:
        reserved = {"img_resolution", "img_channels", "label_dim", "dtype", "deterministic",
                    "parent", "name"}
        accepted = {f.name for f in dataclasses.fields(UNet)} - reserved
        unknown = sorted(set(self.unet_kwargs) - accepted)
        if unknown:
            raise ValueError(f"Precond: unsupported kwargs {unknown}; supported: "
                             f"{sorted(accepted | {'use_fp16', 'sigma_data', 'logvar_channels'})}")
        return dict(img_resolution=self.img_resolution, img_channels=self.img_channels,
                    label_dim=self.label_dim, dtype=self.dtype, deterministic=self.deterministic,
                    **self.unet_kwargs)

    @property
    def unet(self) -> UNet:
        """The UNet as a detached module, for inspecting its layout."""
        return UNet(**self._unet_kwargs(), parent=None)

    @property
    def skip_names(self) -> tuple[str, ...]:
        """Keys of ``variables["skip"]``, in the order the decoder consumes the skips."""
        return self.unet.skip_names

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, return_logvar: bool = False):
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = jnp.zeros((1, self.label_dim), jnp.float32)
        else:
            class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim)

        unet = UNet(**self._unet_kwargs(), name="unet")
        scales = skip_variables(self, unet.skip_names)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1 / jnp.sqrt(sd2 + sigma**2)
        c_noise = jnp.broadcast_to(jnp.log(sigma.reshape(-1)) / 4, (x.shape[0],))

        f_x = unet((c_in * x).astype(self.dtype), c_noise, class_labels, skip_scales=scales)
        d_x = c_skip * x + c_out * f_x.astype(jnp.float32)
        logvar = MPConv(1, 0, name="logvar_linear")(
            MPFourier(self.logvar_channels, name="logvar_fourier")(c_noise)).reshape(-1, 1, 1, 1)
        return (d_x, logvar) if return_logvar else d_x


# ----------------------------------------------------------------------------------------------
# Construction and weight conversion.


def _hashable(value: Any) -> Any:
    """JSON lists -> tuples, so that modules stay hashable (usable as static jit arguments)."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> Precond:
    """``Precond`` from the original constructor kwargs (``img_resolution``, ``img_channels``,
    ``label_dim``, ``use_fp16``, ``sigma_data``, ``logvar_channels`` and the UNet's kwargs), e.g.
    a :data:`PRESETS` entry, a fixture's ``config.json`` kwargs or :func:`load_pickle`'s."""
    if class_name != "Precond":
        raise ValueError(f"unsupported EDM2 network class {class_name!r}; supported: Precond")
    missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in kwargs]
    if missing:
        raise ValueError(f"Precond: missing required kwargs {missing}")
    own = {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
           "logvar_channels"}
    module = Precond(**{k: _hashable(v) for k, v in kwargs.items() if k in own},
                     unet_kwargs=FrozenDict({k: _hashable(v) for k, v in kwargs.items()
                                             if k not in own}), dtype=dtype)
    _ = module.skip_names  # validates the UNet kwargs and layout
    return module


def example_inputs(module: Precond) -> tuple:
    """``(x, sigma, class_labels)`` for ``module.init(key, *example_inputs(module))``."""
    x = jnp.zeros((1, module.img_resolution, module.img_resolution, module.img_channels))
    labels = jnp.zeros((1, module.label_dim)) if module.label_dim else None
    return x, jnp.ones((1,)), labels


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any],
                       state_dict: Mapping[str, Any]) -> dict:
    """Flax ``variables`` ``{"params": ..., "skip": ...}`` from an original EDM2 ``state_dict``
    (``unet.enc.64x64_conv.weight``, ...; float16 or float32). Strict (:func:`statedict.match`):
    a missing key, unexpected key or wrong shape raises one ``ValueError`` naming them all.
    Parameters keep the checkpoint's floating dtype (the releases store float16; every weight is
    normalised in float32 before use, as in the original), the Skip-Tuning scales are 1.0."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    return statedict.match(abstract, state_dict, dtype=None, what=f"EDM2 {class_name}("
                           f"model_channels={module.unet.model_channels}, "
                           f"img_resolution={module.img_resolution})")


# ----------------------------------------------------------------------------------------------
# Released pickles.

#: Positional parameters of the original ``Precond`` constructor.
_PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
                 "logvar_channels")

#: Constructor defaults of the original encoders (``training/encoders.py``).
ENCODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "StandardRGBEncoder": {},
    "StabilityVAEEncoder": dict(vae_name="stabilityai/sd-vae-ft-mse",
                                raw_mean=[5.81, 3.25, 0.12, -2.15],
                                raw_std=[4.17, 4.62, 3.71, 3.28],
                                final_mean=0.0, final_std=0.5, batch_size=8),
}


def _init_kwargs(obj: torchfile.PersistentObject, positional: Sequence[str], where: str) -> dict:
    """The recorded constructor arguments of a persistent object, positional ones named."""
    state = obj.state if isinstance(obj.state, Mapping) else {}
    args = list(state.get("_init_args") or ())
    kwargs = state.get("_init_kwargs") or {}
    if len(args) > len(positional) or not isinstance(kwargs, Mapping):
        raise torchfile.CheckpointFormatError(
            f"{where}: {obj.class_name} has malformed constructor arguments")
    try:
        return torchfile.json_value({**dict(zip(positional, args, strict=False)), **dict(kwargs)})
    except TypeError as e:
        raise torchfile.CheckpointFormatError(
            f"{where}: unsupported {obj.class_name} constructor argument ({e})") from None


def _encoder_info(encoder: Any, where: str) -> dict | None:
    """``{"class_name", **constructor kwargs}``; for ``StabilityVAEEncoder`` also the latent
    ``scale`` and ``bias`` it stores (final = raw * scale + bias), checked against the kwargs."""
    if encoder is None:
        return None
    name = getattr(encoder, "class_name", None)
    if not isinstance(encoder, torchfile.PersistentObject) or name not in ENCODER_DEFAULTS:
        raise torchfile.CheckpointFormatError(
            f"{where}: unsupported encoder {name or type(encoder).__name__!r}; supported: "
            f"{', '.join(ENCODER_DEFAULTS)}")
    fields = ("vae_name", "raw_mean", "raw_std", "final_mean", "final_std", "batch_size")
    kwargs = _init_kwargs(encoder, fields if name == "StabilityVAEEncoder" else (), where)
    info = {"class_name": name, **torchfile.json_value({**ENCODER_DEFAULTS[name], **kwargs})}
    if name == "StabilityVAEEncoder":
        state = encoder.state
        f32 = np.float32
        scale = f32(info["final_std"]) / np.asarray(info["raw_std"], f32)
        bias = f32(info["final_mean"]) - np.asarray(info["raw_mean"], f32) * scale
        stored = {k: np.asarray(state.get(k), f32).reshape(-1) for k in ("scale", "bias")
                  if isinstance(state.get(k), (np.ndarray, np.generic, float))}
        if len(stored) < 2 or state.get("vae_name") != info["vae_name"] or not (
                np.allclose(stored["scale"], scale, rtol=1e-6, atol=0)
                and np.allclose(stored["bias"], bias, rtol=1e-6, atol=1e-7)):
            raise torchfile.CheckpointFormatError(
                f"{where}: StabilityVAEEncoder state (vae_name, scale, bias) does not match its "
                f"constructor arguments {kwargs or '(defaults)'}")
        info.update(scale=stored["scale"].tolist(), bias=stored["bias"].tolist())
    return info


def load_pickle(path) -> tuple[str, dict, dict[str, np.ndarray], dict | None]:
    """Read a released EDM2 pickle (``edm2-img512-xs-2147483-0.135.pkl``, or a training
    ``network-snapshot-*.pkl``) without executing its embedded source code.

    Returns ``(class_name, kwargs, state_dict, encoder_info)``: ``"Precond"``, its constructor
    kwargs as JSON values, the tensors of ``ema`` under their ``state_dict()`` names (float16 in
    released files), and the encoder that maps pixels to the network's space (``None`` when the
    file has none): ``{"class_name": "StandardRGBEncoder"}`` (pixels / 127.5 - 1) or
    ``{"class_name": "StabilityVAEEncoder", "vae_name", "raw_mean", "raw_std", "final_mean",
    "final_std", "batch_size", "scale", "bias"}`` (final latents = raw latents * scale + bias).

    Raises :class:`torchfile.UnsafeCheckpointError` for a global outside the allow-list and
    :class:`torchfile.CheckpointFormatError` for anything else that does not fit.
    """
    where = str(path)
    if torchfile.file_kind(path) in ("zip", "legacy"):
        raise torchfile.CheckpointFormatError(
            f"{where}: a torch.save file, not an EDM2 pickle")
    with open(path, "rb") as f:
        data = torchfile.read_pickle(f, where)
    if not isinstance(data, Mapping) or "ema" not in data:
        have = list(data)[:20] if isinstance(data, Mapping) else type(data).__name__
        raise torchfile.CheckpointFormatError(f"{where}: no 'ema' entry (top level: {have})")
    net = data["ema"]
    name = getattr(net, "class_name", None)
    if not isinstance(net, torchfile.PersistentObject) or name != "Precond":
        raise torchfile.CheckpointFormatError(
            f"{where}: 'ema' is {name or type(net).__name__!r}, not an EDM2 Precond")
    kwargs = _init_kwargs(net, _PRECOND_ARGS, where)
    try:
        build(name, kwargs)
    except ValueError as e:
        raise torchfile.CheckpointFormatError(f"{where}: {e}") from None
    return name, kwargs, torchfile.module_tensors(net, where), _encoder_info(data.get("encoder"), where)


# ----------------------------------------------------------------------------------------------
# The family: conversion, schedule and denoiser.

#: EDM2's released sampler range (generate_images.py: sigma_min 0.002, sigma_max 80).
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _stability_latent(encoder: Mapping[str, Any], vae: str | None) -> dict:
    """The latent spec of a ``StabilityVAEEncoder``: raw = (z - bias) / scale, the VAE output in [0, 1]."""
    f32 = np.float32
    scale = f32(encoder["final_std"]) / np.asarray(encoder["raw_std"], f32)
    bias = f32(encoder["final_mean"]) - np.asarray(encoder["raw_mean"], f32) * scale
    return dict(vae=vae, scale=encoder.get("scale", scale.tolist()), bias=encoder.get("bias", bias.tolist()),
                range="[0,1]", vae_name=encoder.get("vae_name"))


def convert(src, dst, *, preset: str | None = None, config=None, vae=None, overwrite: bool = False) -> dict:
    """Convert an NVlabs/edm2 network to ``dst`` (torch not needed, no code from the file runs).

    ``src``: a released or training pickle (class, kwargs and encoder are read from it), or a
    ``torch.save`` state dict of the ``Precond`` with ``preset`` (a :data:`PRESETS` name) or
    ``config`` (``{"kwargs": {...}, "encoder": {...}}``, a JSON file or dict). ``vae``: a converted
    VAE folder recorded as the decoder of a latent model's samples.
    """
    start = time.perf_counter()
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    checkpoint.check_destination(dst, overwrite, sources=[src])
    if preset is not None and config is not None:
        raise ValueError("give at most one of --preset and --config")
    if torchfile.file_kind(src) in ("zip", "legacy"):
        if preset is None and config is None:
            raise ValueError(f"{src} is a state_dict file: give --preset NAME or --config JSON")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown EDM2 preset {preset!r}; choose one of {', '.join(PRESETS)}")
            kwargs, encoder = dict(PRESETS[preset]), None
        else:
            cfg = checkpoint.read_json(config, "config")
            kwargs, encoder = dict(cfg.get("kwargs", {})), cfg.get("encoder")
        class_name = "Precond"
        state_dict = torchfile.load_state_dict(src)
    else:
        if preset is not None or config is not None:
            raise ValueError("an EDM2 pickle records its own configuration: no --preset or --config")
        class_name, kwargs, state_dict, encoder = load_pickle(src)
    if encoder is None and int(kwargs.get("img_channels", 3)) == 4:  # the released latent models
        encoder = dict(class_name="StabilityVAEEncoder", **ENCODER_DEFAULTS["StabilityVAEEncoder"])
    variables = convert_state_dict(class_name, kwargs, state_dict)
    module = build(class_name, kwargs)
    extra = dict(source=dict(kind="edm2", file=src.name))
    if encoder is not None and encoder.get("class_name") == "StabilityVAEEncoder":
        extra["latent"] = _stability_latent(encoder, vae_path(vae, module.img_channels))
    elif vae is not None:
        raise ValueError("this EDM2 network samples pixels: it takes no --vae")
    tensors = len(state_dict)
    del state_dict
    return checkpoint.save_converted(dst, "edm2", class_name, kwargs, variables, tensors=tensors, started=start,
                                     schedule=default_schedule(), extra=extra, overwrite=overwrite, sources=[src])


def _convert_arguments(parser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=list(PRESETS), help="a released configuration (for a state_dict .pt)")
    which.add_argument("--config", metavar="JSON", help='{"kwargs": {...}, "encoder": {...}} (for a state_dict .pt)')
    parser.add_argument("--vae", metavar="DIR", help="converted VAE that decodes the latents (jdiffsample convert vae)")


def default_schedule(class_name=None, kwargs=None, extra=None) -> schedules.VE:
    """EDM2's sampling range, [0.002, 80]."""
    return schedules.VE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)


FAMILY = family.Family(
    name="edm2", description="NVlabs/edm2 magnitude-preserving UNets (pixel img64 and latent img512; EDM precond)",
    build=lambda class_name, kwargs, dtype=jnp.float32: build(class_name, kwargs, dtype=dtype),
    example_inputs=example_inputs,
    conversion=family.Conversion(convert, _convert_arguments, default_schedule),
    sampling=family.Sampling(
        denoise=denoise, sample_shape=lambda m: (m.img_resolution, m.img_resolution, m.img_channels),
        num_classes=lambda m: int(m.label_dim), skip_tuning=True),
    # trained without label dropout: guidance comes from a second (unconditional or weaker) network
)

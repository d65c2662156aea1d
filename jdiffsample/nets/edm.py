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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from jdiffsample import schedules
from jdiffsample.nets import family
from jdiffsample.nets.edm_unets import UNETS, UNet
from jdiffsample.nets.formats import checkpoint, statedict, torchfile
from jdiffsample.nets.layers import filter_2d, skip_variables

__all__ = [
    "VPPrecond",
    "VEPrecond",
    "iDDPMPrecond",
    "EDMPrecond",
    "build",
    "example_inputs",
    "convert_state_dict",
    "convert",
    "FAMILY",
]

Dtype = Any


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

    def _model_spec(self) -> tuple[type[UNet], dict[str, Any]]:
        """The UNet class and its constructor arguments; validates ``model_type`` and the kwargs."""
        unet = UNETS.get(self.model_type)
        if unet is None:
            raise ValueError(f"{type(self).__name__}: unsupported model_type {self.model_type!r}; "
                             f"supported: {', '.join(UNETS)}")
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
    def model(self) -> UNet:
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
    filt = filter_2d(model.resample_filter)[None, None]
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
    match is strict (:func:`jdiffsample.nets.formats.statedict.match`): missing and unexpected keys, shape
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
    start = time.perf_counter()
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    checkpoint.check_destination(dst, overwrite, sources=[src])
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
                                     schedule=default_schedule(class_name, ctor), extra=dict(source=source),
                                     overwrite=overwrite, sources=[src])


def _convert_arguments(parser) -> None:
    parser.add_argument("--kwargs", metavar="JSON_FILE",
                        help='{"class_name": ..., "kwargs": {...}} (required for a state_dict .pt)')
    parser.add_argument("--key", help="entry of a wrapped state_dict file (e.g. ema)")


def default_schedule(class_name: str, kwargs: Mapping[str, Any], extra=None) -> schedules.VE:
    """EDM's sampling range: generate.py's [0.002, 80] clipped to the network's own range."""
    module = build(class_name, kwargs)
    lo, hi = float(module.sigma_min), float(module.sigma_max)
    return schedules.VE(sigma_min=max(SIGMA_MIN, lo), sigma_max=min(SIGMA_MAX, hi))


def denoise(module, variables, x, t, labels, schedule):
    """D(x; sigma) with t = sigma (VE) and one-hot labels; -1 (or None) gives the original's
    all-zero labels. The same call serves EDM2's preconditioned networks."""
    onehot = None if labels is None else jax.nn.one_hot(labels, module.label_dim, dtype=jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return module.apply(variables, x, sigma, onehot)


FAMILY = family.Family(
    name="edm", description="NVlabs/edm networks (SongUNet DDPM++/NCSN++, DhariwalUNet; VP/VE/iDDPM/EDM precond)",
    build=lambda class_name, kwargs, dtype=jnp.float32: build(class_name, kwargs, dtype=dtype),
    example_inputs=example_inputs,
    conversion=family.Conversion(convert, _convert_arguments, default_schedule),
    sampling=family.Sampling(
        denoise=denoise, sample_shape=lambda m: (m.img_resolution, m.img_resolution, m.img_channels),
        num_classes=lambda m: int(m.label_dim), skip_tuning=True,
        # the all-zero label is the unconditional model only if training dropped labels
        has_null_label=lambda m: bool(m.label_dim) and float(m.model_kwargs.get("label_dropout", 0)) > 0),
)

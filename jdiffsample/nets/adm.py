"""Flax port of the ADM ``UNetModel`` from openai/guided-diffusion (Dhariwal & Nichol, 2021).

The network is written from the published architecture description. It is laid out NHWC and
reproduces ``model(x, timesteps, y)`` of the PyTorch original when the weights are converted
with :func:`convert_state_dict`::

    kwargs = PRESETS["256x256"]
    variables = convert_state_dict(kwargs, state_dict)     # state_dict: name -> numpy array
    eps_and_var = build(kwargs).apply(variables, x_nhwc, timesteps, y)   # [B, H, W, 6]

Differences from the original, all deliberate:

* Inference only. ``dropout`` and ``use_checkpoint`` are accepted and stored but have no effect
  (the original applies dropout only in training mode).
* Precision is chosen with the Flax attribute ``dtype`` (for instance ``jnp.bfloat16``) instead of
  ``use_fp16``, which is only recorded. As in the original fp16 mode, ``dtype`` applies to the
  torso (input, middle and output blocks: convolutions, linears, attention matmuls); the time and
  label embeddings and the final ``out`` head stay float32. Group norms and the attention softmax
  always compute in float32. The output is float32. On GPUs, float32 convolutions and matmuls
  default to TF32 (about 1e-3 relative error against the original); wrap calls in
  ``jax.default_matmul_precision("highest")`` for a float32-exact match.
* Skip-Tuning: every long skip tensor is multiplied, where the decoder concatenates it, by a
  float32 scalar from the ``"skip"`` variable collection (see :func:`skip_name`). The scales are
  initialised to 1.0, which leaves the output bit-identical to the unscaled network.

Module names follow the PyTorch ``state_dict`` keys with ``.`` before an index written as ``_``
(``input_blocks.4.1.qkv`` is the Flax path ``input_blocks_4_1/qkv``); the converter relies on this.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jdiffsample import models, schedules
from jdiffsample.nets import family
from jdiffsample.nets.formats import checkpoint, statedict, torchfile
from jdiffsample.nets.layers import Conv2d, GroupNorm, attention

__all__ = [
    "PRESETS",
    "DIFFUSION_PRESETS",
    "UNetModel",
    "ResBlock",
    "AttentionBlock",
    "Upsample",
    "Downsample",
    "timestep_embedding",
    "skip_name",
    "build",
    "example_inputs",
    "convert_state_dict",
    "convert",
    "FAMILY",
]


def _ds(image_size: int, resolutions: Sequence[int]) -> tuple[int, ...]:
    """Attention resolutions (in pixels) -> downsample rates, as the original scripts do."""
    return tuple(image_size // r for r in resolutions)


def _preset(image_size, model_channels, channel_mult, num_res_blocks, *, num_classes,
            num_heads=4, num_head_channels=-1, dropout=0.0, use_fp16=True,
            use_new_attention_order=False):
    """Kwargs of a released learned-sigma model, with the README flags' defaults filled in."""
    return dict(
        image_size=image_size,
        in_channels=3,
        model_channels=model_channels,
        out_channels=6,  # learn_sigma: epsilon (3) and the variance interpolation v (3)
        num_res_blocks=num_res_blocks,
        attention_resolutions=_ds(image_size, (32, 16, 8)),
        dropout=dropout,
        channel_mult=channel_mult,
        conv_resample=True,
        dims=2,
        num_classes=num_classes,
        use_checkpoint=False,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=use_new_attention_order,
    )


#: ``UNetModel`` constructor kwargs of the released guided-diffusion diffusion models, from the
#: README's MODEL_FLAGS (``num_heads`` defaults to 4; it is ignored where ``num_head_channels`` is
#: set). ``attention_resolutions`` are downsample rates, i.e. ``image_size // 32, 16, 8``.
PRESETS: dict[str, dict[str, Any]] = {
    "64x64": _preset(64, 192, (1, 2, 3, 4), 3, num_classes=1000, num_head_channels=64,
                     dropout=0.1, use_new_attention_order=True),
    "128x128": _preset(128, 256, (1, 1, 2, 3, 4), 2, num_classes=1000, num_heads=4),
    "256x256": _preset(256, 256, (1, 1, 2, 2, 4, 4), 2, num_classes=1000, num_head_channels=64),
    "256x256_uncond": _preset(256, 256, (1, 1, 2, 2, 4, 4), 2, num_classes=None,
                              num_head_channels=64),
    "512x512": _preset(512, 256, (0.5, 1, 1, 2, 2, 4, 4), 2, num_classes=1000,
                       num_head_channels=64, use_fp16=False),
}

#: Diffusion settings that go with each entry of :data:`PRESETS` (same keys). The models predict
#: epsilon; ``learn_sigma`` means the last 3 output channels interpolate the log variance between
#: ``beta_t`` and the posterior variance. ``timesteps`` passed to the network are the integer
#: indices 0 .. diffusion_steps-1 (``rescale_timesteps`` is off for all of them).
DIFFUSION_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(diffusion_steps=1000,
               noise_schedule="cosine" if name == "64x64" else "linear",
               learn_sigma=True)
    for name in PRESETS
}


def skip_name(j: int) -> str:
    """Name of the Skip-Tuning scale of the skip consumed by ``output_blocks[j]``.

    ``j = 0`` is the deepest skip (consumed first); the zero-padded prefix makes sorted names
    follow consumption order.
    """
    return f"{j:02d}_output_blocks.{j}"


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f_i = max_period ** (-i / (dim//2))``.

    ``timesteps``: [B] (float or int; fractional values are allowed). Returns float32 [B, dim]; an
    odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(x: jax.Array, name: str) -> jax.Array:
    """``GroupNorm32``: 32 groups, eps 1e-5, computed in float32 and cast back to ``x.dtype``
    (:func:`jdiffsample.nets.layers.group_norm`; parameters ``scale``, ``bias``)."""
    return GroupNorm(eps=1e-5, dtype=x.dtype, num_groups=32, name=name)(x)


def conv(features: int, name: str, dtype: Any, kernel: int = 3, stride: int = 1) -> nn.Module:
    """A PyTorch-style 2-D conv (symmetric zero padding ``kernel // 2``, with bias); a 1x1 one is
    computed as a matrix product (:class:`jdiffsample.nets.layers.Conv2d`, same parameters)."""
    if kernel == 1 and stride == 1:
        return Conv2d(features, 1, dtype=dtype, name=name)
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, followed by a 3x3 conv (``conv``) if ``use_conv``."""

    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _upsample_nearest(x)
        if self.use_conv:
            x = conv(x.shape[-1], "conv", self.dtype)(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling: a stride-2 3x3 conv (``op``) if ``use_conv``, else 2x2 average pooling."""

    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv(x.shape[-1], "op", self.dtype, stride=2)(x)
        return _avg_pool(x)


class ResBlock(nn.Module):
    """ADM residual block conditioned on the embedding, optionally resampling (``up``/``down``).

    h = conv(silu(norm(x))), with the parameter-free resampling applied to both paths between the
    activation and the conv; the embedding enters as FiLM ``norm(h) * (1 + scale) + shift`` when
    ``use_scale_shift_norm``, else it is added before the second norm. The shortcut is a 1x1 conv
    when the channel count changes.
    """

    out_channels: int
    use_scale_shift_norm: bool
    up: bool = False
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        out_ch = self.out_channels
        h = nn.silu(group_norm(x, "in_layers_0"))
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _avg_pool(h), _avg_pool(x)
        h = conv(out_ch, "in_layers_2", self.dtype)(h)

        emb_features = 2 * out_ch if self.use_scale_shift_norm else out_ch
        emb_out = nn.Dense(emb_features, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = group_norm(h, "out_layers_0") * (1 + scale) + shift
        else:
            h = group_norm(h + emb_out, "out_layers_0")
        h = conv(out_ch, "out_layers_3", self.dtype)(nn.silu(h))

        if x.shape[-1] != out_ch:
            x = conv(out_ch, "skip_connection", self.dtype, kernel=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions with a residual connection.

    ``qkv`` and ``proj_out`` are the original's 1x1 Conv1d layers, here Dense layers on the
    [B, HW, C] tokens. ``use_new_attention_order`` selects how the 3C qkv channels are laid out:
    new order (``QKVAttention``) channel ``j*C + h*c_h + c``; legacy order (``QKVAttentionLegacy``)
    ``h*3*c_h + j*c_h + c``, for j in (q, k, v), head h, channel c within the head.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        if self.num_head_channels == -1:
            heads = self.num_heads
        else:
            if c % self.num_head_channels:
                raise ValueError(f"{c} channels are not divisible by num_head_channels "
                                 f"{self.num_head_channels}")
            heads = c // self.num_head_channels
        if c % heads:
            raise ValueError(f"{c} channels are not divisible by {heads} heads")
        ch = c // heads

        tokens = x.reshape(b, hgt * wid, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(
            group_norm(tokens, "norm"))
        # -> [q/k/v, batch, head, token, channel]
        if self.use_new_attention_order:
            q, k, v = qkv.reshape(b, -1, 3, heads, ch).transpose(2, 0, 3, 1, 4)
        else:
            q, k, v = qkv.reshape(b, -1, heads, 3, ch).transpose(3, 0, 2, 1, 4)
        scale = 1 / math.sqrt(math.sqrt(ch))  # applied to q and k separately, as the original
        a = attention(q * scale, k * scale, v)
        h = nn.Dense(c, dtype=self.dtype, name="proj_out")(a)
        return (tokens + h.astype(tokens.dtype)).reshape(b, hgt, wid, c)


def encode(module: nn.Module, x: jax.Array, emb: jax.Array, attention: Callable[[str], nn.Module]):
    """The input blocks and the middle block of ADM's UNets, built inside ``module``'s compact call.

    ``module`` has the fields ``model_channels``, ``channel_mult``, ``num_res_blocks``,
    ``attention_resolutions``, ``resblock_updown``, ``conv_resample``, ``dtype`` and a method
    ``_resblock(out_channels, name, down=...)``; ``attention(name)`` makes an attention block.
    Returns ``(h, outputs, ds)``: the middle block's output, every input block's output (the skip
    stack) and the final downsampling factor.
    """
    mc = module.model_channels
    h = conv(int(module.channel_mult[0] * mc), "input_blocks_0_0", module.dtype)(x.astype(module.dtype))
    outputs = [h]
    ds, idx = 1, 1
    for level, mult in enumerate(module.channel_mult):
        for _ in range(module.num_res_blocks):
            h = module._resblock(int(mult * mc), f"input_blocks_{idx}_0")(h, emb)
            if ds in module.attention_resolutions:
                h = attention(f"input_blocks_{idx}_1")(h)
            outputs.append(h)
            idx += 1
        if level != len(module.channel_mult) - 1:
            name = f"input_blocks_{idx}_0"
            if module.resblock_updown:
                h = module._resblock(h.shape[-1], name, down=True)(h, emb)
            else:
                h = Downsample(module.conv_resample, dtype=module.dtype, name=name)(h)
            outputs.append(h)
            idx += 1
            ds *= 2
    h = module._resblock(h.shape[-1], "middle_block_0")(h, emb)
    h = attention("middle_block_1")(h)
    h = module._resblock(h.shape[-1], "middle_block_2")(h, emb)
    return h, outputs, ds


class UNetModel(nn.Module):
    """guided-diffusion ``UNetModel`` (NHWC), with the original constructor arguments.

    Call as ``module.apply(variables, x, timesteps, y=None)``:

    * ``x``: [B, H, W, in_channels];
    * ``timesteps``: [B] or a scalar (int or float; the original uses integer indices 0..T-1);
    * ``y``: int labels [B], required if and only if ``num_classes`` is set.

    Returns float32 [B, H, W, out_channels] (6 for learned-sigma models: epsilon, then v).

    ``attention_resolutions`` are downsample rates (``image_size // resolution``), as in the
    original. ``dims`` must be 2. ``dtype`` is the torso compute dtype (see the module docstring).
    ``variables`` holds ``"params"`` and the Skip-Tuning collection ``"skip"``.
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
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dims != 2:
            raise ValueError(f"only dims=2 is supported, got dims={self.dims}")
        super().__post_init__()

    def _attention(self, num_heads: int, name: str) -> AttentionBlock:
        return AttentionBlock(num_heads=num_heads, num_head_channels=self.num_head_channels,
                              use_new_attention_order=self.use_new_attention_order,
                              dtype=self.dtype, name=name)

    def _resblock(self, out_channels: int, name: str, **updown: bool) -> ResBlock:
        return ResBlock(out_channels, self.use_scale_shift_norm, dtype=self.dtype, name=name,
                        **updown)

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, y: jax.Array | None = None
                 ) -> jax.Array:
        if (y is None) != (self.num_classes is None):
            raise ValueError("y must be given if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        batch = x.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        mc = self.model_channels
        attn_ds = set(self.attention_resolutions)
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

        emb = timestep_embedding(timesteps, mc)
        emb = nn.Dense(4 * mc, name="time_embed_0")(emb)
        emb = nn.Dense(4 * mc, name="time_embed_2")(nn.silu(emb))
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes, 4 * mc, name="label_emb")(y)

        # Encoder: every input block's output goes on the skip stack.
        h, hs, ds = encode(self, x, emb, lambda name: self._attention(self.num_heads, name))

        # Decoder: output block j concatenates [h, rho_j * skip], deepest skip first.
        j = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                rho = self.variable("skip", skip_name(j), lambda: jnp.ones((), jnp.float32))
                skip = (rho.value * hs.pop()).astype(h.dtype)
                h = jnp.concatenate([h, skip], axis=-1)
                h = self._resblock(int(mult * mc), f"output_blocks_{j}_0")(h, emb)
                k = 1
                if ds in attn_ds:
                    h = self._attention(heads_up, f"output_blocks_{j}_{k}")(h)
                    k += 1
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{j}_{k}"
                    if self.resblock_updown:
                        h = self._resblock(h.shape[-1], name, up=True)(h, emb)
                    else:
                        h = Upsample(self.conv_resample, dtype=self.dtype, name=name)(h)
                    ds //= 2
                j += 1

        h = nn.silu(group_norm(h.astype(jnp.float32), "out_0"))
        return conv(self.out_channels, "out_2", jnp.float32)(h).astype(jnp.float32)


def construct(cls: type[nn.Module], class_name: str, kwargs: Mapping[str, Any], dtype, what: str) -> nn.Module:
    """``cls(**kwargs, dtype=dtype)`` for a config naming ``class_name`` (JSON lists become tuples, so
    the module stays hashable); one ``ValueError`` line for another class or bad kwargs."""
    if class_name != cls.__name__:
        raise ValueError(f"unsupported {what} class {class_name!r} (only {cls.__name__})")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if "dtype" in kwargs:
        raise ValueError(f"dtype is not a constructor argument of {cls.__name__} (pass dtype= to build)")
    try:
        return cls(**kwargs, dtype=dtype)
    except TypeError as e:  # unknown or missing constructor arguments
        raise ValueError(f"bad {cls.__name__} kwargs: {str(e).split('() ', 1)[-1].removeprefix('got an ')}") from None


def build(kwargs: Mapping[str, Any], class_name: str = "UNetModel", *, dtype=jnp.float32) -> UNetModel:
    """A :class:`UNetModel` from constructor kwargs (e.g. a :data:`PRESETS` entry or a fixture's
    ``config.json`` kwargs)."""
    return construct(UNetModel, class_name, kwargs, dtype, "ADM network")


_INDEX = re.compile(r"_(\d+)")
_CONV1D_MODULES = ("qkv", "proj_out")


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> PyTorch key (``input_blocks_4_1/qkv/kernel`` -> ``input_blocks.4.1.qkv.weight``)."""
    *modules, leaf = path
    return statedict.torch_key(tuple(_INDEX.sub(r".\1", m) for m in modules) + (leaf,))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 2 and path[-2] in _CONV1D_MODULES:
        return (shape[1], shape[0], 1)  # Dense [in, out] <- Conv1d [out, in, 1]
    return statedict.torch_shape(path, shape)


def _to_flax(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    return statedict.to_flax(path, w[:, :, 0] if path[-1] == "kernel" and w.ndim == 3 else w)


LAYOUT = statedict.Layout(key=_torch_key, shape=_torch_shape, convert=_to_flax)


def example_inputs(model: UNetModel):
    size = model.image_size
    y = None if model.num_classes is None else jnp.zeros((1,), jnp.int32)
    return jnp.zeros((1, size, size, model.in_channels)), jnp.zeros((1,), jnp.int32), y


def convert_state_dict(kwargs: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
    """Flax ``variables`` ``{"params": ..., "skip": ...}`` from a guided-diffusion state_dict.

    Conv weights [O, I, kh, kw] become kernels [kh, kw, I, O]; Linear [O, I] and the attention
    Conv1d [O, I, 1] become Dense kernels [I, O]; parameters are float32 and the Skip-Tuning
    scales 1.0. Strict (:func:`jdiffsample.nets.formats.statedict.match`).
    """
    model = build(kwargs)
    abstract = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))
    return statedict.match(abstract, state_dict, layout=LAYOUT, what="the UNetModel kwargs")


# ----------------------------------------------------------------------------------------------
# The family: conversion, schedule and denoiser.

#: Diffusion settings assumed when a config gives none (most released models use them).
DEFAULT_DIFFUSION = dict(noise_schedule="linear", diffusion_steps=1000)


def diffusion_schedule(diffusion: Mapping[str, Any] | None) -> schedules.VPDiscrete:
    """The discrete VP schedule of guided-diffusion's settings ``{"noise_schedule", "diffusion_steps"}``
    (default: linear, 1000 steps)."""
    d = {**DEFAULT_DIFFUSION, **{k: v for k, v in (diffusion or {}).items() if k in DEFAULT_DIFFUSION}}
    steps = d["diffusion_steps"]
    if isinstance(steps, str) and steps.isdigit():
        steps = int(steps)
    return schedules.VPDiscrete.from_betas(schedules.guided_diffusion_betas(d["noise_schedule"], steps))


def released_config(preset: str | None, config, *, presets: Mapping[str, Mapping], class_name: str, what: str,
                    diffusion_presets: Mapping[str, Mapping] | None = None) -> tuple[str, dict, dict, dict]:
    """``(class_name, kwargs, diffusion, source)`` of a guided-diffusion network from exactly one of
    a preset name (``presets``, with ``diffusion_presets``) or ``config``: a dict or JSON file,
    ``{"class_name", "kwargs", "diffusion"}`` or the constructor kwargs themselves. ``what`` names
    the network in errors ("ADM", "ADM classifier", ...)."""
    if (preset is None) == (config is None):
        raise ValueError("give exactly one of preset or config (--preset NAME or --config FILE)")
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown {what} preset {preset!r}; choose one of {', '.join(presets)}")
        return class_name, dict(presets[preset]), dict((diffusion_presets or {}).get(preset, {})), dict(preset=preset)
    cfg = checkpoint.read_json(config, "config")
    kwargs = cfg["kwargs"] if "kwargs" in cfg else {k: v for k, v in cfg.items() if k not in ("class_name", "diffusion")}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"the config's kwargs must be a JSON object of {class_name} constructor arguments")
    return cfg.get("class_name", class_name), dict(kwargs), dict(cfg.get("diffusion") or {}), {}


def convert_released(src, dst, *, family_name: str, class_name: str, kwargs: Mapping[str, Any], to_variables,
                     key=None, schedule=None, extra: Mapping[str, Any], overwrite: bool, started: float) -> dict:
    """Read the state dict ``src`` (``key``: the entry of a wrapped one), match it with
    ``to_variables(state_dict)`` and write ``dst``; the converters' summary."""
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    checkpoint.check_destination(dst, overwrite, sources=[src])
    state_dict = torchfile.load_state_dict(src, key=key)
    variables = to_variables(state_dict)
    tensors = len(state_dict)
    del state_dict  # frees the raw checkpoint before writing
    extra = dict(extra)
    extra["source"] = dict(kind="state_dict", file=src.name, **extra.get("source", {}))
    return checkpoint.save_converted(dst, family_name, class_name, kwargs, variables, tensors=tensors,
                                     started=started, schedule=schedule, extra=extra, overwrite=overwrite,
                                     sources=[src])


def convert_diffusion_model(src, dst, *, family_name: str, what: str, build_checked, to_variables,
                            presets, diffusion_presets, class_name: str, preset=None, config=None, key=None,
                            noise_schedule=None, diffusion_steps=None, overwrite=False) -> dict:
    """The converter of a guided-diffusion diffusion model (``UNetModel``, ``SuperResModel``): its
    kwargs and diffusion settings (``noise_schedule`` / ``diffusion_steps`` override them), checked
    with ``build_checked(class_name, kwargs)`` before the weights are read."""
    started = time.perf_counter()
    class_name, kwargs, diffusion, source = released_config(
        preset, config, presets=presets, class_name=class_name, what=what, diffusion_presets=diffusion_presets)
    if noise_schedule is not None:
        diffusion["noise_schedule"] = noise_schedule
    if diffusion_steps is not None:
        diffusion["diffusion_steps"] = diffusion_steps
    schedule = diffusion_schedule(diffusion)
    build_checked(class_name, kwargs)
    return convert_released(src, dst, family_name=family_name, class_name=class_name, kwargs=kwargs,
                            to_variables=lambda sd: to_variables(class_name, kwargs, sd), key=key,
                            schedule=schedule, extra=dict(source=source), overwrite=overwrite, started=started)


def convert(src, dst, *, preset: str | None = None, config=None, key=None, noise_schedule: str | None = None,
            diffusion_steps: int | None = None, overwrite: bool = False) -> dict:
    """Convert an openai/guided-diffusion ``UNetModel`` state_dict (``.pt``) to ``dst``.

    Exactly one of ``preset`` (a name in :data:`PRESETS`, with its :data:`DIFFUSION_PRESETS`) or
    ``config`` (``{"kwargs": {...}, "diffusion": {"noise_schedule", "diffusion_steps"}}`` or the
    kwargs themselves, a dict or JSON file; diffusion defaults to linear, 1000 steps).
    ``noise_schedule`` / ``diffusion_steps`` override either; ``key`` picks a wrapped state dict.
    """
    return convert_diffusion_model(
        src, dst, family_name="adm", what="ADM", build_checked=_build_checked,
        to_variables=lambda class_name, kwargs, sd: convert_state_dict(kwargs, sd), presets=PRESETS,
        diffusion_presets=DIFFUSION_PRESETS, class_name="UNetModel", preset=preset, config=config, key=key,
        noise_schedule=noise_schedule, diffusion_steps=diffusion_steps, overwrite=overwrite)


def convert_arguments(parser, *, what: str, class_name: str, presets, diffusion: bool = True) -> None:
    """The converter options of a guided-diffusion network (``--preset | --config``, ``--key``)."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help=f"a released {what}: {', '.join(presets)}")
    which.add_argument("--config", metavar="FILE",
                       help=f"JSON with the {class_name} kwargs" + (" (and 'diffusion')" if diffusion else ""))
    if diffusion:
        parser.add_argument("--noise-schedule", help="override the betas: linear or cosine")
        parser.add_argument("--diffusion-steps", type=int, help="override the number of training steps")
    parser.add_argument("--key", help="entry of a wrapped state_dict file (e.g. state_dict)")


def model_steps(x, t, schedule):
    """The network's timestep argument ``[B]`` for solver time ``t`` of a discrete schedule
    (DPM-Solver's convention t_n = (n + 1) / N <-> index n, fractional in between)."""
    return jnp.broadcast_to(jnp.asarray(schedule.model_time(t), jnp.float32), (x.shape[0],))


def _denoise(module, variables, x, t, labels, schedule):
    """Epsilon prediction (the first ``in_channels`` outputs) as a data prediction."""
    eps = module.apply(variables, x, model_steps(x, t, schedule), labels)[..., : module.in_channels]
    return models.x0_from_eps(x, eps, t, schedule)


def _build_checked(class_name, kwargs, dtype=jnp.float32) -> UNetModel:
    return check_eps(build(kwargs, class_name, dtype=dtype))


def check_eps(module) -> UNetModel:
    """``module`` if epsilon can be read from its outputs (``ValueError`` otherwise)."""
    if module.out_channels not in (module.in_channels, 2 * module.in_channels):
        raise ValueError(f"cannot read epsilon from {module.out_channels} output channels "
                         f"({module.in_channels} input channels)")
    return module


FAMILY = family.Family(
    name="adm", description="openai/guided-diffusion UNetModel (epsilon prediction, discrete VP schedule)",
    build=lambda class_name, kwargs, dtype=jnp.float32: _build_checked(class_name, kwargs, dtype),
    example_inputs=example_inputs,
    conversion=family.Conversion(
        convert, lambda p: convert_arguments(p, what="model", class_name="UNetModel", presets=PRESETS),
        schedule=lambda class_name, kwargs, extra: diffusion_schedule(extra.get("diffusion"))),
    sampling=family.Sampling(
        denoise=_denoise, sample_shape=lambda m: (m.image_size, m.image_size, m.in_channels),
        num_classes=lambda m: int(m.num_classes or 0), skip_tuning=True),
)

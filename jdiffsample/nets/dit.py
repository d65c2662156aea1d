"""Flax port of DiT, the Diffusion Transformer of facebookresearch/DiT (Peebles & Xie, 2023).

Written from the published architecture; with weights converted by :func:`convert_state_dict` it
reproduces ``model(x, t, y)`` and ``model.forward_with_cfg(...)`` of the PyTorch ``DiT``::

    state_dict, info = load_checkpoint("DiT-XL-2-256x256.pt")    # or a train.py checkpoint
    kwargs = infer_kwargs(state_dict, info)                       # = arch_kwargs("DiT-XL/2", 32)
    module = build("DiT", kwargs)
    variables = convert_state_dict("DiT", kwargs, state_dict)
    out = module.apply(variables, x, t, y)        # x [B, 32, 32, 4] latents -> [B, 32, 32, 8]

* ``x`` is NHWC; ``t`` float timesteps ``[B]`` (or a scalar) in 0..999, fractional allowed; ``y``
  int labels ``[B]``, where ``num_classes`` is the null label of classifier-free guidance (present
  when ``class_dropout_prob > 0``). The output holds every channel, float32: epsilon, then (with
  ``learn_sigma``) the ``in_channels`` variance-interpolation channels.
* Inference only: the label dropout of training is never applied.
* ``pos_embed`` [1, T, D] is a parameter, as in the original (a frozen ``nn.Parameter`` in its
  state dict), initialised to the fixed 2-D sin-cos table (:func:`pos_embed_table`); the stored
  values are used as they are (the golden fixture's are random, on purpose).
* ``dtype`` (e.g. ``jnp.bfloat16``) is the compute type of the patch embedding, the attention and
  MLP layers, the adaLN projections and the final linear. As under PyTorch autocast, the residual
  stream between blocks stays float32 (float32 + bf16 promotes); LayerNorm, the attention softmax,
  the timestep/label embedders and the output are float32. On GPUs, float32 matmuls default to
  TF32; run under ``jax.default_matmul_precision("highest")`` for a float32-exact match.

DiT has no long skip connections, so there is no Skip-Tuning collection: ``variables`` is
``{"params": ...}``. Flax paths mirror the state-dict names with ``_<index>`` for ``.<index>``
(``blocks.3.adaLN_modulation.1.weight`` is ``blocks_3/adaLN_modulation_1/kernel``).
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import models
from jdiffsample.nets import adm, family
from jdiffsample.nets.formats import checkpoint, statedict, torchfile
from jdiffsample.nets.latent import vae_path
from jdiffsample.nets.layers import attention

__all__ = [
    "DIT_CONFIGS",
    "DEFAULTS",
    "DiT",
    "DiTBlock",
    "pos_embed_table",
    "arch_kwargs",
    "build",
    "example_inputs",
    "guided_output",
    "LAYOUT",
    "convert_state_dict",
    "load_checkpoint",
    "infer_kwargs",
]

Dtype = Any

#: The architectures of the paper (Table 1) and of the original ``DiT_models``.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}  # depth, width, heads
DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=width, patch_size=patch, num_heads=heads)
    for size, (depth, width, heads) in _SIZES.items() for patch in (2, 4, 8)
}

#: The original constructor's defaults (DiT-XL/2 on 256px ImageNet latents).
DEFAULTS: dict[str, Any] = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152,
                                depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1,
                                num_classes=1000, learn_sigma=True)


def arch_kwargs(name: str, input_size: int = 32, num_classes: int = 1000,
                learn_sigma: bool = True) -> dict[str, Any]:
    """Full constructor kwargs of the named architecture (``"DiT-XL/2"``); ``input_size`` is the
    latent size (image size / 8: 32 for 256px, 64 for 512px)."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT architecture {name!r}; known: {', '.join(DIT_CONFIGS)}")
    return {**DEFAULTS, **DIT_CONFIGS[name], "input_size": input_size, "num_classes": num_classes,
            "learn_sigma": learn_sigma}


@functools.lru_cache(maxsize=16)
def pos_embed_table(dim: int, grid: int, spacing: float = 1.0) -> np.ndarray:
    """The fixed 2-D sin-cos position embedding, float32 ``[grid * grid, dim]`` (tokens row-major).

    The first ``dim/2`` channels encode the column index, the last ``dim/2`` the row index, each as
    ``[sin(pos * w), cos(pos * w)]`` with ``w_i = 10000 ** (-i / (dim/4))``, computed in float64
    and rounded to float32 as the original does; ``pos`` is the index times ``spacing`` (diffusers'
    ``base_size / grid``, Stable Diffusion 3).
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)
    halves = []
    for pos in (cols, rows):
        angle = np.outer(pos * spacing, omega)
        halves += [np.sin(angle), np.cos(angle)]
    table = np.concatenate(halves, axis=1).astype(np.float32)
    table.flags.writeable = False
    return table


def _layer_norm(x: jax.Array) -> jax.Array:
    """Affine-free LayerNorm over the last axis, eps 1e-6, in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


def _adaln(c: jax.Array, chunks: int, dtype: Dtype) -> list[jax.Array]:
    """``adaLN_modulation``: SiLU -> Linear(D, chunks * D), split into ``chunks`` [B, 1, D]."""
    out = nn.Dense(chunks * c.shape[-1], dtype=dtype, name="adaLN_modulation_1")(nn.silu(c))
    return jnp.split(out[:, None, :], chunks, axis=-1)


class Attention(nn.Module):
    """timm ``Attention``: qkv Linear (bias) -> multi-head softmax attention -> proj Linear."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head = d // self.num_heads
        qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(x)
        # -> [q/k/v, batch, head, token, channel]; logits and softmax in float32
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, head).transpose(2, 0, 3, 1, 4)
        a = attention(q * (1 / math.sqrt(head)), k, v)
        return nn.Dense(d, dtype=self.dtype, name="proj")(a)


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 -> GELU (tanh approximation) -> fc2."""

    hidden_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(self.hidden_features, dtype=self.dtype, name="fc1")(x), approximate=True)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block on the float32 residual stream ``x`` [B, T, D], conditioned
    on ``c`` [B, D]: ``x += gate * f(modulate(LayerNorm(x), shift, scale))`` for f = attention,
    then MLP."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        d = x.shape[-1]
        shift1, scale1, gate1, shift2, scale2, gate2 = _adaln(c, 6, self.dtype)
        h = _modulate(_layer_norm(x), shift1, scale1).astype(self.dtype)
        x = x + gate1 * Attention(self.num_heads, dtype=self.dtype, name="attn")(h)
        h = _modulate(_layer_norm(x), shift2, scale2).astype(self.dtype)
        return x + gate2 * Mlp(int(d * self.mlp_ratio), dtype=self.dtype, name="mlp")(h)


class _PatchEmbed(nn.Module):
    """timm ``PatchEmbed``: a ``patch_size``-strided conv ``proj``, flattened to row-major tokens."""

    hidden_size: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        h = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="proj")(x.astype(self.dtype))
        return h.reshape(h.shape[0], -1, h.shape[-1])


class _TimestepEmbedder(nn.Module):
    """``[cos(t f), sin(t f)]`` with 128 frequencies ``f_i = 10000 ** (-i / 128)`` -> Linear ->
    SiLU -> Linear, in float32."""

    hidden_size: int

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(128, dtype=jnp.float32) / 128)
        angles = t[:, None] * freqs
        h = nn.Dense(self.hidden_size, name="mlp_0")(jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1))
        return nn.Dense(self.hidden_size, name="mlp_2")(nn.silu(h))


class _LabelEmbedder(nn.Module):
    """The label table; row ``num_classes`` (the null label) exists when ``class_dropout_prob > 0``."""

    rows: int
    hidden_size: int

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        return nn.Embed(self.rows, self.hidden_size, name="embedding_table")(y)


class _FinalLayer(nn.Module):
    """LayerNorm, adaLN shift/scale, Linear to ``patch_size ** 2 * out_channels``."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = _adaln(c, 2, self.dtype)
        h = _modulate(_layer_norm(x), shift, scale).astype(self.dtype)
        return nn.Dense(self.features, dtype=self.dtype, name="linear")(h)


class DiT(nn.Module):
    """``DiT`` with the original constructor arguments (see the module docstring).

    ``module.apply(variables, x, t, y)``: x [B, input_size, input_size, in_channels], t [B] or a
    scalar, y int [B]; returns float32 [B, input_size, input_size, out_channels].
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                     "num_heads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiT {name} must be a positive int, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT input_size {self.input_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"DiT hidden_size {self.hidden_size} must be a multiple of 4 (the "
                             f"sin-cos table) and of num_heads {self.num_heads}")
        if not self.mlp_ratio > 0 or not self.class_dropout_prob >= 0:
            raise ValueError(f"DiT needs mlp_ratio > 0 and class_dropout_prob >= 0, got "
                             f"{self.mlp_ratio!r} and {self.class_dropout_prob!r}")
        super().__post_init__()

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        size, p, c_out = self.input_size, self.patch_size, self.out_channels
        if tuple(x.shape[1:]) != (size, size, self.in_channels):
            raise ValueError(f"DiT expects x of shape [B, {size}, {size}, {self.in_channels}], got "
                             f"{tuple(x.shape)}")
        b, grid = x.shape[0], size // p
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))

        h = _PatchEmbed(self.hidden_size, p, dtype=self.dtype, name="x_embedder")(x)
        table = pos_embed_table(self.hidden_size, grid)[None]
        h = h.astype(jnp.float32) + self.param("pos_embed", lambda _: jnp.asarray(table))
        c = _TimestepEmbedder(self.hidden_size, name="t_embedder")(t)
        rows = self.num_classes + (self.class_dropout_prob > 0)
        c = c + _LabelEmbedder(rows, self.hidden_size, name="y_embedder")(y)
        for i in range(self.depth):
            h = DiTBlock(self.num_heads, self.mlp_ratio, dtype=self.dtype, name=f"blocks_{i}")(h, c)
        h = _FinalLayer(p * p * c_out, dtype=self.dtype, name="final_layer")(h, c)
        # unpatchify: token (i, j), feature (u, v, ch) -> pixel (i * p + u, j * p + v), channel ch
        h = h.astype(jnp.float32).reshape(b, grid, grid, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, size, size, c_out)


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> DiT:
    """A :class:`DiT` from the original constructor kwargs (missing ones take the original's
    defaults, :data:`DEFAULTS`)."""
    if class_name != "DiT":
        raise ValueError(f"unsupported DiT network class {class_name!r} (only 'DiT')")
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown DiT kwargs {unknown}; allowed: {', '.join(DEFAULTS)}")
    return DiT(**kwargs, dtype=dtype)


def example_inputs(module: DiT) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x, t, y)`` of batch 1 for ``module.init``."""
    x = jnp.zeros((1, module.input_size, module.input_size, module.in_channels), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)


def guided_output(module: DiT, variables, x: jax.Array, t: jax.Array, y: jax.Array,
                  scale, channels: int | None = 3) -> jax.Array:
    """The original ``forward_with_cfg(x, t, y, scale)``, NHWC.

    The first half of ``x`` is run twice, with the first and second halves of ``t``/``y`` (the
    class labels, then the null labels); the first ``channels`` output channels of both halves
    become ``uncond + scale * (cond - uncond)``, the other channels are each half's own output.
    ``channels=3`` is what the original does (for reproducibility, as its authors say);
    ``channels=None`` guides all ``in_channels`` epsilon channels, the standard form (the learned
    variance channels are never guided).
    """
    if x.shape[0] % 2:
        raise ValueError(f"guided_output needs an even batch (conditional, then unconditional), "
                         f"got {x.shape[0]}")
    n = module.in_channels if channels is None else channels
    half = x[: x.shape[0] // 2]
    out = module.apply(variables, jnp.concatenate([half, half]), t, y)
    cond, uncond = jnp.split(out[..., :n], 2)
    guided = uncond + scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([guided, guided]), out[..., n:]], axis=-1)


_INDEX = re.compile(r"_(\d+)$")


def _torch_key(path: tuple) -> str:
    """``blocks_0/adaLN_modulation_1/kernel`` -> ``blocks.0.adaLN_modulation.1.weight``."""
    return statedict.torch_key(tuple(_INDEX.sub(r".\1", m) for m in path[:-1]) + path[-1:])


#: Flax <-> PyTorch names of DiT (layouts: the default conv/linear transposes).
LAYOUT = statedict.Layout(key=_torch_key)


def _name(module: DiT) -> str:
    arch = {k: getattr(module, k) for k in ("depth", "hidden_size", "patch_size", "num_heads")}
    name = next((n for n, cfg in DIT_CONFIGS.items() if cfg == arch), "DiT")
    return f"{name} (input_size={module.input_size}, num_classes={module.num_classes})"


def convert_state_dict(class_name: str, kwargs: Mapping[str, Any],
                       state_dict: Mapping[str, Any]) -> dict:
    """Flax ``{"params": ...}`` from an original DiT state dict (name -> array), strictly matched:
    a missing key, an unexpected key or a wrong shape raises a one-line ``ValueError``."""
    module = build(class_name, kwargs)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))
    return statedict.match(abstract, state_dict, layout=LAYOUT, what=_name(module))


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(state_dict, info)`` from a DiT ``.pt`` file, read without torch and without running code.

    A released file is the EMA state dict itself (``info`` is ``{}``). A ``train.py`` checkpoint
    ``{"model", "ema", "opt", "args"}`` gives its ``ema`` weights, and ``info`` holds the fields of
    its ``args`` (an ``argparse.Namespace``) as plain data: ``model`` ("DiT-XL/2"),
    ``image_size``, ``num_classes``, ... (see :func:`infer_kwargs`).
    """
    where = str(path)
    obj = torchfile.load(path)
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "ema" in obj:
        args = obj.get("args")
        if args is not None:
            if not isinstance(args, Mapping):
                raise torchfile.CheckpointFormatError(
                    f"{where}: 'args' is a {type(args).__name__}, not an argparse.Namespace")
            try:
                info = torchfile.json_value(args)
            except TypeError as e:
                raise torchfile.CheckpointFormatError(f"{where}: unsupported 'args' value ({e})") from None
        obj = obj["ema"]
    if not isinstance(obj, Mapping):
        raise torchfile.CheckpointFormatError(
            f"{where}: holds a {type(obj).__name__}, not a DiT state dict or train.py checkpoint")
    return torchfile.check_tensors(obj, where), info


def infer_kwargs(state_dict: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> dict:
    """The constructor kwargs of a checkpoint read by :func:`load_checkpoint`.

    From ``train.py`` args when ``info`` has them (``DiT_models[model](input_size=image_size // 8,
    num_classes=num_classes)``, as ``train.py`` builds it); otherwise from the tensor shapes, with
    the number of heads from :data:`DIT_CONFIGS` (raises ``ValueError`` for an architecture outside
    it), and the label table's last row taken as the null label (``class_dropout_prob`` 0.1, as in
    every released model).
    """
    if info and "model" in info:
        return arch_kwargs(info["model"], input_size=int(info["image_size"]) // 8,
                           num_classes=int(info["num_classes"]))
    try:
        hidden, in_channels, p, _ = np.shape(state_dict["x_embedder.proj.weight"])
        tokens = np.shape(state_dict["pos_embed"])[1]
        classes = np.shape(state_dict["y_embedder.embedding_table.weight"])[0] - 1
        out = np.shape(state_dict["final_layer.linear.weight"])[0] // (p * p)
        mlp = np.shape(state_dict["blocks.0.mlp.fc1.weight"])[0]
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not a DiT state dict: cannot read {e} from it") from None
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    arch = dict(depth=depth, hidden_size=hidden, patch_size=p)
    heads = [cfg["num_heads"] for cfg in DIT_CONFIGS.values()
             if {k: cfg[k] for k in arch} == arch]
    if not heads:
        raise ValueError(f"DiT with {arch} is none of DIT_CONFIGS; its num_heads cannot be read "
                         f"from the weights: pass the kwargs explicitly")
    return dict(input_size=math.isqrt(tokens) * p, patch_size=p, in_channels=in_channels,
                hidden_size=hidden, depth=depth, num_heads=heads[0], mlp_ratio=mlp / hidden,
                class_dropout_prob=0.1, num_classes=classes, learn_sigma=out == 2 * in_channels)


# ----------------------------------------------------------------------------------------------
# The family: conversion, schedule and denoiser.


def _shape_kwargs(state_dict: Mapping[str, Any]) -> dict:
    """input_size, num_classes and learn_sigma as the weights show them."""
    try:
        _, in_channels, p, _ = np.shape(state_dict["x_embedder.proj.weight"])
        tokens = np.shape(state_dict["pos_embed"])[1]
        classes = np.shape(state_dict["y_embedder.embedding_table.weight"])[0] - 1
        out = np.shape(state_dict["final_layer.linear.weight"])[0] // (p * p)
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not a DiT state dict: cannot read {e} from it") from None
    return dict(input_size=math.isqrt(tokens) * p, num_classes=classes, learn_sigma=out == 2 * in_channels)


def convert(src, dst, *, arch: str | None = None, config=None, vae=None, overwrite: bool = False) -> dict:
    """Convert a DiT checkpoint (a released EMA state dict or a ``train.py`` checkpoint) to ``dst``.

    The architecture comes from ``config`` (the original constructor's kwargs as a JSON file or
    dict, or ``{"kwargs": {...}}``), else ``arch`` ("DiT-XL/2", sizes from the weights), else the
    ``train.py`` args or the weights themselves (:func:`infer_kwargs`). ``vae``: a converted VAE
    folder (``jdiffsample convert vae``) recorded as the one that decodes this model's latents.
    """
    start = time.perf_counter()
    if Path(src).is_dir() or not Path(src).is_file():
        raise ValueError(f"{src}: no such file")
    checkpoint.check_destination(dst, overwrite, sources=[src])
    if arch is not None and config is not None:
        raise ValueError("give at most one of --arch and --config")
    state_dict, info = load_checkpoint(src)
    if config is not None:
        cfg = checkpoint.read_json(config, "config")
        kwargs = dict(cfg["kwargs"]) if "kwargs" in cfg else {k: v for k, v in cfg.items() if k != "class_name"}
    elif arch is not None:
        kwargs = arch_kwargs(arch, **_shape_kwargs(state_dict))
    else:
        kwargs = infer_kwargs(state_dict, info)
    variables = convert_state_dict("DiT", kwargs, state_dict)
    latent = dict(vae=vae_path(vae, build("DiT", kwargs).in_channels), scale=None, bias=None, range="[-1,1]")
    extra = dict(source=dict(kind="train.py" if info else "state_dict", file=Path(src).name), latent=latent)
    tensors = len(state_dict)
    del state_dict
    return checkpoint.save_converted(dst, "dit", "DiT", kwargs, variables, tensors=tensors, started=start,
                                     schedule=adm.diffusion_schedule(None), extra=extra, overwrite=overwrite,
                                     sources=[src])


def _convert_arguments(parser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--arch", choices=list(DIT_CONFIGS), help="the architecture (sizes read from the weights)")
    which.add_argument("--config", metavar="JSON", help="the original constructor's keyword arguments")
    parser.add_argument("--vae", metavar="DIR", help="converted VAE that decodes the latents (jdiffsample convert vae)")


def _denoise(module, variables, x, t, labels, schedule):
    """Epsilon (the first ``in_channels`` outputs) as a data prediction; label -1 (or None) is
    the null label ``num_classes``."""
    null = jnp.full(x.shape[:1], module.num_classes, jnp.int32)
    y = null if labels is None else jnp.where(labels < 0, null, labels)
    eps = module.apply(variables, x, adm.model_steps(x, t, schedule), y)[..., : module.in_channels]
    return models.x0_from_eps(x, eps, t, schedule)


FAMILY = family.Family(
    name="dit", description="facebookresearch/DiT (latent transformer; epsilon prediction, discrete VP schedule)",
    build=lambda class_name, kwargs, dtype=jnp.float32: build(class_name, kwargs, dtype=dtype),
    example_inputs=example_inputs,
    # DiT's diffusion: guided-diffusion's linear betas over 1000 steps
    conversion=family.Conversion(convert, _convert_arguments,
                                 schedule=lambda class_name, kwargs, extra: adm.diffusion_schedule(None)),
    sampling=family.Sampling(
        denoise=_denoise, sample_shape=lambda m: (m.input_size, m.input_size, m.in_channels),
        num_classes=lambda m: int(m.num_classes), has_null_label=lambda m: m.class_dropout_prob > 0,
        # the original sample.py guides 3 of the 4 latent channels (forward_with_cfg): the default,
        # so that its FID numbers are reproduced; --guidance-channels all is the textbook form
        guidance_channels=lambda m: 3 if m.in_channels == 4 else None),
)

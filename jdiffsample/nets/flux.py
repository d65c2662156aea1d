"""FLUX.1 (dev and schnell) as one network family: a diffusers ``FluxPipeline`` folder (rectified-flow
transformer, 16-channel VAE, CLIP-L and T5 text encoders, their tokenizers, the flow scheduler)
converted, streaming, into one jdiffsample checkpoint.

::

    jdiffsample convert flux FLUX.1-dev ckpt/flux-dev                 # reads model_index.json
    model = nets.load_model("ckpt/flux-dev", dtype="bfloat16")
    cond = encode_prompts(model, "ckpt/flux-dev", prompts, 1024, 1024)  # prompt_embeds, pooled, guidance
    schedule = schedule_at(model, 1024, 1024)                          # the resolution-dependent shift
    x0 = denoise(model.module, model.variables, x, t, None, schedule, **cond)
    images = model.apply(x0, method="decode")                           # [-1, 1], NHWC

The sampler's state is the unpacked latents, NHWC ``[B, H/8, W/8, 16]`` (:func:`sample_shape_at`);
:func:`denoise` packs them into 2x2 patches of 64-channel tokens for the transformer and unpacks its
velocity (:func:`jdiffsample.nets.flux_transformer.pack_latents`, ``unpack_latents``,
``latent_image_ids``). Flow matching: x_t = (1 - sigma) x0 + sigma eps, the network predicts
v = eps - x0 at the noise level sigma (its model time; it embeds 1000 sigma), so
x0 = x_t - sigma v under :class:`jdiffsample.schedules.RectifiedFlow` (``sigma = schedule.sigma(t)``).

Time shift: diffusers shifts the flow times by t' = e^mu / (e^mu + 1/t - 1) with mu linear in the
number of image tokens (:func:`calculate_shift`, ``use_dynamic_shifting``: FLUX.1-dev), which is
exactly ``RectifiedFlow(shift=e^mu)``: :func:`schedule_at` gives the schedule of a resolution (a
scheduler without dynamic shifting, FLUX.1-schnell's, has the static ``shift``). Its sampler uses the
times ``linspace(1, 1/N, N)`` and 0 (:func:`diffusers_grid`), starting at t = 1, pure noise.

Guidance: FLUX.1-dev is guidance-distilled: the ``guidance`` scale (diffusers' ``guidance_scale``,
3.5 by default) is an input of the network, one call per step; schnell has none. Real classifier-free
guidance (diffusers' ``true_cfg_scale`` with a negative prompt) goes on top: since x0 is affine in v
with the same x_t, ``x0_neg + s (x0_pos - x0_neg)`` of two :func:`denoise` calls (each with its own
prompt embeddings and the same ``guidance``) is diffusers' ``neg + s (pos - neg)`` on velocities.

The checkpoint's variables are ``{"params": {"transformer", "vae", "text_encoder", "text_encoder_2"}}``
(bfloat16/float16 tensors of the transformer and T5 kept as stored; CLIP and the VAE float32); its
``config.json`` holds every part's config, the scheduler config and the schedule; the tokenizer
folders are copied beside it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import schedules, timesteps
from jdiffsample.nets import clip, family, sharding, t5
from jdiffsample.nets import flux_transformer as ft
from jdiffsample.nets import vae as vae_net
from jdiffsample.nets.flux_transformer import latent_image_ids, pack_latents, text_ids, unpack_latents
from jdiffsample.nets.formats import checkpoint, diffusers_folder
from jdiffsample.tokenizer import FILES as CLIP_TOKENIZER_FILES
from jdiffsample.tokenizer import CLIPTokenizer

__all__ = ["Flux", "PIPELINES", "build", "example_inputs", "convert", "denoise", "encode_prompts", "conditioning",
           "sample_shape_at", "calculate_shift", "flow_shift", "schedule_info", "schedule", "schedule_at",
           "diffusers_grid", "image_tokens", "load_tokenizers", "default_max_sequence_length", "FAMILY",
           "pack_latents", "unpack_latents", "latent_image_ids", "text_ids"]

Dtype = Any
PIPELINES = ("FluxPipeline",)
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
_CLASSES = {"transformer": ft.CLASS_NAMES, "vae": vae_net.CLASS_NAMES, "text_encoder": ("CLIPTextModel",),
            "text_encoder_2": t5.CLASS_NAMES, "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
            "tokenizer_2": ("T5TokenizerFast", "T5Tokenizer"), "scheduler": ("FlowMatchEulerDiscreteScheduler",)}
_HINT = " (FLUX.1-dev/schnell; Stable Diffusion 3 folders: jdiffsample convert sd3; SD 1.x/2.x/XL: convert sd)"
#: diffusers' FluxPipeline defaults: 128 x 128 latents (4096 image tokens), guidance_scale 3.5.
DEFAULT_IMAGE_TOKENS = 4096
DEFAULT_GUIDANCE = 3.5


class Flux(nn.Module):
    """The networks of a FLUX.1 pipeline as one Flax module (each part named as the pipeline names it).

    * ``__call__(latents, prompt_embeds, pooled_prompt_embeds, timestep, guidance=None)``: the
      velocity of NHWC latents ``[B, h, w, C]`` at noise level ``timestep`` (sigma in [0, 1]), packed
      and unpacked around the transformer (initialising every part);
    * ``encode_text(clip_ids, t5_ids)``: ``{"prompt_embeds": T5's last hidden state [B, L, D],
      "pooled_prompt_embeds": CLIP's pooled output [B, P]}``, as the pipeline's ``encode_prompt``;
    * ``decode(latents)``: images in [-1, 1] (``z / scaling_factor + shift_factor`` decoded);
    * ``encode(images)``: the latents of images (posterior mean, shifted and scaled).
    """

    transformer: ft.FluxTransformer2DModel
    vae: vae_net.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    text_encoder_2: t5.T5EncoderModel

    def __call__(self, latents, prompt_embeds, pooled_prompt_embeds, timestep, guidance=None):
        if self.is_initializing():  # create the parameters of the parts the transformer does not use
            self.encode_text(*clip.example_inputs(self.text_encoder), *t5.example_inputs(self.text_encoder_2))
            self.vae(*vae_net.example_inputs(self.vae))
        _, h, w, _ = latents.shape
        tokens = self.transformer(pack_latents(latents), prompt_embeds, pooled_prompt_embeds, timestep,
                                  latent_image_ids(h, w), text_ids(prompt_embeds.shape[1]), guidance)
        return unpack_latents(tokens, h, w)

    def encode_text(self, clip_ids, t5_ids) -> dict[str, jax.Array]:
        return dict(prompt_embeds=self.text_encoder_2(t5_ids),
                    pooled_prompt_embeds=self.text_encoder(clip_ids)["pooler_output"])

    def _scaling(self):
        return jnp.float32(self.vae.scaling_factor), jnp.float32(self.vae.shift_factor or 0.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        scale, shift = self._scaling()
        return self.vae.decode(jnp.asarray(latents, jnp.float32) / scale + shift)

    def encode(self, images: jax.Array) -> jax.Array:
        scale, shift = self._scaling()
        return (self.vae.encode(images) - shift) * scale


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> Flux:
    """The :class:`Flux` module of the parts' configs (``{"transformer": {...}, "vae": {...},
    "text_encoder": {...}, "text_encoder_2": {...}}``, as a converted checkpoint records them)."""
    if class_name not in PIPELINES:
        raise ValueError(f"unsupported pipeline {class_name!r}; supported: {', '.join(PIPELINES)}")
    missing = [p for p in PARTS if not isinstance(kwargs.get(p), Mapping)]
    if missing:
        raise ValueError(f"{class_name}: the configs of {', '.join(missing)} are missing")
    return Flux(transformer=ft.build(ft.CLASS_NAMES[0], kwargs["transformer"], dtype=dtype),
                vae=vae_net.build("AutoencoderKL", kwargs["vae"], dtype=dtype),
                text_encoder=clip.build("CLIPTextModel", kwargs["text_encoder"], dtype=dtype),
                text_encoder_2=t5.build("T5EncoderModel", kwargs["text_encoder_2"], dtype=dtype))


def example_inputs(module: Flux) -> tuple:
    """``(latents, prompt_embeds, pooled, timestep, guidance)`` for ``module.init``."""
    tr = module.transformer
    c = tr.in_channels // 4
    return (jnp.zeros((1, 2, 2, c)), jnp.zeros((1, 1, tr.joint_attention_dim)), jnp.zeros((1, tr.pooled_projection_dim)),
            jnp.ones((1,)), jnp.ones((1,)) if tr.guidance_embeds else None)


# ----------------------------------------------------------------------------------------------
# Denoiser, conditioning and sizes (plain functions: the run pipeline wires them)


def denoise(module: Flux, variables, x, t, labels, schedule, *, prompt_embeds, pooled_prompt_embeds,
            guidance=None):
    """The data prediction ``x0 = x - sigma v`` of NHWC latents ``x`` at time ``t`` of ``schedule``
    (a :class:`jdiffsample.schedules.RectifiedFlow`; the network sees ``schedule.model_time(t)`` =
    sigma). ``guidance`` ``[B]``: the distilled guidance scale (FLUX.1-dev only)."""
    if labels is not None:
        raise ValueError("FLUX.1 is conditioned on text, not class labels")
    sigma = jnp.asarray(schedule.sigma(t), jnp.float32)
    steps = jnp.broadcast_to(jnp.asarray(schedule.model_time(t), jnp.float32), (x.shape[0],))
    v = module.apply(variables, x, prompt_embeds, pooled_prompt_embeds, steps, guidance)
    return x - (sigma * v).astype(x.dtype)


def conditioning(module: Flux) -> tuple:
    """The per-sample arrays :func:`denoise` needs (``guidance`` only for FLUX.1-dev)."""
    names = ("prompt_embeds", "pooled_prompt_embeds")
    return names + ("guidance",) if module.transformer.guidance_embeds else names


def default_max_sequence_length(module: Flux) -> int:
    """T5 tokens per prompt by default: 512 for FLUX.1-dev, 256 for schnell (as BFL and diffusers' docs)."""
    return 512 if module.transformer.guidance_embeds else 256


def load_tokenizers(checkpoint_dir) -> tuple:
    """``(CLIPTokenizer, T5Tokenizer)`` of a converted FLUX checkpoint."""
    return (CLIPTokenizer.from_folder(Path(checkpoint_dir) / "tokenizer"),
            t5.T5Tokenizer.from_folder(Path(checkpoint_dir) / "tokenizer_2"))


@functools.lru_cache(maxsize=4)
def _text_encoder(module: Flux):
    return jax.jit(lambda variables, clip_ids, t5_ids: module.apply(variables, clip_ids, t5_ids, method="encode_text"))


def encode_prompts(model, folder, prompts, height: int, width: int, *, max_sequence_length: int | None = None,
                   guidance: float = DEFAULT_GUIDANCE) -> dict:
    """The conditioning of each prompt, ``{"prompt_embeds": [P, L, D], "pooled_prompt_embeds": [P, 768]
    [, "guidance": [P]]}``: CLIP-L's pooled output of the prompt (CLIP's own length, 77) and T5's
    hidden states of it padded to ``max_sequence_length`` tokens (default
    :func:`default_max_sequence_length`); ``guidance`` (FLUX.1-dev): the distilled guidance scale.
    ``prompts=None`` is the empty prompt. ``height``/``width`` do not change the embeddings."""
    del height, width
    module = model.module
    clip_tokenizer, t5_tokenizer = load_tokenizers(folder)
    texts = [""] if prompts is None else list(prompts)
    length = default_max_sequence_length(module) if max_sequence_length is None else int(max_sequence_length)
    out = dict(_text_encoder(module)(model.variables, clip_tokenizer(texts), t5_tokenizer(texts, length)))
    if module.transformer.guidance_embeds:
        out["guidance"] = jnp.full((len(texts),), guidance, jnp.float32)
    return out


def _vae_factor(module: Flux) -> int:
    return 2 ** (len(module.vae.block_out_channels) - 1)


def sample_shape_at(module: Flux, height: int, width: int) -> tuple[int, int, int]:
    """``(H/f, W/f, 16)``: the NHWC latents of ``height`` x ``width`` images (f = 8, the VAE's factor);
    ``ValueError`` unless both are positive multiples of 2f (the 2x2 packing of the latents)."""
    step = 2 * _vae_factor(module)
    if height % step or width % step or height < step or width < step:
        raise ValueError(f"FLUX.1 needs height and width that are positive multiples of {step} (the VAE's factor "
                         f"{step // 2} times the 2x2 latent packing), got {height} x {width}")
    return height // (step // 2), width // (step // 2), module.transformer.in_channels // 4


def sample_shape(module: Flux) -> tuple[int, int, int]:
    """The pipeline's default size: 128 x 128 latents (1024 x 1024 pixels for the released VAE)."""
    return 128, 128, module.transformer.in_channels // 4


def image_tokens(module: Flux, height: int, width: int) -> int:
    """The number of packed image tokens of ``height`` x ``width`` images (what ``mu`` is linear in)."""
    h, w, _ = sample_shape_at(module, height, width)
    return (h // 2) * (w // 2)


# ----------------------------------------------------------------------------------------------
# The schedule


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """diffusers' ``calculate_shift``: mu, linear in the image token count through
    (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


_SCHEDULER_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_image_seq_len", "max_image_seq_len",
                   "base_shift", "max_shift", "time_shift_type")
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling", "use_flow_sigmas")
_DYNAMIC_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def schedule_info(scheduler_config: Mapping[str, Any]) -> dict:
    """The ``schedule`` entry of a converted checkpoint's config from a ``FlowMatchEulerDiscreteScheduler``
    config (validated: ``ValueError`` for options this port does not reproduce)."""
    cfg = scheduler_config
    bad = [k for k in _UNSUPPORTED if cfg.get(k)]
    if bad:
        raise ValueError(f"the scheduler sets {', '.join(bad)}, which jdiffsample's FLUX sampling does not reproduce")
    kind = cfg.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"scheduler time_shift_type={kind!r} is not supported; allowed: 'exponential', 'linear'")
    info = dict(type="RectifiedFlow", **{k: cfg[k] for k in _SCHEDULER_KEYS if cfg.get(k) is not None})
    info = {**_DYNAMIC_DEFAULTS, "shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": kind, **info}
    if not info["shift"] > 0 or info["base_image_seq_len"] == info["max_image_seq_len"]:
        raise ValueError(f"the scheduler's shift {info['shift']} must be positive and its base and max image "
                         f"sequence lengths differ")
    return info


def flow_shift(info: Mapping[str, Any], image_tokens: int = DEFAULT_IMAGE_TOKENS) -> float:
    """The static shift s of ``RectifiedFlow`` equal to the scheduler's shift for ``image_tokens``
    tokens: e^mu (``exponential``: e^mu / (e^mu + 1/t - 1) = s t / (1 + (s - 1) t)) or mu
    (``linear``) with mu = :func:`calculate_shift`; the static ``shift`` without dynamic shifting."""
    if not info.get("use_dynamic_shifting"):
        return float(info.get("shift", 1.0))
    mu = calculate_shift(image_tokens, info["base_image_seq_len"], info["max_image_seq_len"], info["base_shift"],
                         info["max_shift"])
    if info.get("time_shift_type", "exponential") == "linear":
        if not mu > 0:
            raise ValueError(f"the linear time shift needs mu > 0, got {mu} for {image_tokens} image tokens")
        return float(mu)
    return math.exp(mu)


def schedule(info: Mapping[str, Any], image_tokens: int = DEFAULT_IMAGE_TOKENS):
    """The :class:`jdiffsample.schedules.RectifiedFlow` of :func:`schedule_info`'s entry for
    ``image_tokens`` image tokens (default: the pipeline's 1024 x 1024)."""
    if info.get("type") != "RectifiedFlow":
        raise ValueError(f"FLUX.1 samples on a rectified-flow schedule, the config says {info.get('type')!r}")
    return schedules.RectifiedFlow(shift=flow_shift(info, image_tokens))


def schedule_at(model, height: int, width: int):
    """The schedule of a loaded FLUX model (:class:`jdiffsample.nets.Model`) for ``height`` x ``width``
    images: its time shift depends on the number of image tokens."""
    return schedule(schedule_info(model.extra["scheduler"]), image_tokens(model.module, height, width))


def diffusers_grid(model, n_steps: int, height: int, width: int) -> np.ndarray:
    """The times of ``FluxPipeline``'s sampler for ``n_steps`` steps at ``height`` x ``width``: its
    sigmas ``linspace(1, 1/N, N)`` shifted (dynamically for FLUX.1-dev), then 0, as times of the
    model's schedule at that size (:func:`jdiffsample.timesteps.flow_match`); it starts at t = 1."""
    return timesteps.flow_match(schedule_at(model, height, width), n_steps, model.extra["scheduler"],
                                image_seq_len=image_tokens(model.module, height, width), pipeline="flux")


# ----------------------------------------------------------------------------------------------
# Conversion


def _public(config: Mapping[str, Any]) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _check_consistent(module: Flux) -> None:
    """The parts fit each other (a folder mixing models fails here, before anything is read)."""
    tr = module.transformer
    for what, have, want in (("T5's d_model", module.text_encoder_2.d_model, tr.joint_attention_dim),
                             ("CLIP's hidden_size", module.text_encoder.hidden_size, tr.pooled_projection_dim),
                             ("4 x the VAE's latent_channels", 4 * module.vae.latent_channels, tr.in_channels)):
        if have != want:
            raise ValueError(f"the pipeline's parts do not fit: {what} is {have}, the transformer takes {want}")


def _read_state_dicts(src: Path) -> dict[str, Any]:
    """Every part's tensors, lazily (headers, shards and indexes checked; nothing read yet)."""
    stems = {"transformer": {}, "vae": {}, "text_encoder": dict(stem="model", bin_stem="pytorch_model"),
             "text_encoder_2": dict(stem="model", bin_stem="pytorch_model")}
    return {part: diffusers_folder.lazy_weights(src / part, **stems[part]) for part in PARTS}


def convert(src, dst, *, overwrite: bool = False) -> dict:
    """Convert a diffusers ``FluxPipeline`` folder ``src`` into the checkpoint ``dst``, streaming.

    Reads ``model_index.json``, every part's ``config.json`` and the headers of its (sharded)
    safetensors files, the tokenizer folders and the scheduler config, and matches every tensor
    to the Flax parameters before anything is written; the tensors are then read one at a time while
    the checkpoint is written (:mod:`jdiffsample.nets.formats.lazy`), so the peak memory stays far below the
    model's size. ``ValueError`` (one line, nothing written) for another pipeline, a missing part,
    file or shard, a truncated file or tensors that do not fit.
    """
    start = time.perf_counter()
    src = Path(src)
    checkpoint.check_destination(dst, overwrite, sources=[src])  # before any work
    class_name, index = diffusers_folder.read_model_index(src, PIPELINES, _HINT)
    classes = {part: diffusers_folder.pipeline_part(src, index, part, _CLASSES[part]) for part in _CLASSES}
    clip_tokenizer, t5_tokenizer = CLIPTokenizer.from_folder(src / "tokenizer"), t5.T5Tokenizer.from_folder(src / "tokenizer_2")
    scheduler_file = src / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise ValueError(f"{src}: scheduler/scheduler_config.json is missing")
    scheduler = checkpoint.read_json(scheduler_file, "scheduler config")
    info = schedule_info(scheduler)
    configs = {}
    for part in PARTS:
        config = _public(diffusers_folder.read_config(src / part))
        configs[part] = {"_class_name": classes[part], **config} if part.startswith("text_encoder") else config
    module = build(class_name, configs)
    _check_consistent(module)

    state_dicts = _read_state_dicts(src)
    params = dict(transformer=ft.convert_state_dict(classes["transformer"], configs["transformer"],
                                                    state_dicts["transformer"])["params"],
                  vae=vae_net.convert_state_dict("AutoencoderKL", configs["vae"], state_dicts["vae"])["params"],
                  text_encoder=clip.convert_state_dict("CLIPTextModel", configs["text_encoder"],
                                                       state_dicts["text_encoder"])["params"],
                  text_encoder_2=t5.convert_state_dict("T5EncoderModel", configs["text_encoder_2"],
                                                       state_dicts["text_encoder_2"])["params"])
    tensors = sum(len(sd) for sd in state_dicts.values())
    tokenizers = dict(tokenizer=dict(folder="tokenizer", files=[f for f in CLIP_TOKENIZER_FILES if (src / "tokenizer" / f).is_file()],
                                     model_max_length=clip_tokenizer.model_max_length),
                      tokenizer_2=dict(folder="tokenizer_2", files=[f for f in t5.TOKENIZER_FILES if (src / "tokenizer_2" / f).is_file()],
                                       model_max_length=t5_tokenizer.model_max_length))
    extra = dict(scheduler=scheduler, tokenizers=tokenizers, latent=dict(vae="internal", range="[-1,1]"),
                 default_max_sequence_length=default_max_sequence_length(module),
                 source=dict(kind="diffusers", folder=src.name, model_index=index))
    files = {f"{name}/{f}": src / name / f for name, tok in tokenizers.items() for f in tok["files"]}
    return checkpoint.save_converted(dst, "flux", class_name, configs, {"params": params}, tensors=tensors,
                                     started=start, schedule=schedule(info), extra=extra, overwrite=overwrite,
                                     files=files, sources=[src])


FAMILY = family.Family(
    name="flux", description="FLUX.1 dev/schnell diffusers pipeline folder (flow transformer, VAE, CLIP-L, T5)",
    build=build, example_inputs=example_inputs,
    conversion=family.Conversion(
        convert, schedule=lambda class_name, kwargs, extra: schedule(schedule_info(extra.get("scheduler", {})))),
    sampling=family.Sampling(
        denoise=denoise, sample_shape=sample_shape, conditioning=conditioning, encode_prompts=encode_prompts,
        sample_shape_at=sample_shape_at, pixels_per_latent=_vae_factor, prediction=lambda module: "flow_prediction", sharding=sharding.HEADS_AND_MLP,
        grids={"diffusers": diffusers_grid}, true_cfg=True,
        schedule_at=schedule_at, guidance_input=lambda module: bool(module.transformer.guidance_embeds),
        prompt_options=("max_sequence_length",), default_guidance=DEFAULT_GUIDANCE),
)

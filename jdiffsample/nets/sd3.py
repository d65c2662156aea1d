"""Stable Diffusion 3 / 3.5 as one network family: a diffusers ``StableDiffusion3Pipeline`` folder
(MMDiT transformer, 16-channel VAE, CLIP-L and CLIP-G text encoders with projections, T5, tokenizers,
flow-matching scheduler) converted into one jdiffsample checkpoint.

::

    jdiffsample convert sd3 stable-diffusion-3.5-medium ckpt/sd35m      # reads model_index.json
    model = nets.load_model("ckpt/sd35m")
    cond = encode_prompts(model, "ckpt/sd35m", prompts, 1024, 1024)    # {"context", "pooled"}
    uncond = encode_prompts(model, "ckpt/sd35m", negative_prompts, 1024, 1024)   # None: ""
    x0 = denoise(model.module, model.variables, x, t, None, model.schedule, **cond)
    images = model.apply(x0, method="decode")                           # [-1, 1], NHWC

The checkpoint's variables are ``{"params": {"transformer", "vae", "text_encoder", "text_encoder_2"[,
"text_encoder_3"]}}``; its ``config.json`` holds every part's config (``kwargs``), the scheduler config,
the schedule and the pipeline's ``model_index.json``; the tokenizer folders are copied beside it.
The transformer's and T5's float16 / bfloat16 tensors are kept as stored (each layer casts them to its
compute dtype).

Conditioning (as ``StableDiffusion3Pipeline.encode_prompt`` builds it): ``context`` ``[B, 77 + L, 4096]``:
the penultimate hidden states of CLIP-L and CLIP-G (both tokenized to the first tokenizer's
``model_max_length``) concatenated along features, zero-padded to the T5 width, then T5's last hidden
state (``L = max_sequence_length`` tokens, default 256; zeros when the pipeline has no T5) appended
along tokens; ``pooled`` ``[B, 2048]``: both CLIP projections concatenated. A negative prompt is
encoded the same way; no negative prompt means the empty prompt, as diffusers does.

Time: :class:`jdiffsample.schedules.RectifiedFlow` with the scheduler's static ``shift`` (3.0 for every
SD3 / 3.5 release): x_t = (1 - s) x0 + s eps with s = sigma(t) = shift t / (1 + (shift - 1) t). The
transformer predicts the velocity v = eps - x0 from ``timestep = num_train_timesteps * s``; the
denoiser returns x0 = x_t - s v. Classifier-free guidance (diffusers' ``guidance_scale``) is the usual
``uncond + w (cond - uncond)`` on these data predictions (linear in v, so the same as diffusers' on v);
SD3.5's skip-layer guidance adds ``scale (cond - cond_skipping_layers)`` in the steps
:func:`jdiffsample.guidance.skip_layer_steps` selects (``--slg-layers``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import schedules, timesteps
from jdiffsample.nets import clip, family, sd3_transformer, sharding, t5
from jdiffsample.nets import vae as vae_net
from jdiffsample.nets.formats import checkpoint, diffusers_folder
from jdiffsample.tokenizer import FILES as CLIP_TOKENIZER_FILES
from jdiffsample.tokenizer import CLIPTokenizer

__all__ = ["StableDiffusion3", "PIPELINE", "MAX_SEQUENCE_LENGTH", "build", "example_inputs", "encode_prompts",
           "tokenize", "denoise", "sample_shape_at", "schedule_info", "schedule",
           "diffusers_grid", "convert", "FAMILY"]

Dtype = Any
PIPELINE = "StableDiffusion3Pipeline"
#: The pipeline's default and largest T5 sequence length.
MAX_SEQUENCE_LENGTH, LONGEST_SEQUENCE = 256, 512
_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
_CLASSES = {"transformer": sd3_transformer.CLASS_NAMES, "vae": vae_net.CLASS_NAMES,
            "text_encoder": ("CLIPTextModelWithProjection",), "text_encoder_2": ("CLIPTextModelWithProjection",),
            "text_encoder_3": t5.CLASS_NAMES, "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
            "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"), "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast")}
#: The end of the error message for another pipeline's folder.
_HINT = " (Stable Diffusion 3 / 3.5; FLUX.1 folders: jdiffsample convert flux; SD 1.x/2.x/XL: convert sd)"


class StableDiffusion3(nn.Module):
    """The networks of a Stable Diffusion 3 pipeline as one Flax module (each part a submodule named
    as the pipeline names it; ``text_encoder_3`` None for a pipeline without T5).

    * ``__call__(x, timesteps, context, pooled, skip_layers=())``: the transformer's velocity (and,
      when initialising, every part's parameters);
    * ``encode_text(ids, ids_2, ids_3, clip_skip=None)``: ``{"context", "pooled"}`` (module docstring;
      without T5, ``ids_3`` only gives the sequence length of the zeros);
    * ``decode(latents)``: images in [-1, 1] from diffusion latents (``z / scaling_factor + shift_factor``
      decoded); ``encode(images)``: the diffusion latents of images (the posterior mean, shifted and scaled).
    """

    transformer: sd3_transformer.SD3Transformer2DModel
    vae: vae_net.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    text_encoder_2: clip.CLIPTextModel
    text_encoder_3: t5.T5EncoderModel | None = None
    num_train_timesteps: int = 1000

    def __call__(self, x, timesteps, context, pooled, skip_layers: tuple[int, ...] = ()):
        if self.is_initializing():  # create the parameters of the parts the transformer does not use
            ids = jnp.zeros((1, self.text_encoder.max_position_embeddings), jnp.int32)
            self.encode_text(ids, ids, jnp.zeros((1, 4), jnp.int32))
            self.vae(*vae_net.example_inputs(self.vae))
        return self.transformer(x, timesteps, context, pooled, tuple(skip_layers))

    def encode_text(self, ids, ids_2, ids_3, clip_skip: int | None = None) -> dict[str, jax.Array]:
        layer = -(int(clip_skip or 0) + 2)
        outs = [self.text_encoder(ids), self.text_encoder_2(ids_2)]
        width = self.transformer.joint_attention_dim
        clip_states = jnp.concatenate([o["hidden_states"][layer] for o in outs], axis=-1)
        clip_states = jnp.pad(clip_states, ((0, 0), (0, 0), (0, width - clip_states.shape[-1])))
        ids_3 = jnp.asarray(ids_3)
        if self.text_encoder_3 is None:
            t5_states = jnp.zeros((*ids_3.shape, width), jnp.float32)
        else:
            t5_states = self.text_encoder_3(ids_3).astype(jnp.float32)
        return dict(context=jnp.concatenate([clip_states, t5_states], axis=1),
                    pooled=jnp.concatenate([o["text_embeds"] for o in outs], axis=-1))

    def decode(self, latents: jax.Array) -> jax.Array:
        v = self.vae
        return v.decode(jnp.asarray(latents, jnp.float32) / v.scaling_factor + (v.shift_factor or 0.0))

    def encode(self, images: jax.Array) -> jax.Array:
        v = self.vae
        return (v.encode(images) - (v.shift_factor or 0.0)) * v.scaling_factor


def _text_class(config: Mapping[str, Any], default: str) -> str:
    return config.get("_class_name") or (config.get("architectures") or [default])[0]


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> StableDiffusion3:
    """The :class:`StableDiffusion3` module of its parts' configs (``{"transformer": {...}, "vae": {...},
    "text_encoder": {...}, "text_encoder_2": {...}, "text_encoder_3": {...} or None,
    "num_train_timesteps": 1000}``, as a converted checkpoint records them)."""
    if class_name != PIPELINE:
        raise ValueError(f"unsupported pipeline {class_name!r}; the sd3 family takes {PIPELINE}")
    missing = [p for p in _PARTS[:4] if not isinstance(kwargs.get(p), Mapping)]
    if missing:
        raise ValueError(f"{class_name}: the configs of {', '.join(missing)} are missing")
    t5_config = kwargs.get("text_encoder_3")
    return StableDiffusion3(
        transformer=sd3_transformer.build(sd3_transformer.CLASS_NAMES[0], kwargs["transformer"], dtype=dtype),
        vae=vae_net.build(vae_net.CLASS_NAMES[0], kwargs["vae"], dtype=dtype),
        text_encoder=clip.build(_text_class(kwargs["text_encoder"], "CLIPTextModelWithProjection"),
                                kwargs["text_encoder"], dtype=dtype),
        text_encoder_2=clip.build(_text_class(kwargs["text_encoder_2"], "CLIPTextModelWithProjection"),
                                  kwargs["text_encoder_2"], dtype=dtype),
        text_encoder_3=None if t5_config is None else t5.build(_text_class(t5_config, "T5EncoderModel"), t5_config,
                                                               dtype=dtype),
        num_train_timesteps=int(kwargs.get("num_train_timesteps", 1000)))


def example_inputs(module: StableDiffusion3) -> tuple:
    """``(x, timesteps, context, pooled)`` for ``module.init`` (the transformer's inputs; calling it
    while initialising initialises every part)."""
    return sd3_transformer.example_inputs(module.transformer)


def _check_consistent(module: StableDiffusion3) -> None:
    """The parts' widths fit together (a folder mixing models fails here, before any work)."""
    tr, encoders = module.transformer, (module.text_encoder, module.text_encoder_2)
    clip_width = sum(m.hidden_size for m in encoders)
    if clip_width > tr.joint_attention_dim:
        raise ValueError(f"the CLIP encoders give {clip_width} features, more than the transformer's "
                         f"joint_attention_dim {tr.joint_attention_dim}")
    if module.text_encoder_3 is not None and module.text_encoder_3.d_model != tr.joint_attention_dim:
        raise ValueError(f"T5's d_model is {module.text_encoder_3.d_model}, the transformer's joint_attention_dim "
                         f"{tr.joint_attention_dim}")
    pooled = sum(m.projection_dim or 0 for m in encoders)
    if pooled != tr.pooled_projection_dim:
        raise ValueError(f"the CLIP projections give {pooled} pooled features, the transformer's "
                         f"pooled_projection_dim is {tr.pooled_projection_dim}")
    if module.vae.latent_channels != tr.in_channels:
        raise ValueError(f"the VAE has {module.vae.latent_channels} latent channels, the transformer takes "
                         f"{tr.in_channels}")


# ----------------------------------------------------------------------------------------------
# Prompts and the denoiser


def _tokenizers(folder):
    """The three tokenizers of a checkpoint (or pipeline) folder; T5's None when it has none."""
    root = Path(folder)
    third = t5.T5Tokenizer.from_folder(root / "tokenizer_3") if (root / "tokenizer_3").is_dir() else None
    return CLIPTokenizer.from_folder(root / "tokenizer"), CLIPTokenizer.from_folder(root / "tokenizer_2"), third


def tokenize(folder, prompts, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> tuple[np.ndarray, ...]:
    """``(ids, ids_2, ids_3)`` of ``prompts`` as the pipeline tokenizes them: both CLIP tokenizers to the
    first one's ``model_max_length``, T5 to ``max_sequence_length`` (at most 512; without a T5 tokenizer,
    zeros of that length)."""
    if not 1 <= int(max_sequence_length) <= LONGEST_SEQUENCE:
        raise ValueError(f"max_sequence_length must lie in [1, {LONGEST_SEQUENCE}], got {max_sequence_length}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    first, second, third = _tokenizers(folder)
    length = first.model_max_length
    ids_3 = (np.zeros((len(prompts), max_sequence_length), np.int32) if third is None
             else third(prompts, max_length=max_sequence_length))
    return first(prompts, max_length=length), second(prompts, max_length=length), ids_3


@functools.lru_cache(maxsize=4)
def _text_encoder(module: StableDiffusion3):
    return jax.jit(lambda variables, *ids: module.apply(variables, *ids, method="encode_text"))


def encode_prompts(model, folder, prompts, height: int, width: int, *,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict:
    """The conditioning of each prompt, ``{"context": [P, 77 + L, D], "pooled": [P, 2048]}`` (the
    family's ``encode_prompts``; ``model`` a :class:`jdiffsample.nets.Model`, ``folder`` its
    checkpoint). ``prompts=None`` is the empty prompt, the pipeline's default negative prompt. The
    conditioning does not depend on the image size (``height``/``width`` are checked only)."""
    sample_shape_at(model.module, height, width)
    texts = [""] if prompts is None else prompts
    return dict(_text_encoder(model.module)(model.variables, *tokenize(folder, texts, max_sequence_length)))


def denoise(module: StableDiffusion3, variables, x, t, labels, schedule, *, context, pooled,
            skip_layers: tuple[int, ...] = ()):
    """The family's ``denoise``: x0 = x - s v with s = ``schedule.sigma(t)`` (= ``schedule.model_time(t)``,
    the shifted flow time) and v the transformer's velocity at ``timestep = num_train_timesteps * s``;
    ``x`` NHWC latents, ``t`` a scalar. ``skip_layers`` (static): blocks to bypass (skip-layer guidance's
    second prediction). ``labels`` must be None (text-conditional only)."""
    if labels is not None:
        raise ValueError("Stable Diffusion 3 is conditioned on text, not on class labels")
    s = jnp.asarray(schedule.model_time(t), jnp.float32)
    steps = jnp.broadcast_to(module.num_train_timesteps * s, (x.shape[0],))
    v = module.apply(variables, x, steps, context, pooled, tuple(skip_layers))
    return x - s.astype(x.dtype) * v.astype(x.dtype)


def sample_shape_at(module: StableDiffusion3, height: int, width: int) -> tuple[int, int, int]:
    """The latent shape ``(height / f, width / f, 16)`` for images of ``height`` x ``width`` pixels (f the
    VAE's factor, 8); ``ValueError`` unless both are multiples of f x patch_size (16) that fit the
    transformer's position grid."""
    factor = 2 ** (len(module.vae.block_out_channels) - 1)
    step, tr = factor * module.transformer.patch_size, module.transformer
    if height % step or width % step or height < step or width < step:
        raise ValueError(f"height and width must be positive multiples of {step} (the VAE's factor {factor} times "
                         f"the patch size {tr.patch_size}), got {height} x {width}")
    largest = step * tr.pos_embed_max_size
    if height > largest or width > largest:
        raise ValueError(f"height and width may be at most {largest} pixels (pos_embed_max_size "
                         f"{tr.pos_embed_max_size} patches), got {height} x {width}")
    return height // factor, width // factor, int(tr.in_channels)


def _sample_shape(module: StableDiffusion3) -> tuple[int, int, int]:
    size = module.transformer.sample_size
    return size, size, int(module.transformer.in_channels)


# ----------------------------------------------------------------------------------------------
# The schedule

#: Scheduler options that change the time grid beyond the static shift (none of the releases sets them).
_UNSUPPORTED = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "invert_sigmas", "shift_terminal", "stochastic_sampling")


def schedule_info(scheduler_config: Mapping[str, Any]) -> dict:
    """The ``schedule`` entry of a converted checkpoint (validated): ``{"type": "RectifiedFlow",
    "shift", "num_train_timesteps"}`` from a ``FlowMatchEulerDiscreteScheduler`` config."""
    if not isinstance(scheduler_config, Mapping):
        raise ValueError("a Stable Diffusion 3 schedule needs the folder's scheduler config (scheduler_config.json)")
    name = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"the scheduler is a {name}; Stable Diffusion 3 folders use FlowMatchEulerDiscreteScheduler")
    used = [k for k in _UNSUPPORTED if scheduler_config.get(k)]
    if used:
        raise ValueError(f"scheduler options {used} are not supported (Stable Diffusion 3 uses a static shift)")
    info = dict(type="RectifiedFlow", shift=float(scheduler_config.get("shift", 1.0)),
                num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)))
    schedule(info)  # validates
    return info


def schedule(info: Mapping[str, Any]):
    """The :class:`jdiffsample.schedules.RectifiedFlow` (static shift) of a ``schedule`` entry."""
    if info.get("type") != "RectifiedFlow":
        raise ValueError(f"Stable Diffusion 3 samples on a RectifiedFlow schedule, the config says {info.get('type')!r}")
    try:
        return schedules.RectifiedFlow(shift=float(info["shift"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the schedule's shift is not valid ({err})") from None


def diffusers_grid(model, n_steps: int, height: int | None = None, width: int | None = None) -> np.ndarray:
    """The times of ``StableDiffusion3Pipeline``'s sampler for ``n_steps`` steps: the scheduler's
    shifted sigmas from 1 (:func:`jdiffsample.timesteps.flow_match`), then 0."""
    return timesteps.flow_match(model.schedule, n_steps, model.extra["scheduler"], pipeline="sd3")


# ----------------------------------------------------------------------------------------------
# Conversion


def _check_part(src: Path, index: Mapping[str, Any], part: str) -> str | None:
    """The class of pipeline part ``part``, checked (listed, supported, a folder); None for a T5 part
    that model_index.json lists as absent."""
    entry = index.get(part)
    if part in ("text_encoder_3", "tokenizer_3") and (entry is None or entry == [None, None]):
        return None
    return diffusers_folder.pipeline_part(src, index, part, _CLASSES[part])


def _tokenizer_files(src: Path, name: str) -> list[str]:
    files = t5.TOKENIZER_FILES if name == "tokenizer_3" else CLIP_TOKENIZER_FILES
    return [f for f in files if (src / name / f).is_file()]


#: part -> (read its folder: ``(path, class_name) -> state dict``, convert: ``(class_name, config, state
#: dict) -> variables``); the transformer and T5 keep their stored dtypes.
_READERS = {
    "transformer": (lambda path, _: sd3_transformer.load_folder(path, lazy=True)[1],
                    functools.partial(sd3_transformer.convert_state_dict, dtype=None)),
    "vae": (lambda path, _: vae_net.load_folder(path)[1], vae_net.convert_state_dict),
    "text_encoder_3": (lambda path, _: t5.load_folder(path, lazy=True)[1], t5.convert_state_dict),
    "clip": (lambda path, class_name: clip.load_folder(path, class_name)[2], clip.convert_state_dict),
}


def convert(src, dst, *, overwrite: bool = False) -> dict:
    """Convert a diffusers Stable Diffusion 3 / 3.5 pipeline folder ``src`` into the checkpoint ``dst``.

    Reads ``model_index.json``, every part's ``config.json`` and weights (single or sharded safetensors
    with their ``*.index.json``, or ``.bin`` read without executing code; see
    :mod:`jdiffsample.nets.formats.diffusers_folder`), the tokenizer folders and the scheduler config. Everything
    is checked before anything is written. The transformer's and T5's tensors are matched lazily and
    read one at a time while the checkpoint is written (:mod:`jdiffsample.nets.formats.lazy`), in their stored
    dtypes (float16 / bfloat16 releases stay so); the CLIP encoders and the VAE are stored as float32.
    """
    start = time.perf_counter()
    src = Path(src)
    checkpoint.check_destination(dst, overwrite, sources=[src])  # before any work
    index = diffusers_folder.read_model_index(src, (PIPELINE,), _HINT)[1]
    classes = {part: _check_part(src, index, part) for part in _PARTS}
    parts = [p for p in _PARTS if classes[p] is not None]
    for part in parts:
        if part in _TOKENIZERS and _check_part(src, index, _TOKENIZERS[part]) is None:
            raise ValueError(f"{src}: {part} has no {_TOKENIZERS[part]}")
    tokenizers = [_TOKENIZERS[p] for p in parts if p in _TOKENIZERS]
    _tokenizers(src)  # every tokenizer readable
    scheduler_file = src / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise ValueError(f"{src}: scheduler/scheduler_config.json is missing")
    scheduler = checkpoint.read_json(scheduler_file, "scheduler config")
    info = schedule_info(scheduler)

    configs: dict[str, Any] = {}
    for part in parts:
        config = {k: v for k, v in diffusers_folder.read_config(src / part).items() if not k.startswith("_")}
        configs[part] = {"_class_name": classes[part], **config} if part.startswith("text_encoder") else config
    kwargs = dict(configs, text_encoder_3=configs.get("text_encoder_3"),
                  num_train_timesteps=info["num_train_timesteps"])
    module = build(PIPELINE, kwargs)
    _check_consistent(module)

    params, tensors = {}, 0
    for part in parts:
        load, convert_part = _READERS.get(part, _READERS["clip"])
        state_dict = load(src / part, classes[part])
        params[part] = convert_part(classes[part], configs[part], state_dict)["params"]
        tensors += len(state_dict)
        del state_dict
    extra = dict(scheduler=scheduler, tokenizers={n: dict(folder=n) for n in tokenizers},
                 latent=dict(vae="internal", range="[-1,1]"), source=dict(kind="diffusers", folder=src.name,
                                                                          model_index=index))
    files = {f"{n}/{f}": src / n / f for n in tokenizers for f in _tokenizer_files(src, n)}
    return checkpoint.save_converted(dst, "sd3", PIPELINE, kwargs, {"params": params}, tensors=tensors,
                                     started=start, schedule=schedule(info), extra=extra, overwrite=overwrite,
                                     files=files, sources=[src])


FAMILY = family.Family(
    name="sd3", description="Stable Diffusion 3 / 3.5 diffusers pipeline folder (MMDiT, 16-channel VAE, CLIP-L/G, T5)",
    build=build, example_inputs=example_inputs,
    conversion=family.Conversion(
        convert, schedule=lambda class_name, kwargs, extra: schedule(schedule_info(extra.get("scheduler")))),
    sampling=family.Sampling(
        denoise=denoise, sample_shape=_sample_shape, conditioning=lambda module: ("context", "pooled"),
        encode_prompts=encode_prompts, sample_shape_at=sample_shape_at, pixels_per_latent=lambda m: 2 ** (len(m.vae.block_out_channels) - 1), prediction=lambda module: "flow_prediction",
        sharding=sharding.HEADS_AND_MLP, prompt_options=("max_sequence_length",),
        grids={"diffusers": diffusers_grid}, skip_layers=lambda module: module.transformer.num_layers),
)

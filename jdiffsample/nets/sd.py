"""Stable Diffusion 1.x / 2.x / SDXL as one network family: a diffusers pipeline folder (UNet, VAE,
CLIP text encoder(s), tokenizer(s), scheduler) converted into one jdiffsample checkpoint.

::

    jdiffsample convert sd stable-diffusion-xl-base-1.0 ckpt/sdxl      # reads model_index.json
    module, variables = nets.load("ckpt/sdxl")                         # a StableDiffusion module
    tokenizers = load_tokenizers("ckpt/sdxl")
    cond = module.apply(variables, *[t(prompts) for t in tokenizers], method="encode_text")
    added = dict(text_embeds=cond["text_embeds"], time_ids=time_ids(batch, (1024, 1024)))   # SDXL only
    x0 = unet_denoise(module, variables, x, t, cond["context"], added, schedule, module.prediction_type)
    images = module.apply(variables, x0, method="decode")              # [-1, 1], NHWC

The checkpoint's variables are ``{"params": {"unet", "vae", "text_encoder"[, "text_encoder_2"]},
"skip": {"unet": ...}}`` (the UNet's Skip-Tuning scales, see :mod:`jdiffsample.nets.sd_unet`); its
``config.json`` holds every part's config (``kwargs``), the scheduler config, the schedule, the
pipeline's ``model_index.json`` and the tokenizers' settings; the tokenizer folders are copied beside
it (``tokenizer/``, ``tokenizer_2/``).

Conditioning (what the sampler passes on): ``context`` ``[B, L, cross_attention_dim]`` (SD 1.x/2.x:
the text encoder's last hidden state after its final LayerNorm; SDXL: both encoders' penultimate
states concatenated), and for SDXL ``added_cond = {"text_embeds": [B, 1280] (the second encoder's
projected pooled output), "time_ids": [B, 6] (original size, crop top-left, target size)}``.

Schedule: the scheduler config's betas (``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` or
``trained_betas``, optionally ``rescale_betas_zero_snr``) as a :class:`jdiffsample.schedules.VPDiscrete`;
the network predicts ``epsilon``, ``v_prediction`` or ``sample`` (``prediction_type``).
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

from jdiffsample import schedules
from jdiffsample.nets import clip, family, sd_unet
from jdiffsample.nets import vae as vae_net
from jdiffsample.nets.formats import checkpoint, diffusers_folder
from jdiffsample.tokenizer import FILES as TOKENIZER_FILES
from jdiffsample.tokenizer import CLIPTokenizer

__all__ = ["StableDiffusion", "PIPELINES", "build", "example_inputs", "convert", "unet_denoise", "time_ids",
           "schedule", "prediction", "load_tokenizers", "FAMILY"]

Dtype = Any
#: Supported pipeline classes and their network parts.
PIPELINES = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
_TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
_CLASSES = {"unet": sd_unet.CLASS_NAMES, "vae": vae_net.CLASS_NAMES, "text_encoder": clip.CLASS_NAMES,
            "text_encoder_2": clip.CLASS_NAMES, "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
            "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast")}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class StableDiffusion(nn.Module):
    """The networks of a Stable Diffusion pipeline as one Flax module (each part a submodule named
    as the pipeline names it).

    * ``__call__(x, timesteps, context, added_cond=None)``: the UNet (initialising every part);
    * ``encode_text(input_ids, input_ids_2=None, clip_skip=None)``: the conditioning dict
      ``{"context"[, "text_embeds"]}`` (see the module docstring; ``clip_skip`` as diffusers);
    * ``decode(latents)``: images in [-1, 1] from diffusion latents (the VAE's scaling undone);
    * ``encode(images)``: the diffusion latents of images (the posterior mean, scaled).
    """

    unet: sd_unet.UNet2DConditionModel
    vae: vae_net.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    text_encoder_2: clip.CLIPTextModel | None = None
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"StableDiffusion: prediction_type={self.prediction_type!r} is not supported; "
                             f"allowed: {', '.join(PREDICTION_TYPES)}")
        super().__post_init__()

    def __call__(self, x, timesteps, context, added_cond=None):
        if self.is_initializing():  # create the parameters of the parts the UNet does not use
            self.encode_text(*(clip.example_inputs(m)[0] for m in self._encoders))
            self.vae(*vae_net.example_inputs(self.vae))
        return self.unet(x, timesteps, context, added_cond)

    @property
    def _encoders(self) -> tuple:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    def encode_text(self, input_ids, input_ids_2=None, clip_skip: int | None = None) -> dict[str, jax.Array]:
        if (input_ids_2 is None) != (self.text_encoder_2 is None):
            raise ValueError(f"this pipeline has {len(self._encoders)} text encoder(s): pass as many input_ids")
        skip = int(clip_skip or 0)
        if self.text_encoder_2 is None:
            out = self.text_encoder(input_ids)
            if not skip:
                return dict(context=out["last_hidden_state"])
            return dict(context=self.text_encoder.final_norm(out["hidden_states"][-(skip + 1)]))
        outs = [self.text_encoder(input_ids), self.text_encoder_2(input_ids_2)]
        context = jnp.concatenate([o["hidden_states"][-(skip + 2)] for o in outs], axis=-1)
        return dict(context=context, text_embeds=outs[1]["text_embeds"])

    def _latent_scaling(self):
        v = self.vae
        if v.latents_mean is not None and v.latents_std is not None:
            return (jnp.asarray(v.latents_std, jnp.float32) / v.scaling_factor, jnp.asarray(v.latents_mean, jnp.float32))
        return jnp.float32(1.0 / v.scaling_factor), jnp.float32(v.shift_factor or 0.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        scale, shift = self._latent_scaling()
        return self.vae.decode(jnp.asarray(latents, jnp.float32) * scale + shift)

    def encode(self, images: jax.Array) -> jax.Array:
        scale, shift = self._latent_scaling()
        return (self.vae.encode(images) - shift) / scale


def _part_class(name: str, config: Mapping[str, Any]) -> str:
    if name.startswith("text_encoder"):
        return config.get("_class_name") or (config.get("architectures") or ["CLIPTextModel"])[0]
    return _CLASSES[name][0]


def build(class_name: str, kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32) -> StableDiffusion:
    """The :class:`StableDiffusion` module of a pipeline class and its parts' configs
    (``{"unet": {...}, "vae": {...}, "text_encoder": {...}[, "text_encoder_2": {...}],
    "prediction_type": ...}``, as a converted checkpoint records them)."""
    if class_name not in PIPELINES:
        raise ValueError(f"unsupported pipeline {class_name!r}; supported: {', '.join(PIPELINES)}")
    parts = PIPELINES[class_name]
    missing = [p for p in parts if not isinstance(kwargs.get(p), Mapping)]
    if missing:
        raise ValueError(f"{class_name}: the configs of {', '.join(missing)} are missing")
    modules = {}
    for name in parts:
        builder = {"unet": sd_unet.build, "vae": vae_net.build}.get(name, clip.build)
        modules[name] = builder(_part_class(name, kwargs[name]), kwargs[name], dtype=dtype)
    return StableDiffusion(**modules, prediction_type=kwargs.get("prediction_type", "epsilon"))


def example_inputs(module: StableDiffusion) -> tuple:
    """``(x, timesteps, context, added_cond)`` for ``module.init`` (every part is initialised)."""
    return sd_unet.example_inputs(module.unet)


def time_ids(batch: int, target_size: tuple[int, int], original_size: tuple[int, int] | None = None,
             crop_top_left: tuple[int, int] = (0, 0)) -> jax.Array:
    """SDXL's ``time_ids`` ``[batch, 6]``: original size (default: the target size), crop top-left,
    target size, in pixels (height, width)."""
    row = [*(original_size or target_size), *crop_top_left, *target_size]
    return jnp.broadcast_to(jnp.asarray(row, jnp.float32), (batch, 6))


def unet_denoise(module, variables, x, t, context, added_cond, schedule, prediction_type: str):
    """The data prediction ``x0_hat`` of a Stable Diffusion UNet (or :class:`StableDiffusion`) at
    time ``t`` of ``schedule`` (a ``VPDiscrete``: the UNet sees the timestep ``schedule.model_time(t)``),
    from its ``epsilon``, ``v_prediction`` or ``sample`` output; ``x`` in the schedule's coordinates."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    steps = jnp.broadcast_to(jnp.asarray(schedule.model_time(t), jnp.float32), (x.shape[0],))
    out = module.apply(variables, x, steps, context, added_cond).astype(x.dtype)
    alpha, sigma = schedule.alpha(t).astype(x.dtype), schedule.sigma(t).astype(x.dtype)
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    return out


def _denoise(module: StableDiffusion, variables, x, t, labels, schedule, *, context, text_embeds=None,
             time_ids=None):
    """The family's ``denoise``: the data prediction with the text conditioning (no class labels)."""
    added = None if text_embeds is None else dict(text_embeds=text_embeds, time_ids=time_ids)
    return unet_denoise(module, variables, x, t, context, added, schedule, module.prediction_type)


def _conditioning(module: StableDiffusion) -> tuple:
    return ("context",) if module.text_encoder_2 is None else ("context", "text_embeds", "time_ids")


@functools.lru_cache(maxsize=4)
def _text_encoder(module: StableDiffusion):
    return jax.jit(lambda variables, *ids: module.apply(variables, *ids, method="encode_text"))


def encode_prompts(model, folder, prompts, height: int, width: int) -> dict:
    """The conditioning of each prompt, ``{"context": [P, L, D][, "text_embeds": [P, 1280],
    "time_ids": [P, 6]]}``, for images of ``height`` x ``width`` pixels. ``prompts=None`` is the
    unconditional input of classifier-free guidance when no negative prompt is given: the empty
    prompt, or zeros for SDXL pipelines with ``force_zeros_for_empty_prompt`` (as diffusers does)."""
    module = model.module
    tokenizers = load_tokenizers(folder)
    zeros = prompts is None and module.text_encoder_2 is not None and bool(
        checkpoint_config(folder).get("source", {}).get("model_index", {}).get("force_zeros_for_empty_prompt", True))
    texts = [""] if prompts is None else list(prompts)
    out = dict(_text_encoder(module)(model.variables, *[tok(texts) for tok in tokenizers]))
    if zeros:
        out = {k: jnp.zeros_like(v) for k, v in out.items()}
    if module.text_encoder_2 is not None:
        out["time_ids"] = time_ids(len(texts), (height, width))
    return out


def checkpoint_config(folder) -> dict:
    return checkpoint.read_config(folder)


def _sample_shape_at(module: StableDiffusion, height: int, width: int) -> tuple[int, int, int]:
    factor = 2 ** (len(module.vae.block_out_channels) - 1)
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"height and width must be positive multiples of {factor} (the VAE's factor), "
                         f"got {height} x {width}")
    return height // factor, width // factor, int(module.unet.in_channels)


# ----------------------------------------------------------------------------------------------
# The schedule


SPACINGS = ("linspace", "leading", "trailing")


def diffusers_times(info: Mapping[str, Any], n_steps: int) -> np.ndarray:
    """The ``n_steps + 1`` solver times of diffusers' multistep schedulers (DPM-Solver, UniPC) built
    from the folder's scheduler config: its ``timestep_spacing`` and ``steps_offset`` pick the
    training timesteps n, which are times (n + 1) / N here; ``final_sigmas_type`` 'zero' (their
    default) ends at time 0 (sigma = 0), 'sigma_min' at timestep 0."""
    n_train = int(info.get("num_train_timesteps", 1000))
    spacing = info.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        steps = np.linspace(0, n_train - 1, n_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        steps = (np.arange(n_steps + 1) * (n_train // (n_steps + 1))).round()[::-1][:-1] + int(info.get("steps_offset", 0))
    elif spacing == "trailing":
        steps = np.arange(n_train, 0, -n_train / n_steps).round() - 1
    else:
        raise ValueError(f"scheduler timestep_spacing={spacing!r} is not supported; allowed: {', '.join(SPACINGS)}")
    final = {"zero": 0.0, "sigma_min": 1.0 / n_train}.get(info.get("final_sigmas_type", "zero"))
    if final is None:
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {info.get('final_sigmas_type')!r}")
    times = (steps.astype(np.int64) + 1) / n_train
    if len(set(times)) != len(times):
        raise ValueError(f"{n_steps} steps are too many for the scheduler's {spacing} spacing")
    return np.append(times, final)


def schedule(scheduler_config: Mapping[str, Any]) -> schedules.VPDiscrete:
    """The :class:`jdiffsample.schedules.VPDiscrete` of a diffusers scheduler config (``ValueError``
    naming what is wrong)."""
    try:
        return schedules.VPDiscrete.from_diffusers(scheduler_config)
    except ValueError as err:
        raise ValueError(f"the scheduler's betas do not give a valid schedule ({err})") from None


def prediction(scheduler_config: Mapping[str, Any], override: str | None = None) -> str:
    """What the UNet predicts: ``override`` or the scheduler config's ``prediction_type``, checked."""
    kind = override or scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={kind!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")
    return kind


# ----------------------------------------------------------------------------------------------
# Conversion


def _read_index(src: Path) -> tuple[str, dict]:
    return diffusers_folder.read_model_index(src, PIPELINES)


def _check_part(src: Path, index: Mapping[str, Any], part: str) -> str:
    """The class of pipeline part ``part``, checked: listed in model_index.json, supported, a folder."""
    return diffusers_folder.pipeline_part(src, index, part, _CLASSES[part])


def _public(config: Mapping[str, Any]) -> dict:
    """A config without its file metadata (``_class_name``, ``_name_or_path``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _check_consistent(module: StableDiffusion) -> None:
    """The text encoders' widths fit the UNet (a folder mixing models fails here, before any work)."""
    unet = module.unet
    cross = unet.cross_attention_dim[0] if isinstance(unet.cross_attention_dim, tuple) else unet.cross_attention_dim
    width = sum(m.hidden_size for m in module._encoders)
    if width != cross:
        raise ValueError(f"the text encoders give {width} context features, the UNet's cross_attention_dim is {cross}")
    if unet.addition_embed_type == "text_time":
        if module.text_encoder_2 is None or module.text_encoder_2.projection_dim is None:
            raise ValueError("the UNet needs pooled text embeddings (text_time), the pipeline has no projection")
        expected = module.text_encoder_2.projection_dim + 6 * unet.addition_time_embed_dim
        if expected != unet.projection_class_embeddings_input_dim:
            raise ValueError(f"the UNet's projection_class_embeddings_input_dim is "
                             f"{unet.projection_class_embeddings_input_dim}, the text embeddings and 6 time ids "
                             f"give {expected}")


def convert(src, dst, *, overwrite: bool = False, prediction_type: str | None = None) -> dict:
    """Convert a diffusers Stable Diffusion / SDXL pipeline folder ``src`` into the checkpoint ``dst``.

    Reads ``model_index.json``, every part's ``config.json`` and weights (safetensors, or ``.bin``
    without executing code), the tokenizer folders and the scheduler config; ``prediction_type``
    overrides the scheduler's. Everything is checked before anything is written.
    """
    start = time.perf_counter()
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder (give a diffusers pipeline folder with model_index.json)")
    checkpoint.check_destination(dst, overwrite, sources=[src])  # before minutes of conversion
    class_name, index = _read_index(src)
    parts = PIPELINES[class_name]
    classes = {part: _check_part(src, index, part) for part in parts}
    tokenizers = {}
    for part in parts:
        if part in _TOKENIZER:
            name = _TOKENIZER[part]
            _check_part(src, index, name)
            tok = CLIPTokenizer.from_folder(src / name)
            tokenizers[name] = dict(folder=name, files=[f for f in TOKENIZER_FILES if (src / name / f).is_file()],
                                    model_max_length=tok.model_max_length, pad_token=tok.pad_token,
                                    pad_token_id=tok.pad_token_id)
    scheduler_file = src / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise ValueError(f"{src}: scheduler/scheduler_config.json is missing")
    scheduler = checkpoint.read_json(scheduler_file, "scheduler config")
    kind, sched = prediction(scheduler, prediction_type), schedule(scheduler)

    configs: dict[str, Any] = {}
    for part in parts:
        config = diffusers_folder.read_config(src / part)
        configs[part] = ({"_class_name": classes[part], **_public(config)} if part.startswith("text_encoder")
                         else _public(config))
    kwargs = dict(configs, prediction_type=kind)
    module = build(class_name, kwargs)
    _check_consistent(module)

    params, tensors = {}, 0
    skip = None
    for part in parts:
        if part == "unet":
            state_dict = sd_unet.load_folder(src / part)[1]
            converted = sd_unet.convert_state_dict(classes[part], configs[part], state_dict)
            skip = converted["skip"]
        elif part == "vae":
            state_dict = vae_net.load_folder(src / part)[1]
            converted = vae_net.convert_state_dict(classes[part], configs[part], state_dict)
        else:
            state_dict = clip.load_folder(src / part, classes[part])[2]
            converted = clip.convert_state_dict(classes[part], configs[part], state_dict)
        params[part] = converted["params"]
        tensors += len(state_dict)
        del state_dict, converted
    extra = dict(scheduler=scheduler, tokenizers=tokenizers, latent=dict(vae="internal", range="[-1,1]"),
                 source=dict(kind="diffusers", folder=src.name, model_index=index))
    files = {f"{name}/{f}": src / name / f for name, tok in tokenizers.items() for f in tok["files"]}
    return checkpoint.save_converted(dst, "sd", class_name, kwargs, {"params": params, "skip": {"unet": skip}},
                                     tensors=tensors, started=start, schedule=sched, extra=extra,
                                     overwrite=overwrite, files=files, sources=[src])


def load_tokenizers(checkpoint_dir) -> list:
    """The tokenizers of a converted checkpoint (:class:`jdiffsample.tokenizer.CLIPTokenizer`), one
    per text encoder, in order."""
    config = checkpoint.read_config(checkpoint_dir)
    names = sorted(config.get("tokenizers", {}))
    if not names:
        raise ValueError(f"{checkpoint_dir}: the checkpoint records no tokenizers")
    return [CLIPTokenizer.from_folder(Path(checkpoint_dir) / name) for name in names]


def _convert_arguments(parser) -> None:
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                        help="override the scheduler config's prediction_type (what the UNet predicts)")


def _sample_shape(module: StableDiffusion) -> tuple[int, int, int]:
    size = module.unet.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(height), int(width), int(module.unet.in_channels)


FAMILY = family.Family(
    name="sd", description="Stable Diffusion 1.x/2.x/SDXL diffusers pipeline folder (UNet, VAE, CLIP text encoders)",
    build=build, example_inputs=example_inputs,
    conversion=family.Conversion(
        convert, _convert_arguments,
        schedule=lambda class_name, kwargs, extra: schedule(extra.get("scheduler", {}))),
    sampling=family.Sampling(
        denoise=_denoise, sample_shape=_sample_shape, skip_tuning=True, conditioning=_conditioning,
        encode_prompts=encode_prompts, sample_shape_at=_sample_shape_at, pixels_per_latent=lambda m: 2 ** (len(m.vae.block_out_channels) - 1),
        prediction=lambda module: module.prediction_type,
        grids={"diffusers": lambda model, n_steps, height, width: diffusers_times(model.extra.get("scheduler", {}),
                                                                                   n_steps)}),
)

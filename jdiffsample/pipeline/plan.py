"""Plan, then run: everything a run needs, decided and computed before anything is compiled.

:func:`plan` turns a model and :class:`~jdiffsample.pipeline.settings.Settings` into a
:class:`Plan`: the loaded networks (weights in host memory), the denoiser with its guidance chain,
the time grid (found on the model's trajectories where the grid method says so), the encoded text
conditioning, the decoder of latent models and the second stage of a two-stage run, with every
check against the model done first. A plan is a value: ``print(plan.describe())`` shows it
(``jdiffsample sample --dry-run``), :class:`~jdiffsample.pipeline.runner.Runner` runs it, and
``plan.record`` is what a run's manifest records and fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiffsample import grids, solver_params
from jdiffsample import skip_tuning as skip
from jdiffsample.guidance import skip_layer_steps
from jdiffsample.nets import Denoiser, Model, latent
from jdiffsample.nets import model as model_io
from jdiffsample.nets.formats import checkpoint
from jdiffsample.pipeline.settings import DEFAULT_MICRO_BATCH, Settings
from jdiffsample.solvers import registry

__all__ = ["Plan", "Stage", "plan", "load", "WARMUP_INDEX"]

#: the sample index whose key draws the warm-up noises of grids found on the model's trajectories
#: (no sample uses it: indices stay below 2**31 - batch)
WARMUP_INDEX = 2**31 - 1
_GRID_CACHE: dict = {}
_GRID_CACHE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Stage:
    """One sampling stage: the first, or the upsampler of a two-stage run."""

    index: int
    model: Model
    denoiser: Denoiser            # its labels and conditioning are per-sample placeholders
    solver: str
    options: tuple                # sorted (name, value) pairs, resolved
    nfe: int
    n_steps: int
    grid: str                     # the grid's name, or 'custom'
    ts: np.ndarray                # the N + 1 times
    seed: int
    sample_shape: tuple
    image_shape: tuple
    decoder: Any                  # latent models: the Decoder (VAE) of the samples, or None
    latents_only: bool
    labels: Any                   # None, 'random' or a tuple cycled by index
    random_labels: bool
    n_classes: int
    cond: Any = None              # text models: {name: [P, ...]} per prompt
    uncond: Any = None            # ... and the negative prompts' (or the unconditional input)
    init: Any = None              # image-to-image: clean latents [P, ...]
    solver_params: Any = None     # learned solvers: their parameters (a pytree)
    low_res_shape: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run does (see the module docstring). ``record`` holds the settings, the resolved grid
    and shapes and a record (family, config, digest) of every network: equal records give equal
    images; ``paths`` the folders the networks were read from."""

    settings: Settings
    stages: tuple
    micro_batch: int
    record: dict
    paths: dict

    @property
    def model_parallel(self) -> int:
        return self.settings.model_parallel

    @property
    def n_classes(self) -> int:
        return self.stages[0].n_classes

    @property
    def image_shape(self) -> tuple:
        return tuple(self.stages[-1].image_shape)

    @property
    def output_dtype(self):
        return np.float32 if self.stages[-1].latents_only else np.uint8

    def describe(self) -> str:
        """The plan in words (what ``--dry-run`` prints)."""
        lines = []
        for s in self.stages:
            rec = self.record["models"]["model" if s.index == 1 else "upsampler"]
            name = "stage 2 (upsampler)" if s.index > 1 else "model"
            lines.append(f"{name}: {rec['family']} {rec['class_name']}, {rec['parameters']:,} parameters, digest "
                         f"{rec['digest'][:12]}, from {self.paths.get('model' if s.index == 1 else 'upsampler')}")
            out = "float32 latents" if s.latents_only else "uint8 images"
            lines.append(f"  samples: {'x'.join(map(str, s.sample_shape))} -> {out} "
                         f"{'x'.join(map(str, s.image_shape))}" + (" (decoded by the VAE)" if s.decoder else ""))
            if s.n_classes:
                lines.append(f"  labels: {s.labels if s.labels is not None else 'from the first stage'} of "
                             f"{s.n_classes} classes")
            if s.cond is not None:
                lines.append(f"  prompts: {len(self.settings.prompts)} encoded ({', '.join(sorted(s.cond))}), "
                             f"negative: {'given' if self.settings.negative_prompts else 'the unconditional input'}")
            label = registry.get(s.solver).label(dict(s.options))
            lines.append(f"  solver: {label} ({s.solver}: {', '.join(f'{k}={v}' for k, v in s.options) or 'no options'}), "
                         f"NFE {s.nfe} = {s.n_steps} steps")
            if registry.get(s.solver).learnable:
                learned = self.paths.get("solver_params") if s.index == 1 else None
                lines.append(f"  learned parameters: {learned or 'none (the untrained ones)'}")
            times = ", ".join(f"{t:.4g}" for t in s.ts)
            lines.append(f"  grid: {s.grid}: {times}")
            chain = s.denoiser.guidance
            parts = []
            if chain.cfg is not None:
                parts.append(f"weight {float(chain.cfg.weight):g}" + (" (autoguidance)" if s.denoiser.guide else ""))
            if chain.skip_layers is not None:
                lo, hi = (float(v) for v in chain.skip_layers.times)
                parts.append(f"skip-layer guidance {float(chain.skip_layers.scale):g} without blocks "
                             f"{','.join(map(str, chain.skip_layers.layers))} at t in [{lo:.4g}, {hi:.4g}]")
            if chain.threshold is not None:
                parts.append(f"{chain.threshold.kind} thresholding")
            if chain.classifier is not None:
                parts.append(f"classifier scale {float(chain.classifier.scale):g}")
            lines.append(f"  guidance: {', '.join(parts) or 'none'}")
        s = self.settings
        lines.append(f"seed {s.seed}, dtype {s.dtype}, micro-batch {self.micro_batch}, model-parallel {s.model_parallel}"
                     + (f", Skip-Tuning rho_bottom {s.skip_tuning}" if s.skip_tuning is not None else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading networks


def load(ref, *, what: str = "model") -> tuple[Model, str | None, str]:
    """``(Model with its weights in host memory, its folder or None, its digest)`` for a checkpoint
    folder, a bundled model name or a loaded :class:`Model`."""
    if isinstance(ref, Model):
        variables = jax.tree.map(np.asarray, ref.variables)
        return ref, None, checkpoint.digest(checkpoint.checksums(variables))
    path = checkpoint.resolve(ref)
    model = model_io.load_model(path, host=True)
    return model, str(path), model_io.model_digest(path)


def _record(model: Model, digest: str) -> dict:
    params = sum(int(np.size(x)) for x in jax.tree.leaves(model.variables.get("params", {})))
    return dict(family=model.family, class_name=model.class_name, kwargs=model.kwargs,
                schedule=json.loads(model.schedule_json), digest=digest, parameters=params)


# ---------------------------------------------------------------------------------------------
# Checks against the model


def _sample_shape(model: Model, height, width) -> tuple[tuple, tuple | None]:
    spec = model.sampling
    if spec.sample_shape_at is None:
        if height is not None or width is not None:
            raise ValueError(f"{model.family} networks sample a fixed size; --height/--width apply to models that "
                             f"sample any size (text-to-image)")
        return tuple(model.sample_shape), None
    factor = spec.pixels_per_latent(model.module)
    height = model.sample_shape[0] * factor if height is None else height
    width = model.sample_shape[1] * factor if width is None else width
    return tuple(spec.sample_shape_at(model.module, height, width)), (height, width)


def _check_labels(labels, n_classes: int):
    if n_classes == 0:
        if labels is not None:
            raise ValueError("class labels were given, but the model is unconditional")
        return None
    if labels is None or labels == "random":
        return "random"
    values = (labels,) if isinstance(labels, int) else labels
    bad = [v for v in values if not 0 <= v < n_classes]
    if bad:
        raise ValueError(f"class label {bad[0]} is not an integer in [0, {n_classes - 1}]")
    return tuple(values)


def _guidance_roles(model: Model, s: Settings) -> tuple:
    """``(classifier-free guidance weight or None, encode_prompts' keyword options)``: the settings'
    ``guidance`` is the CFG weight, or the network's own input where the family has one (FLUX.1-dev's
    distilled guidance), and then ``true_cfg`` is the CFG weight."""
    spec, options = model.sampling, {}
    if s.max_sequence_length is not None:
        if "max_sequence_length" not in spec.prompt_options:
            raise ValueError(f"--max-sequence-length applies to text models with a T5 encoder, not {model.family}")
        options["max_sequence_length"] = s.max_sequence_length
    if not spec.true_cfg:
        if s.true_cfg is not None:
            raise ValueError(f"--true-cfg applies to FLUX.1 (classifier-free guidance beside its distilled guidance); "
                             f"{model.family} networks take the classifier-free guidance weight as --guidance")
        return s.guidance, options
    if spec.guidance_input(model.module):
        options["guidance"] = s.guidance if s.guidance is not None else spec.default_guidance
    elif s.guidance is not None:
        raise ValueError(f"this {model.family} model has no guidance input (it is not guidance-distilled, as "
                         f"FLUX.1-schnell): --guidance does not apply; --true-cfg W with --negative-prompt is "
                         f"classifier-free guidance")
    if s.true_cfg is not None and s.negative_prompts is None:
        raise ValueError("--true-cfg is classifier-free guidance against a negative prompt: give --negative-prompt")
    return s.true_cfg, options


def _check_text(model: Model, s: Settings, weight) -> None:
    spec = model.sampling
    if spec.encode_prompts is None:
        if s.prompts is not None or s.negative_prompts is not None:
            raise ValueError(f"{model.family} networks are not text-conditional: they take no prompts")
        return
    if s.prompts is None:
        raise ValueError(f"this {model.family} model is text-conditional: give a prompt (--prompt TEXT or "
                         f"--prompt-file)")
    if s.negative_prompts is not None and weight is None:
        flag = "--true-cfg" if spec.true_cfg else "--guidance"
        raise ValueError(f"a negative prompt acts through classifier-free guidance: give {flag} W")


def _check_skip_layers(model: Model, s: Settings, weight, info, options) -> None:
    """Skip-layer guidance's settings against the model, and its steps against the steps the NFE gives
    (from pure noise on flows; the grid's own count is checked again once it is known)."""
    default = Settings()
    if s.slg_layers is None:
        if (s.slg_scale, s.slg_steps) != (default.slg_scale, default.slg_steps):
            raise ValueError("--slg-scale and --slg-steps set skip-layer guidance, which --slg-layers turns on")
        return
    count = model.sampling.skip_layers
    if count is None:
        raise ValueError(f"--slg-layers is skip-layer guidance for SD3 models; {model.family} networks cannot "
                         f"skip blocks")
    if weight is None:
        raise ValueError("skip-layer guidance (--slg-layers) acts with classifier-free guidance: give --guidance W "
                         "and --negative-prompt (or the empty one)")
    n = count(model.module)
    if max(s.slg_layers) >= n:
        raise ValueError(f"--slg-layers must name blocks in [0, {n - 1}] (this transformer has {n}), got "
                         f"{','.join(map(str, s.slg_layers))}")
    schedule = model.schedule
    try:
        n_steps, _ = info.steps_for_nfe(s.nfe, zero_end=schedule.zero_end, first_noise=schedule.noise_start,
                                        options=dict(options))
    except ValueError:  # no grid from pure noise costs this NFE: the other grids
        n_steps, _ = info.steps_for_nfe(s.nfe, zero_end=schedule.zero_end, options=dict(options))
    _skip_layer_steps(s, n_steps)


def _skip_layer_steps(s: Settings, n_steps: int) -> np.ndarray:
    """The indices of the steps in which skip-layer guidance acts (``--slg-steps``), at least one."""
    on = np.flatnonzero(skip_layer_steps(n_steps, *s.slg_steps))
    if not len(on):
        raise ValueError(f"--slg-steps {s.slg_steps[0]:g},{s.slg_steps[1]:g} selects none of the {n_steps} steps "
                         f"(those i with START N < i < STOP N): widen it or take more steps")
    return on


def _skip_layer_times(s: Settings, ts) -> tuple[float, float]:
    """``[lo, hi]`` around the times of the steps in which skip-layer guidance acts, halfway to the
    neighbouring times (so that a time rounded to the sampling dtype still falls on its side)."""
    ts = np.asarray(ts, np.float64)
    on = _skip_layer_steps(s, len(ts) - 1)
    hi = np.inf if on[0] == 0 else (ts[on[0] - 1] + ts[on[0]]) / 2
    return float((ts[on[-1]] + ts[on[-1] + 1]) / 2), float(hi)


def _check_threshold(model: Model, s: Settings) -> None:
    if s.threshold is None:
        return
    if model.schedule.is_ve:
        raise ValueError(f"thresholding acts on [-1, 1] data predictions of VP models; this {model.family} model "
                         f"samples on a VE schedule, whose denoiser it would distort")
    if model.latent is not None:
        raise ValueError("thresholding is for pixel-space models; this model samples latents")


def _decoder(model: Model, s: Settings, path):
    """``(Decoder or None, its record, the VAE's folder)``."""
    spec = model.latent
    if spec is None:
        if s.vae is not None or s.latents_only:
            raise ValueError(f"this {model.family} model samples pixels: it takes no VAE and no --latents-only")
        return None, None, None
    if s.latents_only:
        if s.vae is not None:
            raise ValueError("--latents-only writes the latents: give no VAE with it")
        return None, None, None
    source = s.vae if s.vae is not None else spec.get("vae")
    if source == "internal":
        dec = latent.decoder(spec, model, model.sample_shape[-1])
        return dec, dict(internal=True, range=dec.range), None
    if source is None:
        raise ValueError(f"this {model.family} model samples latents: give the converted VAE that decodes them "
                         f"(--vae DIR, made with 'jdiffsample convert vae'), or --latents-only")
    vae, vae_path, digest = load(source, what="vae")
    dec = latent.decoder(spec, vae.with_dtype(s.dtype), model.sample_shape[-1])
    record = dict(_record(vae, digest), scale=np.asarray(dec.scale).tolist(), bias=np.asarray(dec.bias).tolist(),
                  range=dec.range)
    return dec, record, vae_path


# ---------------------------------------------------------------------------------------------
# Grids


def _warmup(denoiser: Denoiser, s: Settings, sample_shape, cond, uncond):
    """``(denoise, noise)``: the stage's denoiser (its guidance included) for ``learn_batch`` warm-up
    samples, with labels cycling over the classes and prompts over the prompts, and their noises at
    the schedule's t_max from the key of sample :data:`WARMUP_INDEX`."""
    n = s.learn_batch
    idx = np.arange(n)
    rows = lambda table: None if table is None else {k: np.asarray(v)[idx % len(v)] for k, v in table.items()}  # noqa: E731
    if denoiser.labels is not None:
        denoiser = denoiser.with_labels(idx % denoiser.model.num_classes)
    if cond is not None:
        denoiser = dataclasses.replace(denoiser, conditioning=rows(cond), uncond_conditioning=rows(uncond))
    if denoiser.model.sampling.conditioning(denoiser.model.module) and cond is None:
        raise ValueError(f"grids found on the model's trajectories (gits, learned, ld3) need the model's own "
                         f"conditioning; this {denoiser.model.family} model is conditioned on another stage")
    schedule = denoiser.schedule
    key = jax.random.fold_in(jax.random.key(s.seed), WARMUP_INDEX)
    noise = jax.random.normal(key, (n, *sample_shape)) * schedule.prior_std(schedule.t_max)
    return denoiser, noise


def _grid(model: Model, digest: str, s: Settings, info, options: dict, pixels, known,
          warmup) -> tuple[str, np.ndarray]:
    """``(name, times)`` of the grid the settings name (or their explicit times). ``warmup()`` gives
    the denoiser and noises of grids found on the model's trajectories."""
    schedule = model.schedule
    n_steps, final_zero = info.steps_for_nfe(s.nfe, zero_end=schedule.zero_end, options=options)
    if not isinstance(s.grid, str):
        ts = np.asarray(s.grid, np.float64)
        first_noise = bool(schedule.noise_start and ts[0] >= 1.0)
        n_steps, _ = info.steps_for_nfe(s.nfe, zero_end=schedule.zero_end, first_noise=first_noise, options=options)
        if len(ts) != n_steps + 1:
            raise ValueError(f"explicit grid times must be {n_steps + 1} for NFE {s.nfe} ({n_steps} steps of "
                             f"{info.name}), got {len(ts)}")
        schedule.check_times(ts)
        return "custom", ts
    own = model.sampling.grids
    if s.grid not in grids.NAMES and s.grid not in own:
        names = [*grids.NAMES, *own]
        raise ValueError(f"--grid {s.grid} is not available for {model.family} networks; choose one of "
                         f"{', '.join(names)}")
    if s.grid in own:
        size = pixels if pixels is not None else (None, None)
        ts = np.asarray(own[s.grid](model, n_steps, *size), np.float64)
        if schedule.noise_start and ts[0] >= 1.0:  # from pure noise: a first-order first step may cost less
            steps, _ = info.steps_for_nfe(s.nfe, zero_end=schedule.zero_end, first_noise=True, options=options)
            if steps != n_steps:
                ts = np.asarray(own[s.grid](model, steps, *size), np.float64)
        schedule.check_times(ts)
        return s.grid, ts
    base = n_steps - 1 if final_zero else n_steps
    if s.grid in grids.NEEDS_MODEL and known is not None:
        ts = np.asarray(known, np.float64)
        if len(ts) != n_steps + 1:
            raise ValueError(f"the recorded {s.grid} grid has {len(ts) - 1} steps, the settings give {n_steps}")
        return s.grid, ts
    key = (s.grid, digest, schedule, info.name, tuple(sorted(options.items())), base, pixels,
           json.dumps(s.to_json(), sort_keys=True) if s.grid in grids.NEEDS_MODEL else None)
    if key not in _GRID_CACHE:
        denoise = noise = None
        if s.grid in grids.NEEDS_MODEL:
            denoise, noise = warmup()
        ts = grids.make(s.grid, schedule, base, solver=info.name, options=options, denoise=denoise, noise=noise,
                        learn_iters=s.learn_iters)
        while len(_GRID_CACHE) >= _GRID_CACHE_SIZE:
            _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
        _GRID_CACHE[key] = np.asarray(ts, np.float64)
    ts = _GRID_CACHE[key]
    return s.grid, (np.append(ts, 0.0) if final_zero else ts)


@dataclasses.dataclass(frozen=True)
class _LearnedFile:
    path: str
    options: dict
    record: dict  # what the run records of it (the file's SHA-256 and what it was trained for)
    file: solver_params.ParamFile


def _learned_file(info, s: Settings):
    """The learned solver's parameter file of the settings, read and checked against them (None
    without one). Its options are the ones to sample with; options given as well must agree."""
    if s.solver_params is None:
        return None
    if not info.learnable:
        learnable = sorted(n for n in registry.names() if registry.get(n).learnable)
        raise ValueError(f"--solver {info.name} takes no learned parameters (--solver-params); learnable solvers: "
                         f"{', '.join(learnable)}")
    path = str(s.solver_params)
    f = solver_params.read(path)
    if f.solver != info.name:
        raise ValueError(f"--solver-params {path} holds parameters of {f.solver}, not of --solver {info.name}")
    trained = info.resolve(f.options)
    given = dict(s.options)
    differ = sorted(k for k, v in info.resolve({**trained, **given}).items() if trained[k] != v)
    if differ:
        raise ValueError(f"--solver-params {path} was trained with {', '.join(f'{k}={trained[k]!r}' for k in differ)}; "
                         f"leave these solver options out or give the same values")
    with open(path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    return _LearnedFile(path, trained, dict(sha256=sha, solver=f.solver, nfe=f.nfe, n_steps=f.n_steps), f)


def _warn_other_grid(learned_file, grid_name: str, ts) -> None:
    """Learned parameters are per step: they fit any grid of their length, best the one they were
    trained on. Say so when this run's grid is another one."""
    trained, grid = learned_file.file.ts, learned_file.file.training.get("grid")  # as `jdiffsample learn` records it
    if len(trained) == len(ts) and np.allclose(trained, ts, rtol=1e-6, atol=1e-9):
        return
    on = f"the {grid} grid" if grid else "another grid"
    warnings.warn(f"--solver-params {learned_file.path} was trained on {on} ({', '.join(f'{t:.4g}' for t in trained)}); "
                  f"this run's {grid_name} grid is {', '.join(f'{t:.4g}' for t in ts)}: the parameters may fit it "
                  f"less well", stacklevel=2)


def _options(info, options) -> tuple:
    """The solver's resolved options as sorted pairs of JSON values (functions are refused)."""
    resolved = info.resolve(dict(options))
    for name, value in resolved.items():
        if callable(value):
            raise ValueError(f"option {name} must be a number, string or list here, not a function")
    plain = json.loads(json.dumps(resolved))
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in plain.items()))


# ---------------------------------------------------------------------------------------------
# The plan


def _stage(index: int, model: Model, path, digest: str, s: Settings, *, micro_batch: int, labels,
           low_res_shape=None, known_grid=None, init_images=None, strength: float = 0.8):
    """One stage and its record (see :func:`plan`)."""
    spec = model.sampling
    info = registry.get(s.solver)
    learned_file = _learned_file(info, s)
    options = _options(info, s.options if learned_file is None else learned_file.options)
    needs = spec.conditioning(model.module)
    if needs and spec.encode_prompts is None and index == 1:
        raise ValueError(f"this {model.family} model is conditioned on {', '.join(needs)}: use it as the "
                         f"upsampler of a first-stage model (--model BASE --upsampler DIR)")
    info.steps_for_nfe(s.nfe, zero_end=model.schedule.zero_end, options=dict(options))  # an NFE it can spend
    labels = _check_labels(labels, model.num_classes) if index == 1 else labels
    sample_shape, pixels = _sample_shape(model, s.height, s.width)
    if spec.schedule_at is not None and pixels is not None:  # a schedule that depends on the image size
        model = dataclasses.replace(model, schedule_json=json.dumps(spec.schedule_at(model, *pixels).to_config(),
                                                                    sort_keys=True))
    weight, text_options = _guidance_roles(model, s)
    _check_text(model, s, weight)
    _check_threshold(model, s)
    _check_skip_layers(model, s, weight, info, options)
    if s.skip_tuning is not None and not spec.skip_tuning:
        raise ValueError(f"{model.family} networks have no long skip connections to tune (--skip-tuning)")
    if (s.classifier is None) != (s.classifier_scale is None):
        raise ValueError("classifier guidance needs both --classifier and --classifier-scale")
    if s.guide is not None and s.guidance is None:
        raise ValueError("a guide network (--guide-model) needs a guidance weight (--guidance)")
    if s.guidance_interval is not None and s.guidance is None:
        raise ValueError("a guidance interval needs a guidance weight (--guidance)")
    params = None
    if learned_file is not None:
        params = solver_params.checked_params(learned_file.file, digest, s.solver, s.nfe, model.schedule)
    decoder, vae_record, vae_path = _decoder(model, s, path)
    models, paths = dict(model=_record(model, digest)), dict(model=path)
    if learned_file is not None:
        models["solver_params"] = learned_file.record
        paths["solver_params"] = learned_file.path

    base = model if s.skip_tuning is None else model.with_variables(skip.apply(model.variables,
                                                                               rho_bottom=s.skip_tuning))
    base = base.with_dtype(s.dtype)
    guide = classifier = None
    if index == 1 and s.guide is not None:
        guide, paths["guide"], guide_digest = load(s.guide, what="guide")
        models["guide"] = _record(guide, guide_digest)
        guide = guide.with_dtype(s.dtype)
    if index == 1 and s.classifier is not None:
        classifier, paths["classifier"], clf_digest = load(s.classifier, what="classifier")
        models["classifier"] = _record(classifier, clf_digest)
        classifier = classifier.with_dtype(s.dtype)
    if vae_record is not None:
        models["vae"], paths["vae"] = vae_record, vae_path
    placeholder = np.zeros(1, np.int32) if labels is not None else None
    low_res = None if low_res_shape is None else dict(low_res=np.zeros((1, *low_res_shape), np.float32))
    guided = index == 1 and weight is not None
    options_for_denoiser = dict(
        guidance=weight if guided else None, guide=guide, interval=s.guidance_interval if guided else None,
        channels=s.guidance_channels, classifier=classifier, classifier_scale=s.classifier_scale if index == 1 else None,
        guidance_rescale=s.guidance_rescale if guided else None, threshold=s.threshold,
        threshold_ratio=s.threshold_ratio, threshold_max=s.threshold_max)
    conditioning = low_res
    # Every argument is checked: now the work that may compile (grids found by optimization or on the
    # model's trajectories, text encoding).
    cond = uncond = None
    if spec.encode_prompts is not None:
        cond = spec.encode_prompts(base, path, s.prompts, *pixels, **text_options)
        if weight is not None:
            uncond = spec.encode_prompts(base, path, s.negative_prompts, *pixels, **text_options)
        conditioning = {k: v[:1] for k, v in cond.items()}
    denoiser = Denoiser.create(base, placeholder, conditioning=conditioning,
                               uncond_conditioning=None if uncond is None else {k: v[:1] for k, v in uncond.items()},
                               **options_for_denoiser)
    grid_name, ts = _grid(model, digest, s, info, dict(options), pixels, known_grid,
                          lambda: _warmup(denoiser, s, sample_shape, cond, uncond))
    n_steps = len(ts) - 1
    if learned_file is not None:
        _warn_other_grid(learned_file, grid_name, ts)
    if not info.noise_start and model.schedule.noise_start and ts[0] >= 1:
        raise ValueError(f"--solver {s.solver} cannot start from pure noise, and the {grid_name} grid starts at t = 1 "
                         f"on this {model.family} model: give explicit --grid times starting below 1")
    init = None
    if init_images is not None:
        ts, init = _image_to_image(base, init_images, strength, ts, sample_shape)
    if s.slg_layers is not None and index == 1:
        denoiser = denoiser.with_skip_layer_guidance(s.slg_layers, s.slg_scale, _skip_layer_times(s, ts))
    image_shape = sample_shape if decoder is None else decoder.image_shape(sample_shape)
    stage = Stage(index=index, model=base, denoiser=denoiser, solver=s.solver, options=options, nfe=s.nfe,
                  n_steps=n_steps, grid=grid_name, ts=np.asarray(ts, np.float64), seed=s.seed,
                  sample_shape=tuple(sample_shape), image_shape=tuple(image_shape), decoder=decoder,
                  latents_only=s.latents_only, labels=labels, random_labels=labels == "random" and index == 1,
                  n_classes=model.num_classes, cond=cond, uncond=uncond, init=init, low_res_shape=low_res_shape,
                  solver_params=params)
    record = dict(n_steps=n_steps, grid_name=grid_name, grid_values=[float(t) for t in stage.ts],
                  sample_shape=list(sample_shape), image_shape=list(image_shape),
                  pixels=None if pixels is None else list(pixels),
                  cond_shapes=None if cond is None else {k: list(np.shape(v)) for k, v in cond.items()}, models=models)
    return stage, record, paths


def _image_to_image(model: Model, images, strength: float, ts, sample_shape):
    """Image-to-image: the grid from the time that leaves ``int(N strength)`` of the N steps, as
    diffusers' img2img pipelines do, and the clean latents of ``images`` (the VAE's posterior mean)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image must be uint8 [H, W, 3] or [B, H, W, 3], got {images.dtype} {images.shape}")
    steps = len(ts) - 1
    start = steps - max(min(int(steps * strength), steps), 1)
    device_model = model.with_variables(jax.tree.map(jnp.asarray, model.variables))
    encode = jax.jit(lambda m, x: m.apply(x, method="encode"))
    latents = np.asarray(encode(device_model, jnp.asarray(images, jnp.float32) / 127.5 - 1.0))
    if latents.shape[1:] != tuple(sample_shape):
        raise ValueError(f"the image gives latents {tuple(latents.shape[1:])}, the settings sample "
                         f"{tuple(sample_shape)}: give --height/--width of the image")
    return np.asarray(ts)[start:], latents


def plan(model, settings: Settings, *, num: int, known_grid=None, init_images=None, strength: float = 0.8) -> Plan:
    """The :class:`Plan` of sampling ``num`` samples from ``model`` (a checkpoint folder, a bundled
    name or a loaded :class:`Model`) with ``settings``.

    ``known_grid``: the times a grid found on the model's trajectories took in an earlier run with
    these settings (a resumed run reuses them instead of learning them again). ``init_images``,
    ``strength``: image-to-image (text models with a VAE encoder). ``ValueError`` for settings that
    do not fit the model, before any weights move to a device.
    """
    s = settings
    model, path, digest = load(model)
    micro_batch = s.micro_batch if s.micro_batch is not None else min(DEFAULT_MICRO_BATCH, int(num))
    first, record, paths = _stage(1, model, path, digest, s, micro_batch=micro_batch, labels=s.class_labels,
                                  known_grid=known_grid, init_images=init_images, strength=strength)
    stages = [first]
    if s.upsampler is not None:
        if s.latents_only:
            raise ValueError("an upsampler takes the decoded images of a first stage, not latents (--latents-only)")
        up, up_path, up_digest = load(s.upsampler, what="upsampler")
        spec = up.sampling
        if spec.encode_prompts is not None or not spec.conditioning(up.module):
            raise ValueError(f"the upsampler must be conditioned on a low-resolution image; a {up.family} "
                             f"network is not")
        if up.num_classes and up.num_classes != model.num_classes:
            raise ValueError(f"the upsampler is conditioned on {up.num_classes} classes, the first stage has "
                             f"{model.num_classes or 'none'}: their labels must agree")
        grid = s.grid if isinstance(s.grid, str) and s.grid in grids.MODEL_FREE else "logsnr"
        up_settings = s.replace(nfe=s.upsampler_nfe or s.nfe, grid=grid, guidance=None, guide=None,
                                guidance_interval=None, guidance_rescale=None, classifier=None, classifier_scale=None,
                                threshold=None, skip_tuning=None, vae=None, upsampler=None, upsampler_nfe=None,
                                class_labels=None, solver_params=None)
        up_labels = None if not up.num_classes else "random"
        second, up_record, _ = _stage(2, up, up_path, up_digest, up_settings, micro_batch=micro_batch,
                                      labels=up_labels, low_res_shape=first.image_shape)
        stages.append(second)
        record["upsampler"] = up_record
        record["models"]["upsampler"] = up_record["models"]["model"]
        paths["upsampler"] = up_path
    out = {k: v for k, v in s.to_json().items() if k not in _MODEL_FIELDS}
    cfg = first.denoiser.guidance.cfg
    out.update(record, micro_batch=micro_batch, output_shape=list(stages[-1].image_shape),
               n_classes=model.num_classes,
               guidance_channels=None if cfg is None else (cfg.channels or first.sample_shape[-1]))
    return Plan(s, tuple(stages), micro_batch, out, paths)


_MODEL_FIELDS = ("guide", "classifier", "vae", "upsampler", "solver_params")

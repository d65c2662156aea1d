"""The sampling program: images of any sample indices, compiled once per configuration.

**Randomness.** Sample ``i`` draws everything from ``k_i = fold_in(key(seed), i)``: its starting
noise from ``fold_in(k_i, 0)``, its random class label from ``fold_in(k_i, 1)`` and its solver
noise from ``fold_in(k_i, 2)``. Which random numbers a sample gets does not depend on batch size,
device count, host count or which other samples run.

**Bit-exact images.** XLA picks kernels and summation orders per array shape, so every device
computes its share in fixed chunks of ``micro_batch`` samples (a ``lax.map``) and the network only
ever sees that one shape: the images depend on ``micro_batch``, not on the batch size, the number
of devices or hosts. On GPUs, bit-exact reruns also need ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``.

**One program, many runs.** The network (its variables: weights and Skip-Tuning scales), the seed,
the labels, the grid values and the guidance weight are arguments of the compiled program. Programs
are cached by what they are specialized on (:class:`~jdiffsample.pipeline.settings.Program`, the
devices, the batch size and the argument shapes), so a second sampler with other labels, seed,
grid, weights or Skip-Tuning compiles nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time

import numpy as np

from jdiffsample.pipeline import settings as st

__all__ = ["Sampler", "NOISE", "LABEL", "SOLVER", "quantize"]

AXIS = "batch"
#: fold_in constants deriving each sample's sub-keys from k_i = fold_in(key(seed), i); a second
#: stage (the upsampler of a two-stage run) uses these plus STAGE.
NOISE, LABEL, SOLVER, STAGE = 0, 1, 2, 3
_CACHE_SIZE = 16
_COMPILED: dict = {}


def quantize(x):
    """EDM's pixel values of a [-1, 1] image: ``clip(floor(127.5 x + 128), 0, 255)`` as uint8."""
    import jax.numpy as jnp

    return jnp.clip(jnp.floor(x * 127.5 + 128.0), 0, 255).astype(jnp.uint8)


def _chunk(program: st.Program, fixed: dict, indices, labels, low_res, ts):
    """indices, labels [micro_batch] -> (uint8 images (float32 latents with ``latents_only``),
    labels): the given labels, or with ``random_labels`` (traced) each sample's own draw.

    ``fixed`` holds the replicated arguments: the denoiser, the decoder of latent models, the seed,
    ``random_labels``, and the per-prompt conditioning tables of text models (``cond``, ``uncond``:
    sample i takes row i mod P). A second stage is conditioned on ``low_res``, the first stage's
    uint8 images.
    """
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jdiffsample.solvers import registry

    denoiser = fixed["denoiser"]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(fixed["seed"]), indices)
    offset = STAGE * (program.stage - 1)
    sub = lambda purpose: jax.vmap(jax.random.fold_in, (0, None))(keys, purpose + offset)  # noqa: E731
    noise = jax.vmap(lambda k: jax.random.normal(k, program.sample_shape, jnp.float32))(sub(NOISE))
    schedule = denoiser.schedule
    x = noise * schedule.prior_std(ts[0]).astype(jnp.float32)
    if denoiser.labels is not None:
        drawn = jax.vmap(lambda k: jax.random.randint(k, (), 0, program.n_classes, jnp.int32))(sub(LABEL))
        labels = jnp.where(fixed["random_labels"], drawn, labels)
        denoiser = dataclasses.replace(denoiser, labels=labels)
    rows = lambda table: jax.tree.map(lambda a: a[indices % a.shape[0]], table)  # noqa: E731
    if fixed["cond"] is not None:
        denoiser = dataclasses.replace(denoiser, conditioning=rows(fixed["cond"]),
                                       uncond_conditioning=None if fixed["uncond"] is None else rows(fixed["uncond"]))
    if program.stage > 1:  # the original upsamplers take the first stage's uint8 samples / 127.5 - 1
        denoiser = dataclasses.replace(denoiser, conditioning=dict(low_res=low_res.astype(jnp.float32) / 127.5 - 1))
    x = registry.get(program.solver).fn(denoiser, x, ts, schedule, key=sub(SOLVER), **dict(program.options))
    if program.latents_only:
        return x.astype(jnp.float32), labels
    return (quantize(x) if fixed["decoder"] is None else fixed["decoder"](x)), labels


def _device_fn(program: st.Program, fixed, indices, labels, low_res, ts):
    """One device's share, in chunks of ``micro_batch`` (one program shape whatever the share)."""
    import jax

    mb = program.micro_batch
    images, labels = jax.lax.map(
        lambda a: _chunk(program, fixed, a[0], a[1], a[2], ts),
        (indices.reshape(-1, mb), labels.reshape(-1, mb), low_res.reshape(-1, mb, *low_res.shape[1:])))
    return images.reshape(-1, *images.shape[2:]), labels.reshape(-1)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _jitted(program: st.Program, mesh):
    import jax
    from jax.sharding import PartitionSpec as P

    spec = P(AXIS)
    return jax.jit(jax.shard_map(functools.partial(_device_fn, program), mesh=mesh,
                                 in_specs=(P(), spec, spec, spec, P()), out_specs=(spec, spec), check_vma=False))


def _signature(args) -> tuple:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


def variables_digest(variables) -> str:
    """SHA-256 over the variables' paths, dtypes, shapes and bytes (identifies the weights)."""
    import jax

    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


#: warm-up samples of the grids found on the model's trajectories (GITS, learned)
WARMUP = 64


def _warmup(model, seed: int):
    """``(denoise, noise)``: the model with labels cycling over its classes, and warm-up noises at
    t_max drawn from ``fold_in(key(seed), -1)`` (no sample index uses it)."""
    import jax

    fam = model.family_info
    if fam.encode_prompts is not None or fam.conditioning(model.module):
        raise ValueError(f"grids found on the model's trajectories (gits, learned, ld3) are for class-conditional "
                         f"or unconditional models; this {model.family} model needs other conditioning")
    labels = np.arange(WARMUP) % model.num_classes if model.num_classes else None
    shape = (WARMUP, *model.sample_shape)
    schedule = model.schedule
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 2**31 - 1), shape) * schedule.prior_std(
        schedule.t_max)
    return model.denoiser(labels), noise


def _load(model):
    """``(Model, its folder or None)`` for a folder, a bundled name or a loaded Model."""
    from jdiffsample import nets

    if isinstance(model, nets.Model):
        return model, None
    path = nets.resolve(model)
    return nets.load_model(path), path


def _model_record(model, digest: str) -> dict:
    return dict(digest=digest, family=model.family, class_name=model.class_name, kwargs=model.kwargs,
                schedule=json.loads(model.schedule_json))


class Sampler:
    """Images and labels of any sample indices, compiled once for a fixed batch size.

    ``sampler(indices)`` returns ``(images, labels)`` as NumPy arrays: uint8 ``[n, H, W, C]`` and
    int32 ``[n]`` (``None`` for unconditional models). Sample ``i`` is the same whichever other
    indices run with it (see the module docstring).

    Args:
      model: a checkpoint folder (``jdiffsample convert``), a bundled model name, or a loaded
        :class:`jdiffsample.nets.Model`.
      solver, options: a registered solver (:mod:`jdiffsample.solvers.registry`) and its options.
      nfe: model calls per sample (Heun: two per step, an odd NFE on a VE schedule ends with one
        Euler step into sigma = 0; guidance doubles the batch of a call, not the NFE).
      grid: 'logsnr', 'karras', 'optimized', 'uniform', 'quadratic', or explicit times (N + 1).
      skip_tuning: ``rho_bottom`` of Skip-Tuning (``rho_top = 1``), or None.
      guidance: None (off) or the guidance weight w of ``D_u + w (D_c - D_u)``: classifier-free
        (the network's null label) unless ``guide`` is given, then autoguidance by that network.
      guide: a second network of the same family for autoguidance (folder, name or Model).
      guidance_interval: ``(lo, hi)``: guide only where sigma/alpha lies in it.
      class_labels: None or 'random' (uniform per sample), a label, or a list cycled by index
        (sample i gets ``labels[i % len(labels)]``); only for class-conditional models.
      seed: the base seed, an integer in [0, 2**32).
      batch: samples per call over all ``devices`` (rounded up to a multiple of ``micro_batch``
        times their number).
      micro_batch: samples one network call computes on one device. The images depend on it
        (float rounding), not on ``batch`` or ``devices``.
      devices: local devices to run on (default: all of this process's devices).
      dtype: the network's compute dtype, 'float32' or 'bfloat16' (the solver state stays float32).
      vae: latent models: the converted VAE that decodes the samples (folder or Model; default: the
        one recorded in the model's config), decoded in the same program and micro-batches.
      latents_only: latent models: return the float32 latents instead of decoding them.
      guidance_channels: guide only the first N channels (None: all; default: the family's, DiT's
        original 3 of 4).
      threshold: None, 'static' (clip the data predictions to [-1, 1]) or 'dynamic' (Saharia et al.,
        with ``threshold_ratio`` and ``threshold_max``): pixel-space VP models only.
      classifier, classifier_scale: classifier guidance by a converted noisy-image classifier
        (``adm-classifier``) towards each sample's label, with weight ``classifier_scale``.
      upsampler, upsampler_nfe: a two-stage run: an upsampler (``adm-superres``) conditioned on this
        model's images (and labels), with the same solver, options and grid and its own NFE
        (default ``nfe``); its noise comes from other sub-keys of each sample's key.
      prompts, negative_prompts: text models (Stable Diffusion): sample i uses prompt i mod P and
        negative prompt i mod P' (default: the model's unconditional input); classifier-free
        guidance uses the negative prompts.
      height, width: image size for models that sample any size (Stable Diffusion).
      guidance_rescale: Lin et al.'s rescale of the guided prediction, phi in [0, 1].
    """

    def __init__(self, model, *, solver: str = "unipc", nfe: int = 10, grid="logsnr", options: dict | None = None,
                 skip_tuning: float | None = None, guidance: float | None = None, guide=None,
                 guidance_interval=None, class_labels=None, seed: int = 0, batch: int = 64, micro_batch: int = 64,
                 devices=None, dtype: str = "float32", vae=None, latents_only: bool = False,
                 guidance_channels="default", threshold: str | None = None, threshold_ratio: float = 0.995,
                 threshold_max: float = 1.0, classifier=None, classifier_scale: float | None = None,
                 upsampler=None, upsampler_nfe: int | None = None, prompts=None, negative_prompts=None,
                 height: int | None = None, width: int | None = None, guidance_rescale: float | None = None,
                 _low_res_shape=None):
        import jax

        from jdiffsample import grids, nets
        from jdiffsample import skip_tuning as skip
        from jdiffsample.solvers import registry

        info = registry.get(solver)
        options = st.json_options(info, dict(options or {}))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        batch = st.check_positive_int("batch", batch)
        micro_batch = st.check_positive_int("micro_batch", micro_batch)
        guidance = st.check_float("guidance", guidance)
        skip_tuning = st.check_float("skip_tuning (rho_bottom)", skip_tuning, positive=True)
        if guidance_interval is not None:
            lo, hi = (st.check_float("guidance interval", v) for v in guidance_interval)
            if not 0 <= lo < hi:
                raise ValueError(f"the guidance interval must be LO,HI with 0 <= LO < HI, got {guidance_interval}")
            guidance_interval = (lo, hi)
            if guidance is None:
                raise ValueError("a guidance interval needs a guidance weight")
        if guide is not None and guidance is None:
            raise ValueError("a guide network needs a guidance weight")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")

        classifier_scale = st.check_float("classifier scale", classifier_scale)
        if (classifier is None) != (classifier_scale is None):
            raise ValueError("classifier guidance needs both a classifier and a classifier scale")
        model, self.model_path = _load(model)
        fam = model.family_info
        if not fam.is_diffusion_model:
            raise ValueError(f"{model.family} networks are not diffusion models; sample from a diffusion model")
        stage = 1 if _low_res_shape is None else 2
        needs = fam.conditioning(model.module)
        if needs and fam.encode_prompts is None and stage == 1:
            raise ValueError(f"this {model.family} model is conditioned on {', '.join(needs)}: use it as the "
                             f"upsampler of a first-stage model (--model BASE --upsampler {model.family.upper()})")
        n_steps, final_zero = info.steps_for_nfe(nfe, zero_end=model.schedule.zero_end)
        labels = st.check_labels(class_labels, model.num_classes)
        sample_shape, pixels = st.sample_shape(model, height, width)
        prompts, negative_prompts = st.check_prompts(model, prompts, negative_prompts, guidance)
        guidance_rescale = st.check_float("guidance rescale", guidance_rescale)
        if skip_tuning is not None and not fam.skip_tuning:
            raise ValueError(f"{model.family} networks have no long skip connections to tune")
        digest = variables_digest(model.variables)
        variables = model.variables if skip_tuning is None else skip.apply(model.variables, rho_bottom=skip_tuning)
        model = model.with_variables(variables).with_dtype(dtype)
        guide_record, self.guide_path = None, None
        if guide is not None:
            if not isinstance(guide, nets.Model):
                self.guide_path = nets.resolve(guide)
                guide = nets.load_model(self.guide_path)
            guide_record = _model_record(guide, variables_digest(guide.variables))
            guide = guide.with_dtype(dtype)
        placeholder = np.zeros(1, np.int32) if labels is not None else None
        classifier, self.classifier_path = (None, None) if classifier is None else _load(classifier)
        thresholds = st.check_threshold(threshold, threshold_ratio, threshold_max, model)
        decoder, vae_record, self.vae_path = self._decoder(model, vae, latents_only, dtype)
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices or any(d.process_index != jax.process_index() for d in devices):
            raise ValueError("devices must be a non-empty list of this process's devices")

        # Every argument is checked: now the work that may compile (grids found by optimization or on
        # the model's trajectories, text encoding).
        grid, ts = st.make_grid(grid, model.schedule, n_steps, final_zero, info, dict(options), model,
                                warmup=lambda: _warmup(model, seed))
        cond = uncond = None
        if prompts is not None:
            cond = fam.encode_prompts(model, self.model_path, prompts, *pixels)
            if guidance is not None:
                uncond = fam.encode_prompts(model, self.model_path, negative_prompts, *pixels)
        conditioning = (dict(low_res=np.zeros((1, *_low_res_shape), np.float32)) if stage > 1
                        else None if cond is None else {k: v[:1] for k, v in cond.items()})
        denoiser = nets.Denoiser.create(model, placeholder, guidance=guidance, guide=guide,
                                        interval=guidance_interval, channels=guidance_channels,
                                        classifier=None if classifier is None else classifier.with_dtype(dtype),
                                        classifier_scale=classifier_scale, conditioning=conditioning,
                                        uncond_conditioning=None if uncond is None else {k: v[:1] for k, v in
                                                                                         uncond.items()},
                                        guidance_rescale=guidance_rescale,
                                        threshold=threshold, threshold_ratio=thresholds[0],
                                        threshold_max=thresholds[1])

        self.model, self.schedule, self.devices = model, model.schedule, devices
        self.n_classes, self.ts = model.num_classes, ts
        self.image_shape = sample_shape if decoder is None else decoder.image_shape(sample_shape)
        self.output_dtype = np.float32 if latents_only else np.uint8
        self.micro_batch = micro_batch
        per_call = micro_batch * len(devices)
        self.batch = -(-batch // per_call) * per_call
        self.settings = st.Settings(
            solver=solver, options=options, nfe=int(nfe), n_steps=n_steps, grid=grid,
            grid_values=tuple(float(t) for t in ts), skip_tuning=skip_tuning, guidance=guidance,
            guidance_interval=guidance_interval, class_labels=labels, seed=int(seed),
            sample_shape=tuple(sample_shape), micro_batch=micro_batch, dtype=dtype,
            guidance_channels=denoiser.channels, latents_only=bool(latents_only), n_classes=model.num_classes,
            threshold=threshold, threshold_ratio=thresholds[0], threshold_max=thresholds[1],
            classifier_scale=classifier_scale, stage=stage, prompts=prompts, negative_prompts=negative_prompts,
            guidance_rescale=guidance_rescale, height=height, width=width)
        classifier_record = None if classifier is None else _model_record(classifier,
                                                                          variables_digest(classifier.variables))
        self.record = dict(self.settings.to_json(), model=_model_record(model, digest), guide=guide_record,
                           vae=vae_record, classifier=classifier_record, output_shape=list(self.image_shape))
        self.compile_seconds: float | None = None

        from jax.sharding import NamedSharding, PartitionSpec as P

        self._mesh = jax.make_mesh((len(devices),), (AXIS,), devices=devices)
        self._batch_sharding = NamedSharding(self._mesh, P(AXIS))
        replicated = NamedSharding(self._mesh, P())
        random_labels = labels == "random" and stage == 1  # a second stage takes the first stage's labels
        fixed = dict(denoiser=denoiser, decoder=decoder, seed=np.uint32(seed), random_labels=np.bool_(random_labels),
                     cond=cond, uncond=uncond)
        self._args = jax.device_put((fixed, np.asarray(ts, np.float32)), replicated)
        self._compiled = None
        self._low_res_shape = _low_res_shape
        self.upsampler, self.upsampler_path = None, None
        if upsampler is not None:
            if stage > 1 or latents_only:
                raise ValueError("an upsampler takes the decoded images of a first stage (not latents, not a second stage)")
            up, self.upsampler_path = _load(upsampler)
            if up.family_info.encode_prompts is not None or not up.family_info.conditioning(up.module):
                raise ValueError(f"the upsampler must be conditioned on a low-resolution image; a {up.family} "
                                 f"network is not")
            if up.num_classes and up.num_classes != model.num_classes:
                raise ValueError(f"the upsampler is conditioned on {up.num_classes} classes, the first stage has "
                                 f"{model.num_classes or 'none'}: their labels must agree")
            self.upsampler = Sampler(
                up, solver=solver, nfe=nfe if upsampler_nfe is None else upsampler_nfe, options=dict(options),
                grid=grid if grid in grids.MODEL_FREE else "logsnr",  # its own times for its NFE
                class_labels=None if not up.num_classes else ("random" if labels is None else labels),
                seed=seed, batch=self.batch, micro_batch=micro_batch, devices=devices, dtype=dtype,
                _low_res_shape=self.image_shape)
            self.image_shape = self.upsampler.image_shape
            self.record["upsampler"] = self.upsampler.record
            self.record["output_shape"] = list(self.image_shape)

    @staticmethod
    def _decoder(model, vae, latents_only: bool, dtype: str):
        """``(Decoder or None, its manifest record, the VAE's path)`` for ``model``."""
        from jdiffsample import nets
        from jdiffsample.nets import latent

        spec = model.latent
        if spec is None:
            if vae is not None or latents_only:
                raise ValueError(f"this {model.family} model samples pixels: it takes no VAE and no --latents-only")
            return None, None, None
        if latents_only:
            if vae is not None:
                raise ValueError("--latents-only writes the latents: give no VAE with it")
            return None, None, None
        source = vae if vae is not None else spec.get("vae")
        if source == "internal":
            decoder = latent.decoder(spec, model, model.sample_shape[-1])
            return decoder, dict(internal=True, range=decoder.range), None
        if source is None:
            raise ValueError(f"this {model.family} model samples latents: give the converted VAE that decodes them "
                             f"(--vae DIR, made with 'jdiffsample convert vae'), or --latents-only")
        path = None
        if not isinstance(source, nets.Model):
            path = nets.resolve(source)
            source = nets.load_model(path)
        decoder = latent.decoder(spec, source.with_dtype(dtype), model.sample_shape[-1])
        record = dict(_model_record(source, variables_digest(source.variables)), scale=np.asarray(decoder.scale).tolist(),
                      bias=np.asarray(decoder.bias).tolist(), range=decoder.range)
        return decoder, record, path

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the settings: equal fingerprints give equal images."""
        from jdiffsample.pipeline import output

        return output.fingerprint(self.record)

    def _given_labels(self, indices) -> np.ndarray:
        """The labels a list setting gives ``indices`` (zeros for 'random' and unconditional models)."""
        spec = self.settings.class_labels
        if spec is None or spec == "random":
            return np.zeros(len(indices), np.int32)
        return np.asarray(spec, np.int32)[np.asarray(indices, np.int64) % len(spec)]

    def _abstract(self):
        import jax

        idx = jax.ShapeDtypeStruct((self.batch,), np.int32, sharding=self._batch_sharding)
        low_res = jax.ShapeDtypeStruct((self.batch, *(self._low_res_shape or (1,))), np.uint8,
                                       sharding=self._batch_sharding)
        return (self._args[0], idx, idx, low_res, self._args[1])

    def compile(self) -> float:
        """Compile for ``self.batch`` (once per configuration in this process); returns the seconds
        this call spent compiling (0 when the program was compiled before)."""
        if self.upsampler is not None and self.upsampler._compiled is None:
            self.compile_seconds = self._compile() + self.upsampler.compile()
        return self._compile() if self.upsampler is None else self.compile_seconds

    def _compile(self) -> float:
        if self._compiled is None:
            args = self._abstract()
            from jdiffsample import xla_options

            options = xla_options.compile_options(self.devices)
            key = (self.settings.program, tuple(self.devices), self.batch, _signature(args), tuple(options.items()))
            start = time.perf_counter()
            if key not in _COMPILED:
                while len(_COMPILED) >= _CACHE_SIZE:
                    _COMPILED.pop(next(iter(_COMPILED)))
                lowered = _jitted(self.settings.program, self._mesh).lower(*args)
                _COMPILED[key] = lowered.compile(compiler_options=options)
            self._compiled = _COMPILED[key]
            self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def dispatch(self, indices):
        """Start one batch (at most ``self.batch`` indices, padded); returns the device array of
        its uint8 images and its labels (both padded). JAX runs it asynchronously: the host can
        prepare the next batch meanwhile."""
        import jax

        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or not 0 < len(indices) <= self.batch:
            raise ValueError(f"a batch holds 1 to {self.batch} indices, got shape {indices.shape}")
        if indices.min() < 0 or indices.max() >= 2**31 - self.batch:
            raise ValueError("sample indices must lie in [0, 2**31 - batch)")
        padded = np.arange(self.batch, dtype=np.int32) + int(indices[-1]) + 1  # discarded
        padded[: len(indices)] = indices
        self.compile()
        put = lambda a: jax.device_put(a, self._batch_sharding)  # noqa: E731
        padded = put(padded)
        images, labels = self._run(padded, put(self._given_labels(np.asarray(padded))),
                                   put(np.zeros((self.batch, 1), np.uint8)))
        if self.upsampler is None:
            return images, labels
        return self.upsampler._run(padded, labels, images)

    def _run(self, indices, labels, low_res):
        fixed, ts = self._args
        return self._compiled(fixed, indices, labels, low_res, ts)

    def __call__(self, indices):
        """``(images, labels)`` of ``indices`` (any number), as NumPy arrays."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        images = np.empty((len(indices), *self.image_shape), self.output_dtype)
        labels = np.empty(len(indices), np.int32)
        for start in range(0, len(indices), self.batch):
            chunk = indices[start:start + self.batch]
            result, drawn = self.dispatch(chunk)
            images[start:start + len(chunk)] = np.asarray(result)[: len(chunk)]
            labels[start:start + len(chunk)] = np.asarray(drawn)[: len(chunk)]
        return images, (labels if self.n_classes else None)

    @classmethod
    def from_manifest(cls, out, *, model=None, batch: int = 64, devices=None) -> "Sampler":
        """A sampler with the settings of an output folder (to regenerate any of its samples).

        ``model`` overrides the model path recorded there; its weights must be the same.
        """
        from jdiffsample.pipeline import output

        manifest = output.read_manifest(out)
        s = manifest["settings"]
        up = s.get("upsampler")
        sampler = cls(model or manifest["model_path"], **st.Settings.from_json(s), batch=batch, devices=devices,
                      guide=manifest.get("guide_path"), vae=manifest.get("vae_path"),
                      classifier=manifest.get("classifier_path"), upsampler=manifest.get("upsampler_path"),
                      upsampler_nfe=None if up is None else up["nfe"])
        changed = output.differences({k: v for k, v in s.items() if k in sampler.record}, sampler.record)
        if changed:
            raise ValueError(f"cannot reproduce {out}: {changed}")
        return sampler


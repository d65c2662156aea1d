"""The runner: compiles a :class:`~jdiffsample.pipeline.plan.Plan` over a device mesh and dispatches
batches of sample indices through it. It decides nothing; the plan has decided everything.

**Randomness.** Sample ``i`` draws everything from ``k_i = fold_in(key(seed), i)``: its starting
noise from ``fold_in(k_i, 0)``, its random class label from ``fold_in(k_i, 1)`` and its solver
noise from ``fold_in(k_i, 2)``; a second stage (an upsampler) adds 3 to each. Which random numbers a
sample gets does not depend on batch size, device count, host count or which other samples run.

**The mesh.** This process's devices form a ``data x model`` mesh: ``model`` devices hold one copy
of the weights, split by the rules of :mod:`jdiffsample.nets.sharding` (``model_parallel = 1``:
each device holds them all), and the ``data`` axis carries the batch. The program is a
``shard_map`` that is manual over ``data`` (no device talks to another across it) and automatic over
``model`` (XLA's SPMD partitioner inserts the gathers the split weights need).

**Bit-exact images.** XLA picks kernels and summation orders per array shape, so every device group
computes its share in fixed chunks of ``micro_batch`` samples (a ``lax.map``) and the network only
ever sees that one shape: the images depend on ``micro_batch`` (and, by rounding, on
``model_parallel``), not on the batch size or the number of devices or hosts.

**One program, many runs.** Weights, Skip-Tuning scales, seed, labels, grid values, guidance weights
and learned solver parameters are arguments of the compiled program; programs are cached by what
they are specialized on (:class:`Program`, the mesh, the batch size, the argument shapes and
placements), so a second runner with other values compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jdiffsample import xla_options
from jdiffsample.nets import Model, sharding
from jdiffsample.solvers import registry

__all__ = ["Runner", "Program", "NOISE", "LABEL", "SOLVER", "STAGE", "quantize", "check_mesh", "DATA_AXIS"]

DATA_AXIS = "data"
#: fold_in constants deriving each sample's sub-keys from k_i = fold_in(key(seed), i); a second
#: stage (the upsampler of a two-stage run) uses these plus STAGE.
NOISE, LABEL, SOLVER, STAGE = 0, 1, 2, 3
_CACHE_SIZE = 16
_COMPILED: dict = {}


def quantize(x):
    """EDM's pixel values of a [-1, 1] image: ``clip(floor(127.5 x + 128), 0, 255)`` as uint8."""
    return jnp.clip(jnp.floor(x * 127.5 + 128.0), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Program:
    """The static part of one stage's compiled program."""

    solver: str
    options: tuple       # sorted (name, value) pairs
    sample_shape: tuple  # (H, W, C) of one sample (latents for latent models)
    micro_batch: int
    n_classes: int = 0
    latents_only: bool = False
    stage: int = 1
    given_noise: bool = False  # the starting noise is an argument (text2image's latents=)
    img2img: bool = False      # start from clean latents noised to the first time (``init``)


def _chunk(program: Program, fixed: dict, indices, labels, low_res, noise, ts):
    """indices, labels [micro_batch] -> (uint8 images (float32 latents with ``latents_only``),
    labels, finite): the given labels, or with ``random_labels`` (traced) each sample's own draw;
    ``finite``: whether the sample's final state holds no NaN or inf.

    ``fixed`` holds the replicated arguments: the denoiser, the decoder of latent models, the seed,
    ``random_labels``, the per-prompt conditioning tables of text models (``cond``, ``uncond``:
    sample i takes row i mod P), image-to-image's clean latents (``init``, row i mod P) and learned
    solver parameters. A second stage is conditioned on ``low_res``, the first stage's uint8 images.
    """
    denoiser = fixed["denoiser"]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(fixed["seed"]), indices)
    offset = STAGE * (program.stage - 1)
    sub = lambda purpose: jax.vmap(jax.random.fold_in, (0, None))(keys, purpose + offset)  # noqa: E731
    if not program.given_noise:
        noise = jax.vmap(lambda k: jax.random.normal(k, program.sample_shape, jnp.float32))(sub(NOISE))
    schedule = denoiser.schedule
    rows = lambda table: jax.tree.map(lambda a: a[indices % a.shape[0]], table)  # noqa: E731
    if program.img2img:
        t0 = ts[0].astype(jnp.float32)
        x = schedule.alpha(t0) * rows(fixed["init"]) + schedule.sigma(t0) * noise
    else:
        x = noise * schedule.prior_std(ts[0]).astype(jnp.float32)
    if denoiser.labels is not None:
        drawn = jax.vmap(lambda k: jax.random.randint(k, (), 0, program.n_classes, jnp.int32))(sub(LABEL))
        labels = jnp.where(fixed["random_labels"], drawn, labels)
        denoiser = dataclasses.replace(denoiser, labels=labels)
    if fixed["cond"] is not None:
        denoiser = dataclasses.replace(denoiser, conditioning=rows(fixed["cond"]),
                                       uncond_conditioning=None if fixed["uncond"] is None else rows(fixed["uncond"]))
    if program.stage > 1:  # the original upsamplers take the first stage's uint8 samples / 127.5 - 1
        denoiser = dataclasses.replace(denoiser, conditioning=dict(low_res=low_res.astype(jnp.float32) / 127.5 - 1))
    extra = {} if fixed["solver_params"] is None else dict(params=fixed["solver_params"])
    x = registry.get(program.solver).fn(denoiser, x, ts, schedule, key=sub(SOLVER), **dict(program.options), **extra)
    finite = jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    if program.latents_only:
        return x.astype(jnp.float32), labels, finite
    return (quantize(x) if fixed["decoder"] is None else fixed["decoder"](x)), labels, finite


def _device_fn(program: Program, fixed, count, indices, labels, low_res, noise, ts):
    """One device group's share, in chunks of ``micro_batch`` (one network shape whatever the share).

    The chunks run in a loop whose trip count ``count`` is an argument, over buffers with one spare
    chunk: XLA inlines a loop of one trip and turns slices of a one-chunk axis into plain copies, and
    a share of one chunk would then be computed by other fused kernels (rounded otherwise) than the
    same chunk in a longer share."""
    mb = program.micro_batch

    def chunks(a):  # [share, ...] -> [share / mb + 1, mb, ...], the last chunk a spare, never run
        a = a.reshape(-1, mb, *a.shape[1:])
        return jnp.concatenate([a, jnp.zeros_like(a[:1])])

    xs = tuple(chunks(a) for a in (indices, labels, low_res, noise))
    item = lambda i: tuple(jax.lax.dynamic_index_in_dim(x, i, keepdims=False) for x in xs)  # noqa: E731
    # one trace of the chunk (the network's is most of a program's tracing time) gives both the
    # loop's output buffers and its body: the inner jit is inlined when the program is compiled
    chunk = jax.jit(functools.partial(_chunk, program))
    shapes = jax.eval_shape(chunk, fixed, *item(0), ts)
    out = jax.tree.map(lambda s: jnp.zeros((xs[0].shape[0], *s.shape), s.dtype), shapes)

    def body(i, out):
        result = chunk(fixed, *item(i), ts)
        return jax.tree.map(lambda o, r: jax.lax.dynamic_update_index_in_dim(o, r, i, 0), out, result)

    images, labels, finite = (a[:-1] for a in jax.lax.fori_loop(0, count, body, out))
    return images.reshape(-1, *images.shape[2:]), labels.reshape(-1), finite.reshape(-1)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _jitted(program: Program, mesh):
    batch = P(DATA_AXIS)
    return jax.jit(jax.shard_map(functools.partial(_device_fn, program), mesh=mesh,
                                 in_specs=(P(), P(), batch, batch, batch, batch, P()), out_specs=(batch, batch, batch),
                                 axis_names=frozenset({DATA_AXIS}), check_vma=False))


def check_mesh(n_devices: int, model_parallel: int) -> None:
    """``ValueError`` unless ``model_parallel`` devices can hold one copy of the weights."""
    if model_parallel > 1 and n_devices == 1:
        raise ValueError(f"--model-parallel {model_parallel} splits the weights over {model_parallel} devices, but "
                         f"this process has one device")
    if n_devices % model_parallel:
        raise ValueError(f"--model-parallel {model_parallel} must divide this process's {n_devices} devices")


def _placements(tree, mesh, model_parallel: int):
    """The sharding of every leaf: network variables by the family's rules over the ``model`` axis,
    everything else replicated."""
    replicated = NamedSharding(mesh, P())

    def place(node):
        if isinstance(node, Model):
            rule = None if node.family_info.sampling is None else node.family_info.sampling.sharding
            specs = sharding.specs(node.variables, model_parallel, rule)
            return node.with_variables(jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                    is_leaf=lambda x: isinstance(x, P)))
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, Model))


def _models(tree) -> list:
    return [m for m in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Model)) if isinstance(m, Model)]


def _signature(args) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x))),
                           str(getattr(getattr(x, "sharding", None), "spec", None))) for x in leaves)


class _StageRunner:
    """One stage's placed arguments and compiled programs."""

    def __init__(self, stage, mesh, batch: int, micro_batch: int, model_parallel: int):
        self.stage, self.mesh, self.batch = stage, mesh, batch
        fixed = dict(denoiser=stage.denoiser, decoder=stage.decoder, seed=np.uint32(stage.seed),
                     random_labels=np.bool_(stage.random_labels), cond=stage.cond, uncond=stage.uncond,
                     init=stage.init, solver_params=stage.solver_params)
        self.fixed = jax.device_put(fixed, _placements(fixed, mesh, model_parallel))
        self.ts = jax.device_put(np.asarray(stage.ts, np.float32), NamedSharding(mesh, P()))
        groups = mesh.shape[DATA_AXIS]
        self.count = jax.device_put(np.int32(batch // groups // micro_batch), NamedSharding(mesh, P()))
        self.program = Program(stage.solver, stage.options, tuple(stage.sample_shape), micro_batch, stage.n_classes,
                               stage.latents_only, stage.index, img2img=stage.init is not None)
        self._compiled: dict = {}

    def models(self) -> list:
        return _models(self.fixed)

    def compile(self, given_noise: bool, devices) -> float:
        program = dataclasses.replace(self.program, given_noise=given_noise)
        if program in self._compiled:
            return 0.0
        batch = NamedSharding(self.mesh, P(DATA_AXIS))
        idx = jax.ShapeDtypeStruct((self.batch,), np.int32, sharding=batch)
        low = jax.ShapeDtypeStruct((self.batch, *(self.stage.low_res_shape or (1,))), np.uint8, sharding=batch)
        noise = jax.ShapeDtypeStruct((self.batch, *(program.sample_shape if given_noise else (1,))), np.float32,
                                     sharding=batch)
        args = (self.fixed, self.count, idx, idx, low, noise, self.ts)
        options = xla_options.compile_options(devices)
        key = (program, tuple(devices), tuple(self.mesh.shape.items()), self.batch, _signature(args), tuple(options.items()))
        start = time.perf_counter()
        if key not in _COMPILED:
            while len(_COMPILED) >= _CACHE_SIZE:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = _jitted(program, self.mesh).lower(*args).compile(compiler_options=options)
        self._compiled[program] = _COMPILED[key]
        return time.perf_counter() - start

    def run(self, indices, labels, low_res, noise):
        program = dataclasses.replace(self.program, given_noise=noise is not None)
        if noise is None:
            noise = jax.device_put(np.zeros((self.batch, 1), np.float32), indices.sharding)
        return self._compiled[program](self.fixed, self.count, indices, labels, low_res, noise, self.ts)


class Runner:
    """Images and labels of any sample indices of a plan, compiled once for a fixed batch size.

    ``runner(indices)`` returns ``(images, labels)`` as NumPy arrays: uint8 ``[n, H, W, C]`` (float32
    latents with ``latents_only``) and int32 ``[n]`` (None for unconditional models). Sample ``i`` is
    the same whichever other indices run with it.

    Args:
      plan: a :class:`~jdiffsample.pipeline.plan.Plan`.
      devices: this process's devices to run on (default: all).
      batch: samples per call over all devices (rounded up to whole micro-batches per device group;
        default: one micro-batch per group).
      num: the number of samples the run needs: no more device groups are used than it fills.
    """

    def __init__(self, plan, *, devices=None, batch: int | None = None, num: int | None = None):
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices or any(d.process_index != jax.process_index() for d in devices):
            raise ValueError("devices must be a non-empty list of this process's devices")
        mp = plan.model_parallel
        check_mesh(len(devices), mp)
        groups = len(devices) // mp
        if num is not None:
            groups = max(1, min(groups, -(-int(num) // plan.micro_batch)))
        self.devices = devices[: groups * mp]
        self.mesh = jax.make_mesh((groups, mp), (DATA_AXIS, sharding.MODEL_AXIS),
                                  axis_types=(AxisType.Auto, AxisType.Auto), devices=self.devices)
        per_call = plan.micro_batch * groups
        self.batch = -(-(batch or per_call) // per_call) * per_call
        self.plan = plan
        self._stages = [_StageRunner(s, self.mesh, self.batch, plan.micro_batch, mp) for s in plan.stages]
        self._batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self.compile_seconds: float | None = None

    @property
    def image_shape(self) -> tuple:
        return self.plan.image_shape

    @property
    def output_dtype(self):
        return self.plan.output_dtype

    def param_bytes(self) -> dict:
        """Bytes of every network's weights: ``per_device`` (summed over the shards the first
        device holds) and ``total`` (one copy)."""
        first = self.devices[0]
        per_device = total = 0
        for stage in self._stages:
            for model in stage.models():
                for leaf in jax.tree.leaves(model.variables):
                    total += leaf.nbytes
                    per_device += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
        return dict(per_device=int(per_device), total=int(total))

    def compile(self, given_noise: bool = False) -> float:
        """Compile every stage for ``self.batch`` (once per configuration in this process); returns
        the seconds this call spent compiling (0 when the programs were compiled before)."""
        seconds = sum(s.compile(given_noise and i == 0, self.devices) for i, s in enumerate(self._stages))
        self.compile_seconds = seconds
        return seconds

    def _given_labels(self, indices) -> np.ndarray:
        spec = self.plan.stages[0].labels
        if spec is None or spec == "random":
            return np.zeros(len(indices), np.int32)
        return np.asarray(spec, np.int32)[np.asarray(indices, np.int64) % len(spec)]

    def dispatch(self, indices, noise=None):
        """Start one batch (1 to ``self.batch`` indices, padded); returns the device arrays of its
        images and labels (both padded). JAX runs it asynchronously. ``noise``: the starting noise
        of these samples (``[n, *sample_shape]``), instead of each sample's own draw. Returns
        ``(images, labels, finite)``."""
        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or not 0 < len(indices) <= self.batch:
            raise ValueError(f"a batch holds 1 to {self.batch} indices, got shape {indices.shape}")
        if indices.min() < 0 or indices.max() >= 2**31 - self.batch:
            raise ValueError("sample indices must lie in [0, 2**31 - batch)")
        padded = np.arange(self.batch, dtype=np.int32) + int(indices[-1]) + 1  # discarded
        padded[: len(indices)] = indices
        put = lambda a: jax.device_put(a, self._batch_sharding)  # noqa: E731
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            full = np.zeros((self.batch, *noise.shape[1:]), np.float32)
            full[: len(noise)] = noise
            noise = put(full)
        self.compile(given_noise=noise is not None)
        images, labels, finite = self._stages[0].run(put(padded), put(self._given_labels(padded)),
                                                     put(np.zeros((self.batch, 1), np.uint8)), noise)
        for stage in self._stages[1:]:
            images, labels, finite2 = stage.run(put(padded), labels, images, None)
            finite = finite & finite2
        return images, labels, finite

    def __call__(self, indices, noise=None):
        """``(images, labels)`` of ``indices`` (any number), as NumPy arrays."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if noise is not None and len(noise) != len(indices):
            raise ValueError(f"noise must have one row per index: {len(noise)} rows, {len(indices)} indices")
        images = np.empty((len(indices), *self.image_shape), self.output_dtype)
        labels = np.empty(len(indices), np.int32)
        for start in range(0, len(indices), self.batch):
            chunk = slice(start, start + self.batch)
            result, drawn, _ = self.dispatch(indices[chunk], None if noise is None else noise[chunk])
            n = len(indices[chunk])
            images[chunk] = np.asarray(result)[:n]
            labels[chunk] = np.asarray(drawn)[:n]
        return images, (labels if self.plan.n_classes else None)

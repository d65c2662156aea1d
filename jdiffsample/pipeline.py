"""Sampling at scale: many images from a network checkpoint, deterministic, resumable, sharded.

:func:`generate` (and ``jdiffsample sample``, which mirrors it) writes into one output folder::

    out/manifest.json        settings (model digest, solver, options, grid values, seed, ...),
                             their fingerprint, the shard list and package versions
    out/samples_000000.npz   images [0, shard_size):  arr_0 uint8 [n, H, W, C], arr_1 int32 labels
    out/samples_000001.npz   images [shard_size, 2 shard_size), ...
    out/grid.png             a preview of the first images

The ``.npz`` layout is the one of ADM's ``evaluations/evaluator.py`` (``arr_0`` uint8 NHWC,
``arr_1`` the class labels of class-conditional models); :func:`export_npz` merges the shards into
the single file that evaluator reads, and :func:`export_png` writes one PNG per image in the
folder layout of EDM's ``generate.py`` (``000000/000123.png``), which EDM's ``fid.py`` reads.
Pixel values follow EDM: ``clip(floor(127.5 x + 128), 0, 255)`` of the model's [-1, 1] output.

**Randomness.** Sample ``i`` draws everything from ``k_i = fold_in(key(seed), i)``: its starting
noise from ``fold_in(k_i, 0)``, its random class label from ``fold_in(k_i, 1)`` and its solver
noise from ``fold_in(k_i, 2)``. So which random numbers a sample gets does not depend on batch
size, device count, host count or which other samples run, and any subset can be regenerated alone
(:class:`Sampler`).

**Bit-exact images.** XLA picks kernels and summation orders per array shape, so the same sample
computed in batches of 7 and of 16 can differ in the last float bit, and a pixel can then cross a
quantization step. Every device therefore computes its share in fixed chunks of ``micro_batch``
samples (a ``lax.map`` over chunks), and the network only ever sees that one shape: the images do
not depend on the batch size, the number of devices or hosts, only on ``micro_batch`` (a setting,
default 64; on accelerators use the per-device batch: smaller chunks cost throughput). On GPUs
XLA also picks kernels by timing them at compile time, so bit-exact images need
``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` as well (set before JAX starts; ``jdiffsample
sample`` sets it unless told ``--no-deterministic-gpu``).

**Resuming.** A shard is a fixed index range (``shard_size``, independent of the batch size). It
is written to a hidden temporary name and renamed when complete, so a file under a final name is
always whole. A rerun with the same settings skips finished shards and produces what an
uninterrupted run would; a rerun with different settings into the same folder is refused. Batch
size, devices and processes are not settings: they change no random number and no image.

**Devices and hosts.** Each process runs data-parallel over its local devices (a 1-D mesh over the
batch axis, variables replicated, ``jax.shard_map`` so no device talks to another) and owns the
shards ``s`` with ``s % process_count == process_index``; it writes only those and never waits
for another process's files. Call ``jax.distributed.initialize`` first on several hosts (the
CLI's ``--distributed``). The last batch is padded to the compiled size (one compile per run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import inspect
import json
import math
import os
import struct
import sys
import time
import uuid
import zipfile
import zlib
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "Sampler", "Summary", "generate", "resolve_model", "bundled_models", "load_samples",
    "export_png", "export_npz", "write_png", "image_grid", "solver_order", "steps_for_nfe",
    "MANIFEST", "PREVIEW", "shard_name",
]

MANIFEST = "manifest.json"
PREVIEW = "grid.png"
FORMAT = "jdiffsample-samples"
FORMAT_VERSION = 2  # 2: images computed in chunks of settings['micro_batch']
AXIS = "batch"
GRIDS = ("logsnr", "karras", "optimized", "uniform", "quadratic")
#: fold_in constants deriving each sample's sub-keys from k_i = fold_in(key(seed), i).
NOISE, LABEL, SOLVER = 0, 1, 2
_PREVIEW_COUNT = 64
_PREVIEW_MIN_SIDE = 32  # upscale tiny images in the preview to at least this many pixels


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"samples_{index:06d}.npz"


# ---------------------------------------------------------------------------------------------
# models


def _assets():
    return importlib.resources.files("jdiffsample") / "assets"


def bundled_models() -> list[str]:
    """Names of the networks shipped in the package (``jdiffsample/assets/<name>/config.json``)."""
    assets = _assets()
    if not assets.is_dir():
        return []
    return sorted(p.name for p in assets.iterdir() if p.is_dir() and (p / "config.json").is_file())


def resolve_model(name_or_dir) -> Path:
    """The checkpoint directory for ``name_or_dir``: an existing directory, else a bundled model.

    Raises ``ValueError`` naming the bundled models when it is neither.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path.absolute()
    name = str(name_or_dir)
    if name in bundled_models():
        with importlib.resources.as_file(_assets() / name) as bundled:
            return Path(bundled)
    names = ", ".join(bundled_models()) or "none"
    raise ValueError(f"model {name!r} is neither a directory nor a bundled model (bundled: {names})")


def _variables_digest(variables) -> str:
    """SHA-256 over the variables' paths, dtypes, shapes and bytes (identifies the weights)."""
    import jax

    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# solver settings

_ORDER_OPTION = {"unipc": ("order", 3), "dpmpp": ("order", 2), "sa_solver": ("predictor_order", 3)}
_FIXED_ORDER = {"ddim": 1, "euler": 1, "heun": 2}
_NOT_OPTIONS = ("denoise", "x", "ts", "schedule", "key", "return_trajectory")


def solver_order(solver: str, options: dict) -> int:
    """The nominal order of ``solver`` with ``options`` (its predictor order for SA-Solver)."""
    if solver in _ORDER_OPTION:
        name, default = _ORDER_OPTION[solver]
        return options.get(name, default)
    return _FIXED_ORDER[solver]


def steps_for_nfe(solver: str, nfe: int, options: dict | None = None) -> int:
    """Grid steps N giving ``nfe`` model calls; ``ValueError`` when ``nfe`` does not fit.

    Heun makes two calls per step, so its ``nfe`` must be even; multistep solvers need at least
    as many steps as their order.
    """
    from jdiffsample import solvers

    solvers.nfe(solver, 1)  # validates the name
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if solver == "heun":
        if nfe % 2 or nfe < 2:
            raise ValueError(f"heun makes 2 model calls per step: nfe must be even and >= 2, got {nfe}")
        return nfe // 2
    order = solver_order(solver, options or {})
    if isinstance(order, int) and nfe < order:
        raise ValueError(f"nfe={nfe} is too small for {solver} of order {order} (needs nfe >= {order})")
    return int(nfe)


def _check_options(solver: str, options: dict) -> dict:
    from jdiffsample import solvers

    if solver not in solvers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(sorted(solvers.SOLVERS))}")
    allowed = [p for p in inspect.signature(solvers.SOLVERS[solver]).parameters if p not in _NOT_OPTIONS]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} do not apply to solver {solver} "
                         f"(its options: {', '.join(allowed)})")
    for name, value in options.items():
        if callable(value):
            raise ValueError(f"option {name} must be a number, string or list, not a function")
    return json.loads(json.dumps(options))  # plain JSON values, as stored in the manifest


def _dry_run(solver: str, options: dict) -> None:
    """Trace ``solver`` with ``options`` on a stand-in problem, so that bad values fail early."""
    import jax
    import jax.numpy as jnp

    from jdiffsample import schedules, solvers, timesteps

    schedule = schedules.VE()
    ts = timesteps.logsnr(schedule, 4)
    keys = jax.random.split(jax.random.key(0), 1)
    fn = solvers.SOLVERS[solver]
    try:
        jax.eval_shape(lambda x, k: fn(lambda y, t: y, x, ts, schedule, key=k, **options),
                       jax.ShapeDtypeStruct((1, 2), jnp.float32), keys)
    except TypeError as err:
        raise ValueError(f"bad option value for solver {solver}: {err}") from None


def _grid(name: str, schedule, n_steps: int, solver: str, options: dict) -> np.ndarray:
    from jdiffsample import timesteps

    if name != "optimized":
        return timesteps.get(name, schedule, n_steps)
    try:
        from jdiffsample.optimize import optimize_timesteps
    except ImportError as err:
        raise ValueError(f"the optimized grid is not available in this installation ({err})") from None
    order = min(max(int(solver_order(solver, options)), 1), 3)
    return np.asarray(optimize_timesteps(schedule, n_steps, order=order).ts, np.float64)


def _labels_setting(class_labels, n_classes: int):
    """Normalize ``class_labels`` to None, ``"random"`` or a list of ints (cycled by index)."""
    if n_classes == 0:
        if class_labels is not None:
            raise ValueError("class labels were given, but the model is unconditional")
        return None
    if class_labels is None or class_labels == "random":
        return "random"
    values = [class_labels] if isinstance(class_labels, (int, np.integer)) else class_labels
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"class labels must be 'random', a label or a list of labels, got {class_labels!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n_classes:
            raise ValueError(f"class label {v!r} is not an integer in [0, {n_classes - 1}]")
        out.append(int(v))
    return out


# ---------------------------------------------------------------------------------------------
# the sampler


class Sampler:
    """Images and labels of any sample indices, compiled once for a fixed batch size.

    ``sampler(indices)`` returns ``(images, labels)`` as NumPy arrays: uint8 ``[n, H, W, C]`` and
    int32 ``[n]`` (``None`` for unconditional models). Sample ``i`` is the same whichever other
    indices run with it (see the module docstring).

    Args:
      model: a checkpoint directory (``nets.save`` / the converters) or a bundled model name.
      solver, options: a name in ``jdiffsample.solvers.SOLVERS`` and its keyword options.
      nfe: model calls per sample (Heun: two per step; guidance doubles the batch, not the NFE).
      grid: 'logsnr', 'karras', 'optimized', 'uniform' or 'quadratic'.
      skip_tuning: ``rho_bottom`` of Skip-Tuning (``rho_top = 1``), or None.
      guidance: classifier-free guidance weight w, ``uncond + w (cond - uncond)``; 1 is off.
        Needs a class-conditional EDM network (the unconditional model is its zero label).
      class_labels: None or 'random' (uniform per sample), a label, or a list cycled by index
        (sample i gets ``labels[i % len(labels)]``); only for class-conditional models.
      seed: the base seed, an integer in [0, 2**32).
      batch: samples per call over all ``devices`` (rounded up to a multiple of
        ``micro_batch`` times their number).
      micro_batch: samples one network call computes on one device. The images depend on it
        (float rounding), not on ``batch`` or ``devices``.
      devices: local devices to run on (default: all of this process's devices).
    """

    def __init__(self, model, *, solver: str = "unipc", nfe: int = 10, grid: str = "logsnr",
                 options: dict | None = None, skip_tuning: float | None = None,
                 guidance: float = 1.0, class_labels=None, seed: int = 0, batch: int = 64,
                 micro_batch: int = 64, devices=None):
        import jax

        from jdiffsample import nets, skip_tuning as st

        options = _check_options(solver, dict(options or {}))
        _dry_run(solver, options)
        n_steps = steps_for_nfe(solver, nfe, options)
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        for name, value in (("batch", batch), ("micro_batch", micro_batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        guidance = float(guidance)
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        if skip_tuning is not None and not (math.isfinite(float(skip_tuning)) and float(skip_tuning) > 0):
            raise ValueError(f"skip_tuning (rho_bottom) must be a positive number, got {skip_tuning}")

        self.model_path = resolve_model(model)
        config = nets.load_config(self.model_path)
        family = config["family"]
        module = nets.build(family, config["class_name"], config["kwargs"])
        if family == "edm":
            n_classes = int(module.label_dim)
            shape = (module.img_resolution, module.img_resolution, module.img_channels)
        else:
            n_classes = int(module.num_classes or 0)
            shape = (module.image_size, module.image_size, module.in_channels)
        if guidance != 1.0:
            if n_classes == 0:
                raise ValueError("guidance needs class labels, but the model is unconditional")
            if family != "edm":
                raise ValueError("guidance needs a classifier-free network (EDM, unconditional = zero "
                                 "label); ADM networks have no unconditional mode")
        labels = _labels_setting(class_labels, n_classes)
        dummy = np.zeros(1, np.int32) if n_classes and family == "adm" else None
        _, schedule = nets.to_denoiser(module, None, config, dummy)  # the schedule only
        ts = _grid(grid, schedule, n_steps, solver, options)

        module, variables = nets.load(self.model_path)
        digest = _variables_digest(variables)
        if skip_tuning is not None:
            variables = st.apply(variables, rho_bottom=float(skip_tuning))
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices or any(d.process_index != jax.process_index() for d in devices):
            raise ValueError("devices must be a non-empty list of this process's devices")

        self.module, self.config, self.schedule = module, config, schedule
        self.image_shape, self.n_classes, self.ts = shape, n_classes, ts
        self.devices = devices
        self.micro_batch = int(micro_batch)
        per_call = self.micro_batch * len(devices)
        self.batch = -(-int(batch) // per_call) * per_call
        self.settings = dict(
            model=dict(digest=digest, family=family, class_name=config["class_name"],
                       kwargs=config["kwargs"], schedule=config["schedule"]),
            solver=solver, options=options, nfe=int(nfe), n_steps=n_steps, grid=grid,
            grid_values=[float(t) for t in ts], skip_tuning=None if skip_tuning is None else float(skip_tuning),
            guidance=guidance, class_labels=labels, seed=int(seed), image_shape=list(shape),
            dtype="float32", micro_batch=self.micro_batch,
        )
        self.compile_seconds: float | None = None

        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((len(devices),), (AXIS,), devices=devices)
        self._batch_sharding = NamedSharding(mesh, P(AXIS))
        self._replicated = NamedSharding(mesh, P())
        self._variables = jax.device_put(variables, self._replicated)
        self._ts = jax.device_put(np.asarray(ts, np.float32), self._replicated)
        self._fn = jax.jit(jax.shard_map(self._device_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                                         out_specs=(P(AXIS), P(AXIS)), check_vma=False))
        self._compiled = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the settings: equal fingerprints give equal images."""
        return _fingerprint(self.settings)

    def _device_fn(self, variables, indices, ts):
        """One device's share: indices [b] -> uint8 images [b, H, W, C], int32 labels [b], in
        chunks of ``micro_batch`` (one program shape whatever ``b`` is)."""
        import jax

        chunks = indices.reshape(-1, self.micro_batch)
        images, labels = jax.lax.map(lambda idx: self._chunk_fn(variables, idx, ts), chunks)
        return images.reshape(-1, *self.image_shape), labels.reshape(-1)

    def _chunk_fn(self, variables, indices, ts):
        """indices [micro_batch] -> uint8 images, int32 labels."""
        import jax
        import jax.numpy as jnp

        from jdiffsample import nets, solvers

        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(self.settings["seed"]), indices)
        sub = lambda purpose: jax.vmap(jax.random.fold_in, (0, None))(keys, purpose)  # noqa: E731
        noise = jax.vmap(lambda k: jax.random.normal(k, self.image_shape, jnp.float32))(sub(NOISE))
        x = noise * self.schedule.sigma(ts[0]).astype(jnp.float32)

        spec = self.settings["class_labels"]
        if spec is None:
            labels = jnp.zeros(indices.shape, jnp.int32)
        elif spec == "random":
            labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.n_classes, jnp.int32))(sub(LABEL))
        else:
            labels = jnp.asarray(spec, jnp.int32)[indices % len(spec)]

        guidance = self.settings["guidance"]
        if guidance != 1.0:  # EDM: one network call on [x; x] with [labels; zero labels]
            onehot = jax.nn.one_hot(labels, self.n_classes, dtype=jnp.float32)
            both, _ = nets.to_denoiser(self.module, variables, self.config,
                                       jnp.concatenate([onehot, jnp.zeros_like(onehot)]))

            def denoise(x, t):
                cond, uncond = jnp.split(both(jnp.concatenate([x, x]), t), 2)
                return uncond + guidance * (cond - uncond)
        else:
            denoise, _ = nets.to_denoiser(self.module, variables, self.config,
                                          labels if spec is not None else None)

        solver = solvers.SOLVERS[self.settings["solver"]]
        x = solver(denoise, x, ts, self.schedule, key=sub(SOLVER), **self.settings["options"])
        images = jnp.clip(jnp.floor(x * 127.5 + 128.0), 0, 255).astype(jnp.uint8)
        return images, labels

    def compile(self) -> float:
        """Compile for ``self.batch`` (once); returns the seconds it took."""
        if self._compiled is None:
            import jax

            start = time.perf_counter()
            idx = jax.ShapeDtypeStruct((self.batch,), np.int32, sharding=self._batch_sharding)
            self._compiled = self._fn.lower(self._variables, idx, self._ts).compile()
            self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def dispatch(self, indices):
        """Start one batch (at most ``self.batch`` indices, padded); returns device arrays.

        JAX runs it asynchronously: the host can prepare the next batch or write files meanwhile.
        """
        import jax

        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or not 0 < len(indices) <= self.batch:
            raise ValueError(f"a batch holds 1 to {self.batch} indices, got shape {indices.shape}")
        if indices.min() < 0 or indices.max() >= 2**31 - self.batch:
            raise ValueError("sample indices must lie in [0, 2**31 - batch)")
        padded = np.arange(self.batch, dtype=np.int32) + int(indices[-1]) + 1  # discarded
        padded[: len(indices)] = indices
        self.compile()
        return self._compiled(self._variables, jax.device_put(padded, self._batch_sharding), self._ts)

    def __call__(self, indices):
        """``(images, labels)`` of ``indices`` (any number), as NumPy arrays."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        images = np.empty((len(indices), *self.image_shape), np.uint8)
        labels = np.empty(len(indices), np.int32)
        for start in range(0, len(indices), self.batch):
            chunk = indices[start:start + self.batch]
            imgs, labs = self.dispatch(chunk)
            images[start:start + len(chunk)] = np.asarray(imgs)[: len(chunk)]
            labels[start:start + len(chunk)] = np.asarray(labs)[: len(chunk)]
        return images, (labels if self.n_classes else None)

    @classmethod
    def from_manifest(cls, out, *, model=None, batch: int = 64, devices=None) -> "Sampler":
        """A sampler with the settings of an output folder (to regenerate any of its samples).

        ``model`` overrides the model path recorded there; its weights must be the same.
        """
        manifest = read_manifest(out)
        s = manifest["settings"]
        sampler = cls(model or manifest["model_path"], solver=s["solver"], nfe=s["nfe"], grid=s["grid"],
                      options=s["options"], skip_tuning=s["skip_tuning"], guidance=s["guidance"],
                      class_labels=s["class_labels"], seed=s["seed"], batch=batch,
                      micro_batch=s["micro_batch"], devices=devices)
        changed = _differences({k: v for k, v in s.items() if k in sampler.settings}, sampler.settings)
        if changed:
            raise ValueError(f"cannot reproduce {out}: {changed}")
        return sampler


# ---------------------------------------------------------------------------------------------
# output folder


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _versions() -> dict:
    import platform

    import jax
    import jaxlib

    from jdiffsample import nets

    return dict(nets._versions(), jaxlib=jaxlib.__version__, python=platform.python_version(),
                backend=jax.default_backend())


def _differences(old: dict, new: dict) -> str:
    """'key: old -> new' for the first few keys that differ (one line)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key == "model":
                parts.append("model: other weights or network config")
            else:
                a, b = (json.dumps(d.get(key)) for d in (old, new))
                short = lambda s: s if len(s) <= 40 else s[:37] + "..."  # noqa: E731
                parts.append(f"{key}: {short(a)} there, {short(b)} here")
    return "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")


def read_manifest(out) -> dict:
    """The parsed ``manifest.json`` of an output folder (``ValueError`` if it has none)."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{out} holds no {MANIFEST}: not a jdiffsample sample folder") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable: {err}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jdiffsample sample manifest")
    return manifest


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a hidden temporary file next to ``path``, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plan(num: int, shard_size: int) -> list[dict]:
    return [dict(file=shard_name(s), start=start, stop=min(start + shard_size, num))
            for s, start in enumerate(range(0, num, shard_size))]


def _create_exclusive(path: Path, data: bytes) -> None:
    """Write ``path`` atomically unless it exists (then leave it): a hard link of a complete
    temporary file, so concurrent processes never overwrite each other's manifest (a rename
    where the file system has no hard links, e.g. gcsfuse)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_folder(out: Path, manifest: dict, log) -> None:
    """Create ``out`` with ``manifest``, or check that it holds the same settings."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not path.is_file():
        if out.is_dir() and any(p.name != MANIFEST and not p.name.startswith(".") for p in out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no {MANIFEST}; use a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        _create_exclusive(path, json.dumps(manifest, indent=1).encode())
    old = read_manifest(out)  # ours, or one another process wrote first
    if old.get("fingerprint") != manifest["fingerprint"]:
        diff = _differences(old.get("settings", {}), manifest["settings"])
        raise FileExistsError(f"{out} holds samples made with other settings ({diff}); "
                              f"use another output folder")
    if old.get("versions", {}).get("jax") != manifest["versions"]["jax"] and log:
        print(f"sample: warning: {out} was started with jax {old['versions'].get('jax')}, "
              f"this is jax {manifest['versions']['jax']}", file=log)


def _write_shard(out: Path, shard: dict, images: np.ndarray, labels: np.ndarray | None) -> None:
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    _atomic_write(out / shard["file"], lambda f: np.savez(f, **arrays))


def _remove_stale(out: Path, shards: list[dict]) -> None:
    """Delete temporary files left by killed runs for ``shards`` (only this process writes them)."""
    for shard in shards:
        for tmp in out.glob(f".{shard['file']}.tmp-*"):
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# progress


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Progress:
    """A one-line progress bar on ``stream`` (redrawn in place on a terminal, else a line every 10%)."""

    def __init__(self, total: int, stream, prefix: str):
        self.total, self.stream, self.prefix = total, stream, prefix
        self.done, self.start = 0, time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last_draw, self.last_decile = 0.0, 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        decile = 10 * self.done // max(self.total, 1)
        finished = self.done >= self.total
        if (self.tty and now - self.last_draw >= 0.2) or decile > self.last_decile or finished:
            self.last_draw, self.last_decile = now, decile
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            width = 24
            bar = "#" * (width * self.done // max(self.total, 1))
            line = (f"{self.prefix}[{bar:<{width}}] {self.done}/{self.total} "
                    f"{rate:.1f} img/s ETA {_duration(eta) if math.isfinite(eta) else '?'}")
            end = "\n" if finished or not self.tty else ""
            print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------
# generate


@dataclasses.dataclass
class Summary:
    """What one :func:`generate` call did (in this process)."""

    out: str
    num: int                  # images in the whole run (all processes)
    generated: int            # images this call made
    skipped: int              # images of this process's shards found finished
    shards_written: int
    seconds: float            # wall time of this call
    sample_seconds: float     # generation after compiling
    compile_seconds: float    # 0 when nothing was left to do
    images_per_second: float  # generated / sample_seconds
    devices: int
    process_index: int
    process_count: int
    fingerprint: str


def generate(model, out, *, num: int, solver: str = "unipc", nfe: int = 10, grid: str = "logsnr",
             options: dict | None = None, skip_tuning: float | None = None, guidance: float = 1.0,
             class_labels=None, seed: int = 0, batch: int = 64, micro_batch: int = 64,
             shard_size: int = 1000, devices=None, process_index: int | None = None, process_count: int | None = None,
             preview: bool = True, log=sys.stderr) -> Summary:
    """Generate ``num`` samples into the folder ``out`` (see the module docstring).

    Arguments as for :class:`Sampler`, plus:
      num: number of samples, indices ``0 .. num - 1``.
      shard_size: samples per ``.npz`` file; part of the settings (the file layout).
      process_index, process_count: this process's part (default: ``jax.process_index()`` and
        ``jax.process_count()``); it makes the shards ``s`` with ``s % process_count == process_index``.
      preview: write ``grid.png`` (by the process that owns shard 0).
      log: stream for the progress bar and summary (``None``: silent).

    Returns a :class:`Summary`. Raises ``ValueError`` for bad arguments and ``FileExistsError``
    when ``out`` holds samples of other settings.
    """
    import jax

    start = time.perf_counter()
    for name, value in (("num", num), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    p_index = jax.process_index() if process_index is None else int(process_index)
    p_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p_index < p_count:
        raise ValueError(f"process_index must lie in [0, {p_count}), got {p_index}")
    sampler = Sampler(model, solver=solver, nfe=nfe, grid=grid, options=options, skip_tuning=skip_tuning,
                      guidance=guidance, class_labels=class_labels, seed=seed, batch=batch,
                      micro_batch=micro_batch, devices=devices)
    if num > 2**31 - 2 * sampler.batch:
        raise ValueError(f"num must be at most 2**31 - 2 batch, got {num}")
    out = Path(out)
    settings = dict(sampler.settings, num=int(num), shard_size=int(shard_size))
    shards = _plan(num, shard_size)
    manifest = dict(
        format=FORMAT, format_version=FORMAT_VERSION, fingerprint=_fingerprint(settings), settings=settings,
        model_path=str(sampler.model_path),
        randomness=("sample i: k_i = fold_in(key(seed), i); noise fold_in(k_i, 0), label fold_in(k_i, 1), "
                    "solver noise fold_in(k_i, 2)"),
        layout=("samples_XXXXXX.npz: arr_0 uint8 [n, H, W, C] = clip(floor(127.5 x + 128), 0, 255), "
                "arr_1 int32 class labels (class-conditional models only)"),
        shards=shards, versions=_versions(),
    )
    _prepare_folder(out, manifest, log)

    mine = shards[p_index::p_count]
    _remove_stale(out, mine)
    todo = [s for s in mine if not (out / s["file"]).is_file()]
    skipped = sum(s["stop"] - s["start"] for s in mine if s not in todo)
    total = sum(s["stop"] - s["start"] for s in todo)
    prefix = f"sample [{p_index + 1}/{p_count}]: " if p_count > 1 else "sample: "
    compile_seconds, sample_seconds = 0.0, 0.0
    if total:
        compile_seconds = sampler.compile()
        if log:
            print(f"{prefix}compiled in {compile_seconds:.1f} s for batches of {sampler.batch} on "
                  f"{len(sampler.devices)} {jax.default_backend()} device(s)", file=log, flush=True)
            if jax.default_backend() == "gpu" and "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
                print(f"{prefix}note: XLA picks GPU kernels by timing, so reruns can differ in rare pixels; "
                      f"set XLA_FLAGS=--xla_gpu_deterministic_ops=true (the CLI's default) for bit-exact "
                      f"images", file=log, flush=True)
        t0 = time.perf_counter()
        _run(sampler, out, todo, _Progress(total, log, prefix) if log else None)
        sample_seconds = time.perf_counter() - t0
    if preview and p_index == 0:
        _write_preview(out, shards)
    summary = Summary(
        out=str(out), num=int(num), generated=total, skipped=skipped, shards_written=len(todo),
        seconds=time.perf_counter() - start, sample_seconds=sample_seconds, compile_seconds=compile_seconds,
        images_per_second=total / sample_seconds if sample_seconds else 0.0, devices=len(sampler.devices),
        process_index=p_index, process_count=p_count, fingerprint=manifest["fingerprint"],
    )
    if log:
        print(_summary_line(summary, prefix), file=log, flush=True)
    return summary


def _write_preview(out: Path, shards: list[dict]) -> None:
    """``grid.png`` of the first images, from the leading shards that are finished."""
    parts, count = [], 0
    for shard in shards:
        if count >= _PREVIEW_COUNT or not (out / shard["file"]).is_file():
            break
        parts.append(_read_shard(out / shard["file"])[0])
        count += len(parts[-1])
    if parts:
        grid = image_grid(np.concatenate(parts)[:_PREVIEW_COUNT])
        _atomic_write(out / PREVIEW, lambda f: f.write(_png_bytes(grid)))


def _summary_line(s: Summary, prefix: str) -> str:
    if not s.generated:
        return f"{prefix}nothing to do: {s.skipped} images of this process already in {s.out}"
    return (f"{prefix}{s.generated} images in {_duration(s.seconds)} ({s.images_per_second:.1f} img/s "
            f"after a {s.compile_seconds:.1f} s compile, once; {s.skipped} found done) -> {s.out}")


def _run(sampler: Sampler, out: Path, todo: list[dict], progress) -> None:
    """Stream this process's pending indices through full batches; write each shard when whole.

    On accelerators batch k + 1 is dispatched before batch k is fetched, so the devices keep
    working while the host copies results and writes files. CPU devices would run the two
    batches at once on the same cores (slower), so there each batch is fetched first.
    """
    indices = np.concatenate([np.arange(s["start"], s["stop"]) for s in todo])
    buffers: dict[int, list] = {}  # position in todo -> [images, labels, filled]
    owner = np.concatenate([np.full(s["stop"] - s["start"], k) for k, s in enumerate(todo)])
    conditional = sampler.n_classes > 0

    def collect(lo, hi, result):
        images, labels = (np.asarray(a)[: hi - lo] for a in result)
        for k in np.unique(owner[lo:hi]):
            shard = todo[k]
            rows = np.nonzero(owner[lo:hi] == k)[0]
            pos = indices[lo:hi][rows] - shard["start"]
            n = shard["stop"] - shard["start"]
            buf = buffers.setdefault(k, [np.empty((n, *sampler.image_shape), np.uint8),
                                         np.empty(n, np.int32), 0])
            buf[0][pos], buf[1][pos] = images[rows], labels[rows]
            buf[2] += len(rows)
            if buf[2] == n:
                _write_shard(out, shard, buf[0], buf[1] if conditional else None)
                del buffers[k]
        if progress:
            progress.update(hi - lo)

    ahead = 0 if sampler.devices[0].platform == "cpu" else 1
    pending = deque()
    for lo in range(0, len(indices), sampler.batch):
        hi = min(lo + sampler.batch, len(indices))
        pending.append((lo, hi, sampler.dispatch(indices[lo:hi])))
        if len(pending) > ahead:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())


# ---------------------------------------------------------------------------------------------
# reading and exporting


def _read_shard(path: Path):
    with np.load(path) as data:
        return data["arr_0"], (data["arr_1"] if "arr_1" in data.files else None)


def _shards(out) -> list[dict]:
    out = Path(out)
    shards = read_manifest(out)["shards"]
    missing = [s["file"] for s in shards if not (out / s["file"]).is_file()]
    if missing:
        raise ValueError(f"{out} is incomplete: {len(missing)} of {len(shards)} shards missing "
                         f"(first: {missing[0]}); rerun the same command to finish it")
    return shards


def load_samples(out) -> tuple[np.ndarray, np.ndarray | None]:
    """All images (uint8 ``[num, H, W, C]``) and labels (int32 ``[num]`` or None) of a finished run."""
    parts = [_read_shard(Path(out) / s["file"]) for s in _shards(out)]
    images = np.concatenate([p[0] for p in parts])
    labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return images, labels


def export_npz(out, path) -> Path:
    """Merge the shards of ``out`` into one ``.npz`` (``arr_0`` images, ``arr_1`` labels), the
    input of ADM's evaluator. Streams shard by shard (memory: one shard); written atomically."""
    out, path = Path(out), Path(path)
    shards = _shards(out)
    manifest = read_manifest(out)
    shape = tuple(manifest["settings"]["image_shape"])
    num = manifest["settings"]["num"]
    conditional = manifest["settings"]["class_labels"] is not None

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            columns = [("arr_0", 0, np.uint8, (num, *shape))]
            if conditional:
                columns.append(("arr_1", 1, np.int32, (num,)))
            for name, col, dtype, full in columns:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(
                        member, dict(descr=np.dtype(dtype).str, fortran_order=False, shape=full))
                    for s in shards:
                        member.write(np.ascontiguousarray(_read_shard(out / s["file"])[col], dtype).tobytes())

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, write)
    return path


def export_png(out, png_dir) -> int:
    """Write every image of ``out`` as ``png_dir/{i - i % 1000:06d}/{i:06d}.png`` (EDM's layout,
    read by EDM's ``fid.py``). Returns the number of files written."""
    out, png_dir = Path(out), Path(png_dir)
    count = 0
    for s in _shards(out):
        images, _ = _read_shard(out / s["file"])
        for i, image in zip(range(s["start"], s["stop"]), images):
            sub = png_dir / f"{i - i % 1000:06d}"
            sub.mkdir(parents=True, exist_ok=True)
            write_png(sub / f"{i:06d}.png", image)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# PNG (no dependencies)


def _png_bytes(image: np.ndarray) -> bytes:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"a PNG image must be uint8 [H, W], [H, W, 1] or [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    color = 0 if image.ndim == 2 else 2  # greyscale or RGB, 8 bits per sample
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def write_png(path, image: np.ndarray) -> None:
    """Write a uint8 image (``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``) as a PNG file."""
    Path(path).write_bytes(_png_bytes(image))


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 images ``[n, H, W, C]`` into one image, nearly square, with ``pad`` black pixels
    between tiles; images smaller than 32 pixels are enlarged (nearest neighbour)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    scale = max(1, -(-_PREVIEW_MIN_SIDE // max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for k, image in enumerate(images):
        r, q = divmod(k, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = image
    return grid

"""FID and FD_DINOv2: Frechet distances between feature statistics of generated and reference images.

Two standard feature networks, each loaded from the file its authors release (read without torch
and without running code from the file), both called as ``features = network(images)``:

* ``"fid"``: **InceptionV3** (:func:`load_inception`), pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` (:mod:`jdiffsample.nets.inception`). Images of any size
  with 1 or 3 channels are handled as pytorch-fid handles PNG files: grey repeated to RGB, values
  scaled to [0, 1], bilinear resize to 299x299. 2048 features.
* ``"fd_dinov2"``: **DINOv2 ViT-L/14** (:func:`load_dinov2`), the released
  ``dinov2_vitl14_pretrain.pth`` (:mod:`jdiffsample.nets.dinov2`), with the preprocessing of EDM2's
  ``calculate_metrics.py`` ('torch' mode): bicubic resize to 224x224 with antialiasing exactly as
  ``torch.nn.functional.interpolate`` computes it (:mod:`jdiffsample.resize`), /255, ImageNet
  mean/std. The feature is the normed CLS token (1024 for ViT-L).

Images are NHWC, uint8 in [0, 255] (what samplers write) or floats in [-1, 1]. Batches are padded
to one compiled size and split over all local devices (data parallel, weights replicated).

The API the CLI (``jdiffsample fid``) and evaluation code use::

    from jdiffsample import fid
    network = fid.load_network("fd_dinov2", "dinov2_vitl14_pretrain.pth")   # or "fid", Inception's file
    mu, sigma = fid.compute_stats(images, network)       # an array, or imagesets.open_images(path)
    ref = fid.load_reference("img512.pkl")               # any reference format, see below
    score = fid.frechet((mu, sigma), ref.stats["fd_dinov2"])

Reference statistics come in the formats users hold (:func:`load_reference`):

* pytorch-fid's / EDM's ``.npz`` with ``mu`` and ``sigma`` (FID statistics; a ``metric`` entry, which
  :func:`save_stats` writes and the other tools ignore, names another metric);
* EDM2's ``.pkl``: ``{metric: {'mu', 'sigma'}, 'num_images': n}``, read with the restricted
  unpickler of :mod:`jdiffsample.nets.formats.torchfile`: only containers and NumPy arrays are rebuilt,
  nothing in the file is executed;
* ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``): images in ``arr_0``, and ``mu``,
  ``sigma`` of the whole data set (used for FID, as ADM's evaluator does); other metrics are computed
  from the images;
* images: a run folder, a folder of PNGs or an ``.npz`` with ``arr_0`` (:mod:`jdiffsample.imagesets`).

**Feature files**: any other network can be a serialized ``jax.export`` function (architecture and
weights as StableHLO; nothing is executed on loading) of one float32 argument ``[B, *image_shape]``
returning ``[B, D]`` (:func:`save_extractor`, :func:`load_extractor`; needs ``flatbuffers``). Images
are passed to it as given (the caller resizes; only the shape is checked).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pickle
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdiffsample import imagesets, resize, xla_options
from jdiffsample.metrics import feature_stats, frechet_distance
from jdiffsample.nets.formats import torchfile

__all__ = ["METRICS", "WEIGHT_FILES", "WEIGHT_URLS", "Network", "Inception", "DINOv2", "load_inception",
           "load_dinov2", "load_network", "Extractor", "save_extractor", "load_extractor", "compute_stats",
           "image_stats", "frechet", "fid", "save_stats", "load_stats", "Reference", "load_reference",
           "write_stats", "stats_format"]

#: The metrics and their feature networks' released weight files (default file names) and sources.
METRICS = ("fid", "fd_dinov2")
WEIGHT_FILES = {"fid": "pt_inception-2015-12-05-6726825d.pth", "fd_dinov2": "dinov2_vitl14_pretrain.pth"}
WEIGHT_URLS = {
    "fid": "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "fd_dinov2": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
}
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# feature networks, run data-parallel over the local devices


def _pixels(images):
    """uint8 [0, 255] or floats in [-1, 1] -> float32 in [0, 255], 3 channels (grey repeated)."""
    x = images.astype(jnp.float32) if images.dtype == jnp.uint8 else (images.astype(jnp.float32) + 1.0) * 127.5
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _unit(images):
    """uint8 [0, 255] or floats in [-1, 1] -> float32 in [0, 1], 3 channels (pytorch-fid's scaling)."""
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else (images.astype(jnp.float32) + 1.0) / 2.0
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _inception_input(images):
    """pytorch-fid's input: [0, 1], 3 channels, bilinear resize (no antialiasing) to 299x299."""
    from jdiffsample.nets import inception  # start-up time: Flax, only with a network

    return inception.resize(_unit(images))


def _dinov2_input(images):
    """EDM2's DINOv2 input: antialiased bicubic resize to 224x224, /255, ImageNet mean and std."""
    size = (DINOV2_RESOLUTION, DINOV2_RESOLUTION)
    x = resize.resize_bicubic(_pixels(images), size, antialias=True) / 255.0
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return (x - mean) / std


def _features(module, params, x):
    return module.apply({"params": params}, x)


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, platform: str, **jit_options):
    """One jitted ``fn`` per process and platform: every network object shares its programs."""
    return jax.jit(fn, compiler_options=xla_options.compile_options(jax.devices(platform)), **jit_options)


class Network:
    """A feature network: ``network(images) -> features [N, dim]`` (float64 NumPy).

    Two programs, shared by every object: ``prepare(images)`` (the network's resize and scaling),
    compiled per image shape and dtype, and the network, compiled once per architecture and batch
    size (images of every size reuse it). The weights are an argument, replicated on every local
    device, and each batch is split over the devices. A call pads its batches to one size: ``batch_size`` (a
    multiple of the device count), or for fewer images the next power of two (at least 8), so that
    few programs serve every call.
    """

    metric = ""
    name = "feature network"

    def __init__(self, prepare: Callable, module, params, dim: int, batch_size: int):
        devices = jax.local_devices()
        self.devices = len(devices)
        self.dim = int(dim)
        self.batch_size = -(-max(int(batch_size), 1) // self.devices) * self.devices
        mesh = Mesh(np.array(devices), ("batch",))
        self._batch = NamedSharding(mesh, PartitionSpec("batch"))
        self._params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self._module, self._prepare, self._platform = module, prepare, devices[0].platform

    def _check(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {images.shape}")
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
        return images

    def step_for(self, count: int, batch_size: int | None = None) -> int:
        """The padded batch size for ``count`` images: ``batch_size`` (default the network's), or
        the next power of two (at least 8) for fewer images; a multiple of the device count."""
        small = min(max(8, 1 << max(count - 1, 0).bit_length()), batch_size or self.batch_size)
        return -(-small // self.devices) * self.devices

    def dispatch(self, batch: np.ndarray, step: int) -> jax.Array:
        """Start computing the features of ``batch`` (at most ``step`` images, padded to ``step``);
        returns the device array ``[step, dim]`` without waiting for it."""
        n = len(batch)
        if n < step:
            batch = np.concatenate([batch, np.zeros((step - n, *batch.shape[1:]), batch.dtype)])
        # built on first use: loading compiles nothing
        prepare, apply = _jitted(self._prepare, self._platform), _jitted(_features, self._platform, static_argnums=0)
        return apply(self._module, self._params, prepare(jax.device_put(batch, self._batch)))

    def __call__(self, images, batch_size: int | None = None) -> np.ndarray:
        """Features of ``images``; ``batch_size`` is ignored (set at construction)."""
        images = self._check(images)
        step = self.step_for(len(images))
        out = []
        for i in range(0, len(images), step):
            batch = images[i:i + step]
            out.append(np.asarray(self.dispatch(batch, step), np.float64)[:len(batch)])
        return np.concatenate(out) if out else np.zeros((0, self.dim))


class Inception(Network):
    """pytorch-fid's InceptionV3 pool features: ``inception(images) -> [N, 2048]`` (float64)."""

    metric, name = "fid", "pytorch-fid's InceptionV3"

    def __init__(self, params, batch_size: int = 50):
        from jdiffsample.nets import inception  # start-up time: Flax, only with a network

        super().__init__(_inception_input, inception.InceptionV3(resize=False), params, inception.DIM, batch_size)


class DINOv2(Network):
    """DINOv2 features with EDM2's preprocessing: ``dinov2(images) -> [N, D]`` (float64)."""

    metric, name = "fd_dinov2", "DINOv2"

    def __init__(self, module, params, batch_size: int = 64):
        super().__init__(_dinov2_input, module, params, module.embed_dim, batch_size)
        self.name = f"DINOv2 ViT/14 ({module.embed_dim} wide, {module.depth} deep)"


def _weights_file(metric: str, path) -> Path:
    path = Path(path if path is not None else WEIGHT_FILES[metric])
    if not path.is_file():
        what = {"fid": "Inception", "fd_dinov2": "DINOv2"}[metric]
        raise FileNotFoundError(f"no {what} weights file at {path} (download {WEIGHT_URLS[metric]})")
    return path


def load_inception(path, batch_size: int = 50) -> Inception:
    """:class:`Inception` with the weights of pytorch-fid's ``pt_inception-2015-12-05`` file (or
    any PyTorch state dict of the same network). Raises ``ValueError`` naming what does not fit."""
    from jdiffsample.nets import inception  # start-up time: Flax, only with a network

    return Inception(inception.load_params(_weights_file("fid", path)), batch_size)


def load_dinov2(path, batch_size: int = 64, num_heads: int | None = None) -> DINOv2:
    """:class:`DINOv2` from a released ``dinov2_vit*14_pretrain.pth`` (its size from the tensors'
    shapes; ``num_heads`` defaults to width / 64, as released). ``ValueError`` names what does not fit."""
    from jdiffsample.nets import dinov2  # start-up time: Flax, only with a network

    module, params = dinov2.load_params(_weights_file("fd_dinov2", path), num_heads=num_heads)
    return DINOv2(module, params, batch_size)


def load_network(metric: str, weights=None, batch_size: int | None = None) -> Network:
    """The feature network of ``metric`` (``"fid"`` or ``"fd_dinov2"``) from its weights file
    (default: the released file name, :data:`WEIGHT_FILES`, in the current folder)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    load = load_inception if metric == "fid" else load_dinov2
    return load(weights, **({} if batch_size is None else {"batch_size": batch_size}))


# ---------------------------------------------------------------------------------------------
# statistics


class _Moments:
    """Mean and covariance of features added in batches (float64, sums shifted by the first
    batch's mean so that large offsets cost no precision)."""

    def __init__(self):
        self.count, self.shift, self.total, self.outer = 0, None, None, None

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.total, self.outer = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        d = f - self.shift
        self.total += d.sum(axis=0)
        self.outer += d.T @ d
        self.count += len(f)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.count}")
        m = self.total / self.count
        sigma = (self.outer - self.count * np.outer(m, m)) / (self.count - 1)
        return self.shift + m, (sigma + sigma.T) / 2


def image_stats(images, networks: dict, batch_size: int | None = None,
                progress: Callable[[int], None] | None = None) -> dict:
    """``{metric: (mu, sigma)}`` of each network's features of ``images`` (an
    :class:`~jdiffsample.imagesets.ImageSet`, a path :func:`~jdiffsample.imagesets.open_images`
    takes, or an array), reading every image once, one batch computing while the next is read.
    ``progress(n)`` is called as batches of ``n`` images finish."""
    if not isinstance(images, imagesets.ImageSet):
        images = imagesets.open_images(images)
    if not networks:
        return {}
    step = next(iter(networks.values())).step_for(images.count, batch_size)
    moments = {metric: _Moments() for metric in networks}
    pending: collections.deque = collections.deque()

    def finish():
        n, outs = pending.popleft()
        for metric, out in outs.items():
            moments[metric].add(np.asarray(out)[:n])
        if progress is not None:
            progress(n)

    for batch in images.batches(step):
        pending.append((len(batch), {m: net.dispatch(batch, step) for m, net in networks.items()}))
        if len(pending) > 1:
            finish()
    while pending:
        finish()
    return {metric: m.stats() for metric, m in moments.items()}


def compute_stats(images, extractor: Callable, batch_size: int = 256):
    """``(mu, sigma)`` of ``extractor``'s features of ``images``: an array (any extractor), or for a
    :class:`Network` also an :class:`~jdiffsample.imagesets.ImageSet` or a path of images (read in
    batches, never all at once)."""
    if isinstance(extractor, Network) and not isinstance(images, np.ndarray) and (
            isinstance(images, (imagesets.ImageSet, str, os.PathLike))):
        return image_stats(images, {extractor.metric or "features": extractor}, batch_size)[
            extractor.metric or "features"]
    return feature_stats(extractor(images, batch_size=batch_size))


def frechet(stats_a, stats_b) -> float:
    """The Frechet distance between two ``(mu, sigma)`` pairs (what FID and FD_DINOv2 report)."""
    (mu1, sigma1), (mu2, sigma2) = stats_a, stats_b
    if np.shape(mu1) != np.shape(mu2):
        raise ValueError(f"statistics of {np.shape(mu1)[0]} and {np.shape(mu2)[0]} features cannot be compared "
                         f"(different feature networks?)")
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def fid(images, extractor: Callable, reference, batch_size: int = 256) -> float:
    """FID of ``images`` against ``reference``: ``(mu, sigma)``, a stats file path (FID statistics
    of any format :func:`load_stats` reads), or reference images (whose statistics are computed
    with the same extractor)."""
    if isinstance(reference, (str, Path)):
        reference = load_stats(reference)
    elif not isinstance(reference, tuple):
        reference = compute_stats(reference, extractor, batch_size)
    return frechet(compute_stats(images, extractor, batch_size), reference)


# ---------------------------------------------------------------------------------------------
# statistics files


def _checked(where: str, metric: str, mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise ValueError(f"{where}: {metric} statistics must be float mu [D] and sigma [D, D], got {mu.dtype} "
                         f"{mu.shape} and {sigma.dtype} {sigma.shape}")
    return mu.astype(np.float64), sigma.astype(np.float64)


def _read_pkl(path: Path) -> tuple[dict, int | None]:
    data = torchfile.load_pickle(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not EDM2's statistics dict {{metric: {{mu, sigma}}}}")
    stats = {}
    for metric in METRICS:
        entry = data.get(metric)
        if isinstance(entry, dict) and "mu" in entry and "sigma" in entry:
            stats[metric] = _checked(str(path), metric, entry["mu"], entry["sigma"])
    if not stats:
        raise ValueError(f"{path}: no statistics of {' or '.join(METRICS)} (entries: {sorted(map(str, data))[:10]})")
    count = data.get("num_images")
    return stats, (int(count) if isinstance(count, (int, np.integer)) else None)


def _read_npz(path: Path) -> tuple[dict, bool]:
    """``({metric: (mu, sigma)}, has_images)`` of an ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            stats = {}
            if "mu" in names and "sigma" in names:
                metric = str(f["metric"]) if "metric" in names else "fid"
                if metric not in METRICS:
                    raise ValueError(f"{path}: statistics of unknown metric {metric!r}")
                stats[metric] = _checked(str(path), metric, f["mu"], f["sigma"])
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from None
    if not stats and "arr_0" not in names:
        raise ValueError(f"{path}: neither statistics (mu, sigma) nor images (arr_0); it holds {sorted(names)[:10]}")
    return stats, "arr_0" in names


@dataclasses.dataclass
class Reference:
    """What a reference holds: ``stats`` ``{metric: (mu, sigma)}`` read from it, and ``images``
    (an :class:`~jdiffsample.imagesets.ImageSet`) from which the other metrics are computed."""

    where: str
    format: str  # "npz" (pytorch-fid / EDM / ADM), "pkl" (EDM2) or "images"
    stats: dict
    images: imagesets.ImageSet | None = None
    num_images: int | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics it has statistics for (images: ``("fid",)``, the default)."""
        return tuple(m for m in METRICS if m in self.stats) or ("fid",)

    def check(self, metrics, networks: dict | None = None) -> None:
        """``ValueError`` unless statistics of every metric in ``metrics`` are here or computable,
        and (given the ``networks``) stored statistics have as many features as the network gives."""
        missing = [m for m in metrics if m not in self.stats]
        if missing and self.images is None:
            raise ValueError(f"{self.where} holds statistics of {', '.join(self.stats)} only, not of "
                             f"{', '.join(missing)} (and no images to compute them from)")
        for metric, network in (networks or {}).items():
            if metric in self.stats and self.stats[metric][0].shape[0] != network.dim:
                raise ValueError(f"{self.where}: its {metric} statistics are of {self.stats[metric][0].shape[0]} "
                                 f"features, {network.name} gives {network.dim}")

    def stats_for(self, networks: dict, batch_size: int | None = None,
                  progress: Callable[[int], None] | None = None) -> dict:
        """``{metric: (mu, sigma)}`` for every metric of ``networks``: read from the file, or
        computed from the reference images in one pass (``ValueError`` when neither is possible, or
        when stored statistics are of another number of features than the network gives)."""
        self.check(networks, networks)
        todo = {m: net for m, net in networks.items() if m not in self.stats}
        computed = image_stats(self.images, todo, batch_size, progress) if todo else {}
        return {m: self.stats[m] if m in self.stats else computed[m] for m in networks}


def stats_format(path) -> str:
    """``"pkl"`` or ``"npz"``: the statistics format of a file, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":
        return "pkl"
    if head.startswith(b"PK"):
        return "npz"
    raise ValueError(f"{path} is neither an .npz nor a pickle (.pkl) of statistics")


def load_reference(path, limit: int | None = None) -> Reference:
    """A :class:`Reference` from a statistics file (pytorch-fid/EDM ``.npz``, EDM2 ``.pkl``), an
    ADM reference batch (``.npz`` with ``arr_0`` and ``mu``, ``sigma``) or images (a run folder, a
    PNG folder, an ``.npz`` with ``arr_0``; ``limit``: the first ``limit`` of them)."""
    path = Path(path)
    if path.is_dir():
        return Reference(str(path), "images", {}, imagesets.open_images(path, limit))
    if not path.is_file():
        raise FileNotFoundError(f"no reference at {path} (statistics .npz/.pkl, an ADM reference batch, "
                                f"a run folder or a folder of PNGs)")
    if stats_format(path) == "pkl":
        stats, count = _read_pkl(path)
        return Reference(str(path), "pkl", stats, None, count)
    stats, has_images = _read_npz(path)
    return Reference(str(path), "npz", stats, imagesets.open_images(path, limit) if has_images else None)


def load_stats(path, metric: str = "fid"):
    """``(mu, sigma)`` of ``metric`` from a statistics file: pytorch-fid / EDM / ADM ``.npz`` or
    EDM2 ``.pkl``."""
    ref = load_reference(path)
    if metric not in ref.stats:
        raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma' (of {metric}); "
                         f"it has statistics of {', '.join(ref.stats) or 'nothing'}")
    return ref.stats[metric]


def write_stats(path, stats: dict, num_images: int | None = None, fmt: str | None = None) -> Path:
    """Write ``{metric: (mu, sigma)}`` to ``path`` as EDM2's ``.pkl`` (``fmt="pkl"``: every metric,
    ``num_images``) or pytorch-fid's ``.npz`` (``fmt="npz"``: one metric; ``metric`` names it when
    it is not FID). ``fmt`` defaults to the suffix of ``path``."""
    path = Path(path)
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt not in ("npz", "pkl"):
        raise ValueError(f"statistics are written as .npz (pytorch-fid) or .pkl (EDM2), not {path.name!r}")
    stats = {m: (np.asarray(mu, np.float64), np.asarray(sigma, np.float64)) for m, (mu, sigma) in stats.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if fmt == "npz":
        if len(stats) != 1:
            raise ValueError(f"an .npz holds one metric's statistics (pytorch-fid's layout); write "
                             f"{', '.join(stats)} to a .pkl (EDM2's layout)")
        ((metric, (mu, sigma)),) = stats.items()
        extra = {} if metric == "fid" else {"metric": np.array(metric)}
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, **extra)
    else:
        data = {"num_images": int(num_images)} if num_images is not None else {}
        data.update({m: {"mu": mu, "sigma": sigma} for m, (mu, sigma) in stats.items()})
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=4)  # protocol 4: what EDM2's own files use
    os.replace(tmp, path)
    return path


def save_stats(path, mu, sigma) -> None:
    """Write FID statistics in pytorch-fid's ``.npz`` layout (``mu``, ``sigma``)."""
    write_stats(path, {"fid": (mu, sigma)}, fmt="npz")


# ---------------------------------------------------------------------------------------------
# any other network, as a jax.export feature file


def _in_batches(fn, images: np.ndarray, step: int, pad: bool, dim: int) -> np.ndarray:
    """``fn`` over ``images`` in batches of ``step`` -> float64 features ``[N, dim]``; with
    ``pad`` the last batch is filled up with zeros to ``step`` images (one compiled shape)."""
    out = []
    for i in range(0, images.shape[0], step):
        chunk = images[i:i + step]
        n = chunk.shape[0]
        if pad and n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(jnp.asarray(chunk)), np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0, dim))


class Extractor:
    """A loaded feature file: ``extractor(images) -> features [N, D]`` (float64 NumPy)."""

    def __init__(self, exported):
        aval = exported.in_avals
        if len(aval) != 1 or len(exported.out_avals) != 1 or len(exported.out_avals[0].shape) != 2:
            raise ValueError("a feature file must hold a function of one image batch "
                             "[B, ...] returning features [B, D]")
        self._exported = exported
        shape = aval[0].shape
        self.image_shape = tuple(int(d) for d in shape[1:])
        self.batch = shape[0] if isinstance(shape[0], int) else None  # None: symbolic
        self.dim = int(exported.out_avals[0].shape[1])

    def __call__(self, images, batch_size: int = 256) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"the feature network takes images {self.image_shape}, got "
                             f"{images.shape[1:]} (resize them first)")
        # a symbolic batch takes any size; a fixed one gets its last batch padded
        return _in_batches(self._exported.call, images, self.batch or batch_size,
                           pad=self.batch is not None, dim=self.dim)


def save_extractor(fn: Callable, image_shape, path, batch: int | None = None) -> Path:
    """Serialize ``fn`` (images ``[B, *image_shape]`` float32 -> features ``[B, D]``) to ``path``.

    ``batch=None`` exports a symbolic batch dimension (any batch size); give an int for
    functions that cannot be exported that way.
    """
    from jax import export

    if batch is None:
        (b,) = export.symbolic_shape("b")
    else:
        b = int(batch)
    spec = jax.ShapeDtypeStruct((b, *image_shape), np.float32)
    exported = export.export(jax.jit(fn))(spec)
    path = Path(path)
    path.write_bytes(exported.serialize())
    return path


def load_extractor(path) -> Extractor:
    """A feature network from a file written by :func:`save_extractor`."""
    from jax import export

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the feature file {path}: {e.strerror}") from None
    try:
        exported = export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffer errors have no common type
        raise ValueError(f"{path} is not a jax.export feature file ({type(e).__name__}: {e})") from e
    return Extractor(exported)

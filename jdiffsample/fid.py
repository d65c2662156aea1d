"""FID: Frechet distance between feature statistics of generated and reference images.

Two kinds of feature network, both with the same call ``features = extractor(images)``:

* **InceptionV3** (:func:`load_inception`), the standard FID network, from pytorch-fid's weights
  file ``pt_inception-2015-12-05-6726825d.pth`` (not shipped; read without torch and without
  running code from the file, :mod:`jdiffsample.nets.inception`)::

      from jdiffsample import fid
      inception = fid.load_inception("pt_inception-2015-12-05-6726825d.pth")
      ref = fid.load_stats("fid_stats_cifar10_train.npz")   # pytorch-fid's format: mu, sigma
      score = fid.fid(images, inception, ref)               # images [N, H, W, C] in [-1, 1] or uint8

  Images of any size with 1 or 3 channels are handled as pytorch-fid handles PNG files: grey is
  repeated to RGB, values scaled to [0, 1], bilinear resize to 299x299.

* **Any other network** as a *feature file*: a serialized ``jax.export`` function (architecture
  and weights as StableHLO; nothing is executed on loading) of one float32 argument
  ``[B, *image_shape]`` (``B`` symbolic, or fixed; then batches are padded) returning ``[B, D]``::

      fid.save_extractor(apply, (299, 299, 3), "net.jaxexport")
      extractor = fid.load_extractor("net.jaxexport")

  Images are passed as given (the caller resizes; only the shape is checked). Reading and writing
  feature files needs the ``flatbuffers`` package (``jax.export``'s serialization).

Reference statistics are ``.npz`` files with ``mu [D]`` and ``sigma [D, D]``, as pytorch-fid writes
them (``--save-stats``); :func:`save_stats` writes the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from jdiffsample.metrics import feature_stats, frechet_distance

__all__ = ["Extractor", "Inception", "load_inception", "save_extractor", "load_extractor",
           "compute_stats", "save_stats", "load_stats", "fid"]


def _in_batches(fn, images: np.ndarray, step: int, pad: bool, dim: int) -> np.ndarray:
    """``fn`` over ``images`` in batches of ``step`` -> float64 features ``[N, dim]``; with
    ``pad`` the last batch is filled up with zeros to ``step`` images (one compiled shape)."""
    import jax.numpy as jnp

    out = []
    for i in range(0, images.shape[0], step):
        chunk = images[i:i + step]
        n = chunk.shape[0]
        if pad and n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(jnp.asarray(chunk)), np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0, dim))


class Extractor:
    """A loaded feature network: ``extractor(images) -> features [N, D]`` (float64 NumPy)."""

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


class Inception:
    """pytorch-fid's InceptionV3 pool features: ``inception(images) -> [N, 2048]`` (float64).

    ``images``: NHWC, uint8 in [0, 255] or floats in [-1, 1], 1 or 3 channels, any size. Batches
    are padded to ``batch_size`` (fewer images: to the next power of two, at least 8), so that few
    compiled programs serve every call.
    """

    dim = 2048

    def __init__(self, params, batch_size: int = 50):
        from jdiffsample.nets import inception

        self.batch_size = int(batch_size)
        self._fn = inception.features_fn(params)

    def __call__(self, images, batch_size: int | None = None) -> np.ndarray:
        """Features of ``images``; ``batch_size`` is ignored (set at construction)."""
        import jax.numpy as jnp

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {images.shape}")
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        else:
            images = (images.astype(np.float32) + 1.0) / 2.0
        fn = self._fn if images.shape[-1] == 3 else (lambda x: self._fn(jnp.repeat(x, 3, axis=-1)))
        step = min(self.batch_size, max(8, 1 << (images.shape[0] - 1).bit_length()))
        return _in_batches(fn, images, step, pad=True, dim=self.dim)


def load_inception(path, batch_size: int = 50) -> Inception:
    """:class:`Inception` with the weights of pytorch-fid's ``pt_inception-2015-12-05`` file (or
    any PyTorch state dict of the same network). Raises ``ValueError`` naming what does not fit."""
    from jdiffsample.nets import inception

    if not Path(path).is_file():
        raise FileNotFoundError(f"no Inception weights file at {path} (pytorch-fid's "
                                f"pt_inception-2015-12-05-6726825d.pth)")
    return Inception(inception.load_params(path), batch_size)


def save_extractor(fn: Callable, image_shape, path, batch: int | None = None) -> Path:
    """Serialize ``fn`` (images ``[B, *image_shape]`` float32 -> features ``[B, D]``) to ``path``.

    ``batch=None`` exports a symbolic batch dimension (any batch size); give an int for
    functions that cannot be exported that way.
    """
    import jax
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


def compute_stats(images, extractor: Callable, batch_size: int = 256):
    """``(mu, sigma)`` of ``extractor``'s features of ``images``."""
    return feature_stats(extractor(images, batch_size=batch_size))


def save_stats(path, mu, sigma) -> None:
    """Write reference statistics in pytorch-fid's ``.npz`` layout (``mu``, ``sigma``)."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path):
    """``(mu, sigma)`` from a pytorch-fid style ``.npz``."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma'")
        return f["mu"], f["sigma"]


def fid(images, extractor: Callable, reference, batch_size: int = 256) -> float:
    """FID of ``images`` against ``reference``: ``(mu, sigma)``, a stats ``.npz`` path, or
    reference images (whose statistics are computed with the same extractor)."""
    if isinstance(reference, (str, Path)):
        reference = load_stats(reference)
    elif not isinstance(reference, tuple):
        reference = compute_stats(reference, extractor, batch_size)
    return frechet_distance(*compute_stats(images, extractor, batch_size), *reference)

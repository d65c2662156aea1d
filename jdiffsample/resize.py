"""Bicubic resizing exactly as ``torch.nn.functional.interpolate(mode='bicubic')`` computes it.

A separable resize is two matrix products: ``out = Wh @ image @ Ww.T`` per channel. The weight
matrices depend only on the sizes, so they are computed once in NumPy (float64) and applied in JAX
(float32 products at full precision); a new image is no new program.

PyTorch has two bicubic kernels (``align_corners=False``, which is all this module does):

* **without antialiasing** (``antialias=False``): Keys' cubic convolution with ``a = -0.75``. Output
  pixel ``i`` reads the four input pixels around ``x = (i + 0.5) * scale - 0.5``, clamped to the
  edge (edge pixels repeated). DINOv2 interpolates its positional embeddings this way.
* **with antialiasing** (``antialias=True``): the cubic filter with ``a = -0.5`` (as PIL uses), whose
  support is widened by ``scale`` when shrinking (``scale > 1``) and evaluated at
  ``(j + 0.5 - center) / scale``, ``center = (i + 0.5) * scale``; taps outside the image are dropped
  and each row of weights is normalised to sum 1 (so the edges differ from the clamped kernel, also
  when enlarging). EDM2's FD_DINOv2 resizes its images to 224x224 this way. A dimension whose size
  does not change is left as it is (even when a scale factor says otherwise), as PyTorch does.

``scale`` is ``in_size / out_size``, or ``1 / scale_factor`` when PyTorch was given a scale factor
(the output size is then ``floor(in_size * scale_factor)``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bicubic_weights", "resize_bicubic", "scaled_size"]


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` (zero for ``|x| >= 2``)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _check_sizes(in_size: int, out_size: int, scale: float | None) -> float:
    if int(in_size) < 1 or int(out_size) < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    if scale is None:
        return in_size / out_size
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the resize scale must be a positive number, got {scale}")
    return float(scale)


def _clamped_weights(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """PyTorch's bicubic kernel without antialiasing (a = -0.75, edge pixels repeated)."""
    w = np.zeros((out_size, in_size))
    real = (np.arange(out_size) + 0.5) * scale - 0.5
    # PyTorch keeps the base index inside the image and the fraction in [0, 1]
    base = np.minimum(np.floor(real), in_size - 1)
    t = np.clip(real - base, 0.0, 1.0)
    rows = np.arange(out_size)
    for offset in (-1, 0, 1, 2):
        taps = np.clip(base + offset, 0, in_size - 1).astype(np.int64)
        np.add.at(w, (rows, taps), _cubic(t - offset, -0.75))
    return w


def _antialiased_weights(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """PyTorch's bicubic kernel with antialiasing (a = -0.5, support widened when shrinking,
    truncated at the edges and normalised)."""
    w = np.zeros((out_size, in_size))
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        # C++ truncates toward zero before clamping; the clamp makes that equal to floor here
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        k = _cubic((taps - center + 0.5) * inv, -0.5)
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0.0 else k
    return w


def bicubic_weights(in_size: int, out_size: int, antialias: bool, scale: float | None = None) -> np.ndarray:
    """The ``[out_size, in_size]`` float64 matrix of PyTorch's 1-D bicubic resize.

    ``scale`` (input pixels per output pixel) defaults to ``in_size / out_size``; pass
    ``1 / scale_factor`` to reproduce an ``interpolate(scale_factor=...)`` call.
    """
    in_size, out_size = int(in_size), int(out_size)
    scale = _check_sizes(in_size, out_size, scale)
    if antialias and in_size == out_size:
        return np.eye(in_size)  # PyTorch's antialiased resize leaves a dimension of unchanged size alone
    return (_antialiased_weights if antialias else _clamped_weights)(in_size, out_size, scale)


def scaled_size(in_size: int, scale_factor: float) -> int:
    """The output size PyTorch's ``interpolate`` gives for ``scale_factor``: ``floor(in * factor)``."""
    return int(math.floor(float(in_size) * float(scale_factor)))


def resize_bicubic(x, size: tuple[int, int], antialias: bool, scales: tuple[float, float] | None = None):
    """Resize NHWC (or ``[..., H, W, C]``) images to ``size = (height, width)`` as PyTorch's bicubic
    ``interpolate`` does (``align_corners=False``). ``scales``: input pixels per output pixel for
    (height, width), when they are not ``in / out`` (see :func:`bicubic_weights`). Float32 out."""
    x = jnp.asarray(x, jnp.float32)
    h, w = int(size[0]), int(size[1])
    sh, sw = scales if scales is not None else (None, None)
    wh = jnp.asarray(bicubic_weights(x.shape[-3], h, antialias, sh), jnp.float32)
    ww = jnp.asarray(bicubic_weights(x.shape[-2], w, antialias, sw), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", wh, x, precision=hi)
    return jnp.einsum("pw,...owc->...opc", ww, x, precision=hi)

"""Sample-quality metrics: the Frechet distance, "digits FD" and classifier accuracy.

* :func:`frechet_distance` between two Gaussians ``N(mu1, cov1)``, ``N(mu2, cov2)``::

      |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))

  computed in float64 with symmetric eigendecompositions only (no SciPy): the trace term is
  ``sum(sqrt(eig(S1 cov2 S1)))`` with ``S1 = cov1^(1/2)``; ``S1 cov2 S1`` is symmetric PSD and has the
  eigenvalues of ``cov1 cov2``. Tiny negative eigenvalues from round-off are clipped to zero.
* **digits FD**: the Frechet distance between the statistics of a small classifier's penultimate
  features (64 ReLU units) on generated 8x8 digits and on the 1797 real digits of scikit-learn.
  The classifier and the real statistics ship in ``jdiffsample/assets/digits_classifier/``
  (made by ``examples/train_digits_classifier.py``), so it runs offline without scikit-learn.
  Like FID it is biased upwards for small samples: compare numbers at the same sample count.
* :func:`digits_accuracy`: the classifier's accuracy on class-conditional samples.

Images are NHWC ``[N, 8, 8, 1]`` (or ``[N, 8, 8]`` / ``[N, 64]``) in the model's range [-1, 1].
For FID on other data sets see :mod:`jdiffsample.fid`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

__all__ = [
    "frechet_distance",
    "feature_stats",
    "DigitsClassifier",
    "digits_classifier",
    "digits_features",
    "digits_fd",
    "digits_accuracy",
    "real_digits",
    "CLASSIFIER_DIR",
]

#: The shipped digits classifier: ``weights.npz`` (layers and the real-digit statistics) and
#: ``info.json`` (architecture, training and held-out accuracy).
CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "digits_classifier"


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The squared Frechet (2-Wasserstein) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    Covariances must be symmetric positive semi-definite ``[D, D]``; means ``[D]``. Float64.
    With singular covariances the absolute accuracy is about ``sqrt(eps) * trace`` (~1e-7 of it).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"shapes must be mu [D] and cov [D, D] for both, got {mu1.shape}, "
                         f"{cov1.shape}, {mu2.shape}, {cov2.shape}")
    if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, cov1, cov2)):
        raise ValueError("non-finite statistics (NaN or inf in the features?)")
    s1 = _sqrtm_psd(cov1)
    inner = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    # Round-off in the square roots of near-zero eigenvalues (singular covariances) is of order
    # sqrt(eps) * trace and can push a true 0 slightly negative: the distance is >= 0.
    return max(0.0, float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``, N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class DigitsClassifier:
    """The shipped MLP ``64 -> hidden -> features -> 10`` (ReLU), evaluated in NumPy.

    ``weights.npz`` holds ``w0, b0, w1, b1, w2, b2`` (``x @ w + b``) and the real digits' feature
    statistics ``real_mu``, ``real_cov``.
    """

    def __init__(self, path=CLASSIFIER_DIR):
        path = Path(path)
        try:
            data = np.load(path / "weights.npz")
            self.info = json.loads((path / "info.json").read_text())
        except OSError as e:
            raise FileNotFoundError(f"digits classifier not found in {path}: {e}") from None
        self.layers = [(data[f"w{i}"].astype(np.float64), data[f"b{i}"].astype(np.float64))
                       for i in range(3)]
        self.real_mu, self.real_cov = data["real_mu"], data["real_cov"]

    @staticmethod
    def _flat(images) -> np.ndarray:
        x = np.asarray(images, np.float64)
        x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x
        if x.ndim != 2 or x.shape[1] != 64:
            raise ValueError(f"expected 8x8 single-channel images, got shape {np.shape(images)}")
        if not np.all(np.isfinite(x)):
            raise ValueError("images contain NaN or inf")
        return np.clip(x, -1.0, 1.0)

    def features(self, images) -> np.ndarray:
        """Penultimate (ReLU) features ``[N, D]`` of images in [-1, 1] (clipped to it)."""
        h = self._flat(images)
        for w, b in self.layers[:2]:
            h = np.maximum(h @ w + b, 0.0)
        return h

    def logits(self, images) -> np.ndarray:
        w, b = self.layers[2]
        return self.features(images) @ w + b

    def predict(self, images) -> np.ndarray:
        """Predicted classes ``[N]``."""
        return np.argmax(self.logits(images), axis=1)


def real_digits(dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as NHWC images ``[1797, 8, 8, 1]`` in [-1, 1] (values 0..16
    mapped linearly) and their labels ``[1797]`` (int32). Needs scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images.astype(dtype) / 8.0 - 1.0)[..., None], digits.target.astype(np.int32)


@functools.lru_cache(maxsize=2)
def digits_classifier(path=CLASSIFIER_DIR) -> DigitsClassifier:
    """The shipped classifier (loaded once)."""
    return DigitsClassifier(path)


def digits_features(images) -> np.ndarray:
    """The shipped classifier's penultimate features of 8x8 images in [-1, 1]."""
    return digits_classifier().features(images)


def digits_fd(images, reference=None) -> float:
    """Digits FD of ``images`` ([N, 8, 8, 1] in [-1, 1], N >= 2) against the real digits, or
    against ``reference`` images when given (e.g. one half of the real set vs the other)."""
    clf = digits_classifier()
    mu, cov = feature_stats(clf.features(images))
    if reference is None:
        return frechet_distance(mu, cov, clf.real_mu, clf.real_cov)
    return frechet_distance(mu, cov, *feature_stats(clf.features(reference)))


def digits_accuracy(images, labels) -> float:
    """Fraction of ``images`` the shipped classifier assigns to ``labels`` ([N] integers)."""
    labels = np.asarray(labels)
    pred = digits_classifier().predict(images)
    if labels.shape != pred.shape:
        raise ValueError(f"labels must be [N] = {pred.shape}, got {labels.shape}")
    return float(np.mean(pred == labels))

"""Train the classifier behind "digits FD" (:mod:`jdiffsample.metrics`) and ship it.

    python examples/train_digits_classifier.py      # ~10 s; writes jdiffsample/assets/digits_classifier/

An MLP ``64 -> 128 -> 64 -> 10`` (ReLU) on scikit-learn's digits scaled to [-1, 1] (the diffusion
model's range), trained with Adam and weight decay on a stratified 80% split with small Gaussian
input noise; the other 20% give the held-out accuracy recorded in ``info.json``. The 64 penultimate
units are the FD features; their mean and covariance over all 1797 real digits are stored with
the weights (``real_mu``, ``real_cov``), so that the metric needs neither scikit-learn nor
retraining.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiffsample import metrics

OUT = Path(__file__).resolve().parents[1] / "jdiffsample" / "assets" / "digits_classifier"
SIZES = (64, 128, 64, 10)


def load_data():
    images, labels = metrics.real_digits()
    return images.reshape(-1, 64).astype(np.float32), labels


def split(labels, fraction: float, seed: int):
    """Stratified train / held-out index split."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        train += list(idx[:k])
        held += list(idx[k:])
    return np.sort(train), np.sort(held)


def forward(params, x):
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--noise", type=float, default=0.1, help="std of the input noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    x, y = load_data()
    train, held = split(y, 0.8, args.seed)
    key = jax.random.key(args.seed)
    keys = jax.random.split(key, len(SIZES))
    params = [(jax.random.normal(k, (i, o)) * np.sqrt(2.0 / i), jnp.zeros(o))
              for k, i, o in zip(keys, SIZES[:-1], SIZES[1:])]
    opt = optax.adamw(1e-3, weight_decay=1e-4)
    state = opt.init(params)
    xt, yt = jnp.asarray(x[train]), jnp.asarray(y[train])

    @jax.jit
    def step(params, state, key):
        def loss(p):
            noisy = xt + args.noise * jax.random.normal(key, xt.shape)
            return optax.softmax_cross_entropy_with_integer_labels(forward(p, noisy), yt).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    for i in range(args.steps):
        params, state, loss = step(params, state, jax.random.fold_in(key, i))
    params = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in params]
    accuracy = lambda idx: float(np.mean(np.argmax(forward(params, x[idx]), 1) == y[idx]))  # noqa: E731

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {f"{n}{i}": a for i, layer in enumerate(params) for n, a in zip("wb", layer)}
    np.savez(out / "weights.npz", **arrays, real_mu=np.zeros(SIZES[-2]),
             real_cov=np.eye(SIZES[-2]))  # placeholders: the statistics need the saved layers
    info = dict(architecture="MLP " + " -> ".join(map(str, SIZES)) + " (ReLU); features: the "
                f"{SIZES[-2]} penultimate units", input="8x8 digits scaled to [-1, 1], flattened",
                steps=args.steps, input_noise=args.noise, seed=args.seed,
                train_images=len(train), heldout_images=len(held),
                train_accuracy=accuracy(train), heldout_accuracy=accuracy(held),
                final_loss=float(loss), script="examples/train_digits_classifier.py")
    (out / "info.json").write_text(json.dumps(info, indent=1))
    mu, cov = metrics.feature_stats(metrics.DigitsClassifier(out).features(x))
    np.savez(out / "weights.npz", **arrays, real_mu=mu, real_cov=cov)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bundled digits model, the digits FD / accuracy metrics, the FID module, ``jdiffsample eval``
and ``examples/train_digits.py --smoke``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_within_one_level, rebuild
from conftest import require

from jdiffsample import fid, metrics, nets, timesteps
from jdiffsample.solvers import sample

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "jdiffsample" / "assets" / "digits"


def _random_gaussian(rng, d):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def _real_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 8.0 - 1.0, digits.target


# -- Frechet distance ---------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general covariances: SciPy's matrix square root, and invariance under a rotation
    import scipy.linalg

    (m1, c1), (m2, c2) = _random_gaussian(rng, 16), _random_gaussian(rng, 16)
    tr = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr
    assert metrics.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    rotated = metrics.frechet_distance(q @ m1, q @ c1 @ q.T, q @ m2, q @ c2 @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    # identical (and singular) distributions: zero, not a negative round-off
    low_rank = np.outer(m1, m1)
    assert 0 <= metrics.frechet_distance(m1, low_rank, m1, low_rank) < 1e-7 * np.trace(low_rank)
    with pytest.raises(ValueError, match="shapes"):
        metrics.frechet_distance(m1, c1, m2[:3], c2)


def test_fid_with_a_random_feature_network(tmp_path):
    """A random linear feature map exported to a feature file: its FID on Gaussian inputs matches
    the closed form for the mapped Gaussians, and the loaded file reproduces the function."""
    require("flatbuffers")  # jax.export serialization
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(4 * 4 * 2, 8)) / 5, jnp.float32)

    def features(x):
        return x.reshape(x.shape[0], -1) @ w

    path = fid.save_extractor(features, (4, 4, 2), tmp_path / "random.jaxexport")
    extractor = fid.load_extractor(path)
    assert extractor.image_shape == (4, 4, 2) and extractor.dim == 8 and extractor.batch is None
    x = rng.normal(size=(10, 4, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(extractor(x, batch_size=3), features(x), rtol=1e-5, atol=1e-6)

    (m1, c1), (m2, c2) = _random_gaussian(rng, 32), _random_gaussian(rng, 32)
    n = 100_000
    draws = [rng.multivariate_normal(m, c, n).reshape(n, 4, 4, 2) for m, c in ((m1, c1), (m2, c2))]
    w64 = np.asarray(w, np.float64)
    expected = metrics.frechet_distance(w64.T @ m1, w64.T @ c1 @ w64, w64.T @ m2, w64.T @ c2 @ w64)
    fid.save_stats(tmp_path / "ref.npz", *fid.compute_stats(draws[1], extractor, 20_000))
    got = fid.fid(draws[0], extractor, tmp_path / "ref.npz", batch_size=20_000)
    assert got == pytest.approx(expected, rel=0.05)

    (tmp_path / "junk.jaxexport").write_bytes(b"not a feature file")
    with pytest.raises(ValueError, match="not a jax.export feature file"):
        fid.load_extractor(tmp_path / "junk.jaxexport")
    with pytest.raises(ValueError, match="takes images"):
        extractor(np.zeros((2, 8, 8, 1), np.float32))


# -- digits FD and the shipped classifier --------------------------------------------------------


def test_digits_fd_real_halves_vs_noise():
    images, labels = _real_digits()
    clf = metrics.digits_classifier()
    assert clf.info["heldout_accuracy"] > 0.97
    assert metrics.digits_accuracy(images, labels) > 0.97
    perm = np.random.default_rng(0).permutation(len(images))
    half = len(images) // 2
    halves = metrics.digits_fd(images[perm[:half]], reference=images[perm[half:]])
    noise = np.random.default_rng(1).uniform(-1, 1, size=(half, 8, 8, 1))
    noise_fd = metrics.digits_fd(noise)
    assert 0 <= halves < 0.05 * noise_fd
    assert metrics.digits_fd(images) < 1e-6  # the stored statistics are those of the real set


# -- the bundled model ---------------------------------------------------------------------------


def test_bundled_model_samples_recognisable_digits():
    """UniPC-3 at NFE 10 on 200 samples: accuracy ~0.96 (the ODE reference reaches 0.95) and digits
    FD ~5.1. Accuracy alone cannot catch a broken sampler: over-smoothed prototype digits classify
    perfectly (a uniform-t grid: accuracy 1.0, FD 24.7; DDIM with 3 steps: 1.0, FD 11.3), so the FD
    bound is the check that can fail."""
    config = nets.read_config(DIGITS)
    assert config["class_name"] == "EDMPrecond" and config["kwargs"]["label_dim"] == 10
    size = sum(f.stat().st_size for f in DIGITS.rglob("*") if f.is_file())
    assert size < 5 * 2**20
    model = nets.load_model("digits")
    labels = jnp.arange(200) % 10
    schedule = model.schedule
    x = jax.random.normal(jax.random.key(0), (200, 8, 8, 1)) * schedule.t_max
    images = np.asarray(sample(model.denoiser(labels), x, timesteps.logsnr(schedule, 10), schedule, "unipc"))
    assert images.shape == (200, 8, 8, 1) and np.all(np.isfinite(images))
    accuracy = metrics.digits_accuracy(images, np.asarray(labels))
    assert accuracy > 0.9, accuracy
    fd = metrics.digits_fd(images)
    assert fd < 8.0, fd


def test_eval_cli_writes_tables(tmp_path):
    """The tables, and one sampling path: an eval cell's images are, bit for bit, the images
    ``jdiffsample sample`` writes for the same model, solver, NFE, grid, Skip-Tuning and seed."""
    from jdiffsample import cli, pipeline

    out = tmp_path / "eval"
    rc = cli.main(["eval", "--solvers", "ddim", "--nfe", "4,6", "--grids", "logsnr",
                   "--skip", "0.8", "--samples", "20", "--batch", "20", "--ref-steps", "4", "--seed", "5",
                   "--micro-batch", "8", "--out", str(out), "--save-samples", str(tmp_path / "cells"), "--no-plot"])
    assert rc == 0
    assert cli.main(["sample", "--model", "digits", "--solver", "ddim", "--nfe", "6", "--grid", "logsnr",
                     "--skip-tuning", "0.8", "--seed", "5", "--num", "20", "--micro-batch", "8", "--batch", "16",
                     "--class-labels", ",".join(map(str, range(10))), "--out", str(tmp_path / "sample"),
                     "--quiet"]) == 0
    cell, ours = pipeline.load_samples(tmp_path / "cells" / "ddim_nfe6_logsnr_rho0.8"), \
        pipeline.load_samples(tmp_path / "sample")
    np.testing.assert_array_equal(cell[0], ours[0])
    np.testing.assert_array_equal(cell[1], ours[1])
    assert len(list((tmp_path / "cells").iterdir())) == 5  # 4 cells and the reference
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["nfe"], r["rho_bottom"]) for r in rows] == [("4", "1.0"), ("6", "1.0"),
                                                            ("4", "0.8"), ("6", "0.8")]
    assert all(np.isfinite(float(r["fd"])) and float(r["error"]) > 0 for r in rows)
    errors = {(r["nfe"], r["rho_bottom"]): float(r["error"]) for r in rows}
    assert errors[("6", "1.0")] < errors[("4", "1.0")]  # DDIM's error against the ODE reference falls with NFE
    # the cell's images rebuilt by hand: Skip-Tuning 0.8 on the bundled weights, labels cycling 0-9,
    # sigma_max times each sample's noise, DDIM on the logSNR grid of 6 steps
    from jdiffsample import skip_tuning

    model = nets.load_model("digits")
    tuned = model.with_variables(skip_tuning.apply(model.variables, rho_bottom=0.8))
    manual, _ = rebuild(tuned, [3, 14], seed=5, times=timesteps.logsnr(model.schedule, 6), solver="ddim",
                        labels=[3, 4])
    assert_within_one_level(manual, cell[0][[3, 14]])
    text = (out / "results.md").read_text()
    assert "Digits FD" in text and "| DDIM | logsnr |" in text and "| DDIM | logsnr | 0.8 |" in text
    assert cli.main(["eval", "--solvers", "nope", "--out", str(out)]) == 2


def test_eval_cells_on_grids_found_on_the_model_are_what_sample_writes(tmp_path):
    """GITS and learned grids come from the model's trajectories: an eval cell on one is, bit for bit,
    what ``jdiffsample sample`` writes with the same settings (same grid, same warm-up noise)."""
    from jdiffsample import cli, pipeline

    learn = ["--learn-batch", "2", "--learn-iters", "1", "--seed", "3", "--micro-batch", "2"]
    assert cli.main(["eval", "--solvers", "ipndm", "--nfe", "4", "--grids", "gits,learned", "--skip", "",
                     "--samples", "4", "--batch", "4", "--ref-steps", "2", *learn, "--out", str(tmp_path / "eval"),
                     "--save-samples", str(tmp_path / "cells"), "--no-plot"]) == 0
    pipeline.plan.__globals__["_GRID_CACHE"].clear()  # found again, not remembered from the eval run
    for grid in ("gits", "learned"):
        assert cli.main(["sample", "--model", "digits", "--solver", "ipndm", "--nfe", "4", "--grid", grid, *learn,
                         "--num", "4", "--class-labels", "0,1,2,3",
                         "--out", str(tmp_path / grid), "--quiet"]) == 0
        cell, ours = (pipeline.load_samples(tmp_path / "cells" / f"ipndm_nfe4_{grid}"),
                      pipeline.load_samples(tmp_path / grid))
        np.testing.assert_array_equal(cell[0], ours[0], err_msg=grid)
        np.testing.assert_array_equal(cell[1], ours[1], err_msg=grid)


# -- training ------------------------------------------------------------------------------------


def test_train_digits_smoke(tmp_path):
    summary = tmp_path / "summary.json"
    subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py"), "--smoke",
                    "--workdir", str(tmp_path / "ckpt"), "--summary", str(summary)],
                   check=True, capture_output=True, timeout=900)
    result = json.loads(summary.read_text())
    assert result["steps"] == 30
    assert result["final_loss"] < 0.9 * result["first_loss"]

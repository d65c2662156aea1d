"""``jdiffsample fid``: image sets, PNG decoding, reference formats, the Frechet distance and bad input.

The feature network is the golden fixture's tiny DINOv2 (its features are checked against EDM2's
detector in test_dinov2.py); here the command's number must equal the textbook formula (SciPy's
matrix square root) on the features of the same images, whatever form the images and the reference
come in. PNG files are checked against Pillow (a test dependency, through pytorch-fid).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import _torch_pickles as tp
from conftest import ROOT, fixture_dir, require

from jdiffsample import cli, fid, imagesets
from jdiffsample.pipeline import output
from jdiffsample.pipeline.images import write_png

scipy_linalg = require("scipy.linalg")

N = 72  # images per set: more than the 64 features, so that covariances have full rank


# ---------------------------------------------------------------------------------------------
# image files


def encode_png(image: np.ndarray, filters, depth: int = 8, interlace: int = 0) -> bytes:
    """A PNG with the given row filters (PNG spec, section 9), encoded from the known pixels."""
    h, w, c = image.shape
    x = image.reshape(h, w * c).astype(np.int32)
    rows, prev = [], np.zeros(w * c, np.int32)
    for r, f in zip(range(h), filters):
        cur = x[r]
        a = np.concatenate([np.zeros(c, np.int32), cur[:-c]])
        up_left = np.concatenate([np.zeros(c, np.int32), prev[:-c]])
        p = a + prev - up_left
        pa, pb, pc = np.abs(p - a), np.abs(p - prev), np.abs(p - up_left)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, prev, up_left))
        pred = [0, a, prev, (a + prev) // 2, paeth][f]
        rows.append(bytes([f]) + ((cur - pred) & 255).astype(np.uint8).tobytes())
        prev = cur

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, depth, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


def test_png_decoding_equals_pillow(tmp_path):
    Image = require("PIL.Image")
    rng = np.random.default_rng(0)
    for c, mode in ((1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")):
        for h, w in ((13, 9), (1, 5), (6, 1)) if c == 3 else ((13, 9),):  # each shape compiles a decoder
            image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
            image[h // 2:] = image[h // 2:] // 8 + 100  # smooth rows, where filters pay off
            filters = rng.integers(0, 5, h)
            filters[:5 if h >= 5 else h] = np.arange(min(h, 5))  # every filter, on the first row too
            mine = tmp_path / f"mine{c}_{h}_{w}.png"
            mine.write_bytes(encode_png(image, filters))
            theirs = tmp_path / f"pil{c}_{h}_{w}.png"
            Image.fromarray(image[..., 0] if c == 1 else image, mode).save(theirs)
            for path in (mine, theirs):
                pil = np.asarray(Image.open(path))
                np.testing.assert_array_equal(pil.reshape(h, w, c), image)  # the encoder is right
                np.testing.assert_array_equal(imagesets.read_png(path), image)
    write_png(tmp_path / "own.png", image[..., :3])  # jdiffsample's own (unfiltered) PNGs
    np.testing.assert_array_equal(imagesets.read_png(tmp_path / "own.png"), image[..., :3])
    refused = {"16-bit": encode_png(image[..., :1].astype(np.uint16), [0] * h, depth=16),
               "interlaced": encode_png(image[..., :3], [0] * h, interlace=1)}
    Image.fromarray(image[..., :3]).convert("P").save(tmp_path / "palette.png")
    for name, data in refused.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    for name in (*refused, "palette"):
        with pytest.raises(ValueError, match=r"only 8-bit greyscale, grey\+alpha, RGB and RGBA non-interlaced"):
            imagesets.png_info(tmp_path / f"{name}.png")


def make_run(folder, images, shard_size):
    """A finished ``jdiffsample sample`` output folder holding ``images``."""
    shards = output.plan(len(images), shard_size)
    record = dict(num=len(images), output_shape=list(images.shape[1:]), n_classes=0, latents_only=False)
    output.prepare(folder, output.new_manifest(record, {"model": "test"}, shards), None)
    for shard in shards:
        output.write_shard(folder, shard, images[shard["start"]:shard["stop"]], None)
    return folder


def make_png_folder(folder, images):
    """PNG files in subfolders of 10, like EDM's ``generate.py --subdirs``."""
    for i, image in enumerate(images):
        (folder / f"{i // 10:06d}").mkdir(parents=True, exist_ok=True)
        write_png(folder / f"{i // 10:06d}" / f"{i:06d}.png", image)
    return folder


def test_image_sets(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (23, 5, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "batch.npz", arr_0=images)
    sources = [make_run(tmp_path / "run", images, 10), make_png_folder(tmp_path / "pngs", images),
               tmp_path / "batch.npz", images]
    for source in sources:
        s = imagesets.open_images(source)
        assert (s.count, s.shape) == (23, (5, 7, 3))
        batches = list(s.batches(8))
        assert [len(b) for b in batches] == [8, 8, 7]
        np.testing.assert_array_equal(np.concatenate(batches), images)
        np.testing.assert_array_equal(imagesets.open_images(source, limit=12).array(), images[:12])
    # alpha is dropped, grey stays one channel
    np.savez(tmp_path / "rgba.npz", arr_0=np.concatenate([images, images[..., :1]], -1))
    assert imagesets.open_images(tmp_path / "rgba.npz").shape == (5, 7, 3)
    np.testing.assert_array_equal(imagesets.open_images(tmp_path / "rgba.npz").array(), images)
    np.savez(tmp_path / "grey.npz", arr_0=images[..., 0])
    assert imagesets.open_images(tmp_path / "grey.npz").shape == (5, 7, 1)
    (tmp_path / "pngs" / "000001" / "stray.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 .jpg image \(e.g. 000001/stray.jpg\); only PNG files are read"):
        imagesets.open_images(tmp_path / "pngs")


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Images as a PNG folder (PATH) and a run folder (REF), the tiny DINOv2's weights, and the
    features of both sets computed directly."""
    tmp = tmp_path_factory.mktemp("fid")
    weights = fixture_dir("dinov2_tiny") / "dinov2_tiny_pretrain.pth"
    rng = np.random.default_rng(2)
    path_images = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
    ref_images = (path_images // 3 + np.array([120, 40, 80], np.uint8)).astype(np.uint8)  # less contrast, tinted
    network = fid.load_dinov2(weights, batch_size=32)
    return dict(tmp=tmp, weights=weights, pngs=make_png_folder(tmp / "pngs", path_images),
                run=make_run(tmp / "run", ref_images, 40), images=(path_images, ref_images),
                features=(network(path_images), network(ref_images)))


def textbook_fd(f1, f2) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real))


def run_fid(capsys, *args):
    """``jdiffsample fid ...`` in-process: (exit status, stdout, stderr lines)."""
    rc = cli.main(["fid", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


def test_fd_equals_the_textbook_formula(setup, capsys):
    expected = textbook_fd(*setup["features"])
    assert expected > 1.0
    tmp = setup["tmp"]
    rc, out, _ = run_fid(capsys, setup["pngs"], "--ref", setup["run"], "--metric", "fd_dinov2",
                         "--dinov2", setup["weights"], "--save-stats", tmp / "path.pkl", "--batch", 32)
    assert rc == 0
    (line,) = out.strip().splitlines()
    name, value = line.split()
    assert name == "fd_dinov2" and float(value) == pytest.approx(expected, rel=1e-5)
    # --save-stats: EDM2's pickle, as its calculate_metrics.py reads it (pickle.load)
    with open(tmp / "path.pkl", "rb") as f:
        saved = pickle.load(f)
    assert saved["num_images"] == N and set(saved) == {"num_images", "fd_dinov2"}
    features = setup["features"][0]
    np.testing.assert_allclose(saved["fd_dinov2"]["mu"], features.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(saved["fd_dinov2"]["sigma"], np.cov(features, rowvar=False), rtol=0, atol=1e-6)


def test_statistics_files_read_back_in_every_format(setup, capsys):
    """REF's statistics saved as .pkl and .npz (statistics only: no --ref), then used as REF, give
    the number that REF's images give; files in EDM2's and pytorch-fid's own layouts are read."""
    tmp, weights, expected = setup["tmp"], setup["weights"], textbook_fd(*setup["features"])
    for name in ("ref.pkl", "ref.npz"):
        rc, out, _ = run_fid(capsys, setup["run"], "--metric", "fd_dinov2", "--dinov2", weights,
                             "--save-stats", tmp / name, "--batch", 32)
        assert rc == 0 and out == ""
        ref = fid.load_reference(tmp / name)
        assert ref.metrics == ("fd_dinov2",) and ref.format == name[-3:]
        rc, out, _ = run_fid(capsys, setup["pngs"], "--ref", tmp / name, "--dinov2", weights, "--json", "--batch", 32)
        result = json.loads(out)
        assert rc == 0 and result["fd_dinov2"] == pytest.approx(expected, rel=1e-5) and result["num_images"] == N
    with np.load(tmp / "ref.npz") as f:  # pytorch-fid's reader takes mu and sigma
        assert set(f.files) == {"mu", "sigma", "metric"} and str(f["metric"]) == "fd_dinov2"
    # files written by the other tools: EDM2's pickle under any protocol, pytorch-fid's / EDM's npz
    mu, sigma = np.arange(3.0), np.diag([1.0, 2.0, 3.0])
    for protocol in (2, 4, 5):
        with open(tmp / f"edm2_{protocol}.pkl", "wb") as f:
            pickle.dump({"fid": {"mu": mu, "sigma": sigma}, "num_images": 50000}, f, protocol=protocol)
        ref = fid.load_reference(tmp / f"edm2_{protocol}.pkl")
        assert ref.metrics == ("fid",) and ref.num_images == 50000
        np.testing.assert_array_equal(ref.stats["fid"][1], sigma)
    np.savez(tmp / "pytorch_fid.npz", mu=mu, sigma=sigma)
    np.testing.assert_array_equal(fid.load_stats(tmp / "pytorch_fid.npz")[0], mu)
    fid.write_stats(tmp / "two.pkl", {"fid": (mu, sigma), "fd_dinov2": (mu + 1, sigma)}, 7)
    ref = fid.load_reference(tmp / "two.pkl")
    assert ref.metrics == ("fid", "fd_dinov2") and ref.num_images == 7
    np.testing.assert_array_equal(ref.stats["fd_dinov2"][0], mu + 1)


def test_adm_reference_batch(setup, capsys):
    """ADM's reference batches: FID statistics of the whole data set and images; FID comes from the
    statistics, other metrics from the images."""
    tmp, (path_images, ref_images) = setup["tmp"], setup["images"]
    fid_mu, fid_sigma = np.ones(2048), np.eye(2048)
    np.savez(tmp / "VIRTUAL_ref.npz", arr_0=ref_images, mu=fid_mu, sigma=fid_sigma, mu_s=np.ones(3), sigma_s=np.eye(3))
    ref = fid.load_reference(tmp / "VIRTUAL_ref.npz")
    assert ref.metrics == ("fid",) and ref.images.count == N
    np.testing.assert_array_equal(ref.stats["fid"][0], fid_mu)
    np.savez(tmp / "samples.npz", arr_0=path_images)
    rc, out, _ = run_fid(capsys, tmp / "samples.npz", "--ref", tmp / "VIRTUAL_ref.npz", "--metric", "fd_dinov2",
                         "--dinov2", setup["weights"], "--json", "--batch", 32)
    result = json.loads(out)
    assert rc == 0 and result["ref_num_images"] == N
    assert result["fd_dinov2"] == pytest.approx(textbook_fd(*setup["features"]), rel=1e-5)


def test_sharded_over_two_devices(setup, tmp_path):
    """Two (host) devices split each batch: the same statistics as one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT),
               JAX_PLATFORMS="cpu")
    script = ("import sys, numpy as np, jax; from jdiffsample import fid\n"
              "assert jax.local_device_count() == 2\n"
              "net = fid.load_dinov2(sys.argv[1], batch_size=6)\n"
              "assert net.batch_size == 6\n"
              "mu, sigma = fid.compute_stats(sys.argv[2], net)\n"
              "np.savez(sys.argv[3], mu=mu, sigma=sigma)\n")
    images = setup["images"][0][:11]
    np.savez(tmp_path / "images.npz", arr_0=images)
    r = subprocess.run([sys.executable, "-c", script, str(setup["weights"]), str(tmp_path / "images.npz"),
                        str(tmp_path / "stats.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    features = setup["features"][0][:11]
    with np.load(tmp_path / "stats.npz") as f:
        np.testing.assert_allclose(f["mu"], features.mean(0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(f["sigma"], np.cov(features, rowvar=False), rtol=0, atol=1e-6)


def test_hostile_pickle_runs_nothing(setup, capsys):
    tmp = setup["tmp"]
    sentinel = tmp / "pwned"
    evil = tp.Reduce(tp.Global("posix", "system"), (f"touch {sentinel}",))
    (tmp / "evil.pkl").write_bytes(tp.dumps({"fid": {"mu": evil, "sigma": evil}}, protocol=4))
    rc, out, err = run_fid(capsys, setup["pngs"], "--ref", tmp / "evil.pkl")
    assert rc == 2 and len(err) == 1 and "global posix.system, which is not on the allow-list" in err[0], err
    assert not sentinel.exists()


def test_bad_input(setup, capsys):
    tmp, weights = setup["tmp"], setup["weights"]
    images = setup["images"][0]
    make_png_folder(tmp / "one", images[:1])
    make_png_folder(tmp / "mixed", images[:3])
    write_png(tmp / "mixed" / "000000" / "big.png", np.zeros((17, 16, 3), np.uint8))
    np.savez(tmp / "fid_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    fid.write_stats(tmp / "small.pkl", {"fd_dinov2": (np.zeros(10), np.eye(10))})
    torch = require("torch")
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, tmp / "other.pth")
    pngs = setup["pngs"]
    cases = [
        ([pngs, "--ref", tmp / "fid_only.npz", "--metric", "fd_dinov2"],
         r"fid_only.npz holds statistics of fid only, not of fd_dinov2"),
        ([tmp / "one", "--ref", setup["run"]], r"has 1 image; statistics need at least 2"),
        ([pngs, "--ref", tmp / "one"], r"has 1 image; statistics need at least 2"),
        ([tmp / "mixed", "--ref", setup["run"]], r"images of different sizes.*big.png is 16x17x3"),
        ([pngs, "--ref", setup["run"], "--metric", "fd_dinov2", "--dinov2", tmp / "other.pth"],
         r"not a DINOv2 ViT/14 state dict"),
        ([pngs, "--ref", setup["run"], "--inception", weights], r"does not fit pytorch-fid's InceptionV3"),
        ([pngs, "--ref", tmp / "small.pkl", "--dinov2", weights], r"of 10 features, DINOv2 .* gives 64"),
        ([pngs, "--ref", setup["run"], "--metric", "fid,is"], r"unknown metric is"),
        ([pngs], r"give --ref REF"),
        ([pngs, "--ref", setup["run"], "--metric", "fid,fd_dinov2", "--save-stats", tmp / "x.npz"],
         r"an .npz holds one metric's statistics"),
        ([pngs, "--ref", tmp / "absent.npz"], r"no reference at"),
        ([pngs, "--ref", setup["run"], "--inception", tmp / "absent.pth"], r"no Inception weights file"),
    ]
    for i, (args, pattern) in enumerate(cases):
        rc, out, err = run_fid(capsys, *args)
        assert rc == 2 and out == "" and len(err) == 1, (i, rc, err)
        assert err[0].startswith("jdiffsample fid: error: ") and re.search(pattern, err[0]), (i, err)


def test_eval_reports_fd_dinov2_of_a_real_model(setup, tmp_path):
    """``jdiffsample eval --metric fd_dinov2`` on a converted network that is not the digits model: its
    column is the textbook FD of each cell's images (kept with --save-samples) against the PNG folder."""
    import csv

    from jdiffsample import pipeline

    folder = fixture_dir("edm_ddpmpp_vp_tiny")
    model = tmp_path / "edm"
    assert cli.main(["convert", "edm", str(folder / "state_dict.pt"), str(model), "--kwargs",
                     str(folder / "config.json")]) == 0
    out, cells = tmp_path / "eval", tmp_path / "cells"
    assert cli.main(["eval", "--model", str(model), "--metric", "fd_dinov2", "--dinov2", str(setup["weights"]),
                     "--ref", str(setup["tmp"] / "pngs"), "--solvers", "ddim", "--nfe", "2,3", "--grids", "logsnr",
                     "--skip", "", "--samples", "6", "--batch", "6", "--micro-batch", "6", "--ref-steps", "2",
                     "--no-plot", "--out", str(out), "--save-samples", str(cells)]) == 0
    network = fid.load_dinov2(setup["weights"], batch_size=32)
    reference = setup["features"][0]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["nfe"] for r in rows] == ["2", "3"] and all(r["fd"] == "nan" for r in rows)
    for row in rows:
        images, labels = pipeline.load_samples(cells / f"ddim_nfe{row['nfe']}_logsnr")
        assert labels.tolist() == [0, 1, 2, 3, 4, 5]
        ours, theirs = fid.image_stats(images, {"fd_dinov2": network})["fd_dinov2"], (
            reference.mean(0), np.cov(reference, rowvar=False))
        assert float(row["fd_dinov2"]) == pytest.approx(fid.frechet(ours, theirs), rel=1e-6)
        assert float(row["fd_dinov2"]) == pytest.approx(textbook_fd(network(images), reference), rel=1e-3)
    assert "FD_DINOv2" in (out / "results.md").read_text()
    assert cli.main(["eval", "--model", str(model), "--out", str(tmp_path / "x")]) == 2  # no digits metrics here

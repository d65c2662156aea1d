"""FID's InceptionV3 against pytorch-fid's own network, with random weights.

pytorch-fid builds its FID Inception from torchvision's ``inception_v3`` and its own patched
blocks. torchvision's compiled operators do not load with the CPU build of torch used here, but
the network needs none of them: the package is imported without running its ``__init__``.
The random weights are saved with ``torch.save`` in the layout of pytorch-fid's weights file
and read back by :func:`jdiffsample.fid.load_inception` (no torch).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
from conftest import require

from jdiffsample import fid, metrics

torch = require("torch")


def _pytorch_fid_inception():
    """pytorch_fid.inception (torchvision's Python modules only: see conftest)."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.fail("torchvision is not installed (a test dependency: pip install -e '.[test]')")
    import pytorch_fid.inception as pfi

    return pfi


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """(pytorch-fid's InceptionV3 with random weights, our Inception loaded from its .pth)."""
    pfi = _pytorch_fid_inception()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"

    def random_weights(url, progress=True):  # stands in for the download of the real file
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        for name, block, arg in (("Mixed_5b", pfi.FIDInceptionA, (192, 32)),
                                 ("Mixed_5c", pfi.FIDInceptionA, (256, 64)),
                                 ("Mixed_5d", pfi.FIDInceptionA, (288, 64)),
                                 ("Mixed_6b", pfi.FIDInceptionC, (768, 128)),
                                 ("Mixed_6c", pfi.FIDInceptionC, (768, 160)),
                                 ("Mixed_6d", pfi.FIDInceptionC, (768, 160)),
                                 ("Mixed_6e", pfi.FIDInceptionC, (768, 192)),
                                 ("Mixed_7b", pfi.FIDInceptionE_1, (1280,)),
                                 ("Mixed_7c", pfi.FIDInceptionE_2, (2048,))):
            setattr(net, name, block(*arg))
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight)
                elif isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
                    m.momentum = None  # cumulative: running stats = those of the batches below
            # calibrate the batch-norm statistics so activations stay O(1) through 90 layers
            net.train()
            for _ in range(2):
                x = torch.rand(6, 3, 299, 299) * 2 - 1
                for block in [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
                              net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b,
                              net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                              net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c]:
                    x = block(x)
            net.eval()
        torch.save(net.state_dict(), path)
        return torch.load(path)

    pfi.load_state_dict_from_url = random_weights
    reference = pfi.InceptionV3([3]).eval()
    return reference, fid.load_inception(path, batch_size=4), path


def _reference_features(net, images01):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images01.transpose(0, 3, 1, 2))).float()
        return net(x)[0][:, :, 0, 0].double().numpy()


@pytest.mark.parametrize("size", [32, 333])  # upsampled, and downsampled without anti-aliasing
def test_features_match_pytorch_fid(networks, size):
    reference, ours, _ = networks
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    expected = _reference_features(reference, images / 255.0)
    got = ours(images)  # uint8 in: scaled by 1/255, as pytorch-fid's loader does
    assert got.shape == (3, 2048)
    scale = np.abs(expected).max()
    assert 1e-2 < scale < 1e4, scale  # the random network neither vanishes nor explodes
    err = np.abs(got - expected).max() / scale
    assert err < 2e-4, err
    # [-1, 1] floats are the same images
    np.testing.assert_allclose(ours(images / 127.5 - 1.0), got, rtol=0, atol=1e-4 * scale)


def test_grey_images_and_fid(networks):
    """Grey images are repeated to RGB; FID from our features equals the Frechet formula (SciPy's
    matrix square root) on pytorch-fid's features of the same images."""
    import scipy.linalg

    reference, ours, _ = networks
    rng = np.random.default_rng(7)
    grey = rng.uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
    rgb01 = np.repeat((grey + 1) / 2, 3, axis=-1)
    other = rng.uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32) * 0.5
    feats = [_reference_features(reference, x) for x in (rgb01, np.repeat((other + 1) / 2, 3, axis=-1))]
    np.testing.assert_allclose(ours(grey), feats[0], rtol=0, atol=2e-4 * np.abs(feats[0]).max())

    # project to 8 dimensions so that 10 samples give full-rank covariances (a well-posed sqrtm)
    proj = np.linalg.qr(rng.normal(size=(2048, 8)))[0]
    (m1, m2), (c1, c2) = [(f @ proj).mean(0) for f in feats], [np.cov(f @ proj, rowvar=False) for f in feats]
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    got = fid.fid(grey, lambda x, batch_size=0: ours(x) @ proj, other)
    assert got == pytest.approx(expected, rel=1e-3)


def test_bad_weight_files(networks, tmp_path):
    _, _, path = networks
    sd = torch.load(path)
    del sd["Mixed_6a.branch3x3.conv.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"not fit pytorch-fid's InceptionV3.*missing keys \(1: Mixed_6a.branch3x3.conv.weight\)"):
        fid.load_inception(tmp_path / "missing.pth")
    sd = torch.load(path)
    sd["Mixed_5b.branch1x1.bn.weight"] = torch.zeros(65)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \(1: Mixed_5b.branch1x1.bn.weight \(65,\) != \(64,\)\)"):
        fid.load_inception(tmp_path / "shape.pth")
    with pytest.raises(FileNotFoundError, match="no Inception weights file"):
        fid.load_inception(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        fid.load_inception(path)(np.zeros((2, 8, 8, 2), np.float32))


def test_frechet_distance_of_gaussians_through_fid(tmp_path):
    """fid.fid with stats files: the Frechet distance of two Gaussians' sample statistics
    approaches the closed form (identity features)."""
    rng = np.random.default_rng(3)
    d, n = 6, 200_000
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    x1 = m1 + np.sqrt(a) * rng.normal(size=(n, d))
    x2 = m2 + np.sqrt(b) * rng.normal(size=(n, d))
    fid.save_stats(tmp_path / "ref.npz", *metrics.feature_stats(x2))
    got = fid.fid(x1, lambda x, batch_size=0: x, tmp_path / "ref.npz")
    assert got == pytest.approx(expected, rel=0.02)


def test_eval_reports_fid(networks, tmp_path):
    """``jdiffsample eval --inception``: an FID column and table, against given statistics."""
    import csv

    from sklearn.datasets import load_digits

    from jdiffsample import cli

    _, ours, path = networks
    real = load_digits().images[:12, :, :, None] / 8.0 - 1.0  # as many as the samples
    fid.save_stats(tmp_path / "ref.npz", *fid.compute_stats(real, ours))
    out = tmp_path / "eval"
    argv = ["eval", "--solvers", "ddim", "--nfe", "4", "--grids", "logsnr", "--skip", "",
            "--samples", "12", "--batch", "12", "--ref-steps", "3", "--out", str(out), "--no-plot",
            "--inception", str(path), "--ref", str(tmp_path / "ref.npz"), "--save-samples", str(tmp_path / "s")]
    assert cli.main(argv) == 0
    (row,) = list(csv.DictReader(open(out / "results.csv")))
    # the column is the FID of the cell's images against the given statistics, recomputed here
    from jdiffsample import pipeline

    images, _ = pipeline.load_samples(tmp_path / "s" / "ddim_nfe4_logsnr")
    expected = fid.fid((images.astype(np.float32) - 127.5) / 127.5, ours, fid.load_stats(tmp_path / "ref.npz"))
    assert float(row["fid"]) > 0 and float(row["fid"]) == pytest.approx(expected, rel=1e-4)
    assert "FID, pytorch-fid's InceptionV3" in (out / "results.md").read_text()
    assert cli.main([*argv[:-4], "--ref", str(tmp_path / "absent.npz"), "--overwrite"]) == 2


def test_command_fid_equals_pytorch_fid(networks, tmp_path, capsys):
    """``jdiffsample fid`` on PNG folders with the Inception weights file: its statistics are those
    of pytorch-fid's pipeline (its PNG loader and network) on the same files, and its FID is the
    Frechet distance of those features. With n < 2048 images the trace term is exact and cheap from
    the features: tr sqrt(S1 S2) is the nuclear norm of A1 A2^T / (n - 1), A the centred features
    (pytorch-fid's sqrtm of 2048x2048 matrices would take longer than the rest of this test)."""
    import json

    from pytorch_fid import fid_score

    from jdiffsample import cli
    from jdiffsample.pipeline.images import write_png

    reference, _, path = networks
    rng = np.random.default_rng(11)
    folders = [tmp_path / "samples", tmp_path / "data"]
    for k, folder in enumerate(folders):
        folder.mkdir()
        images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) // (1 + 2 * k)  # the data darker
        for i, image in enumerate(images):
            write_png(folder / f"{i:03d}.png", image)
    feats = [fid_score.get_activations(sorted(f.glob("*.png")), reference, 4, 2048, "cpu", num_workers=0)
             for f in folders]
    (a1, a2), (m1, m2) = [f - f.mean(0) for f in feats], [f.mean(0) for f in feats]
    n = len(a1)
    expected = (np.sum((m1 - m2) ** 2) + (np.sum(a1 ** 2) + np.sum(a2 ** 2)) / (n - 1)
                - 2 * np.linalg.svd(a1 @ a2.T / (n - 1), compute_uv=False).sum())
    assert cli.main(["fid", str(folders[0]), "--ref", str(folders[1]), "--inception", str(path), "--batch", "4",
                     "--json", "--save-stats", str(tmp_path / "samples.npz")]) == 0
    got = json.loads(capsys.readouterr().out)
    with np.load(tmp_path / "samples.npz") as saved:
        for ours, theirs in zip((saved["mu"], saved["sigma"]), (m1, np.cov(feats[0], rowvar=False))):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-4 * np.abs(theirs).max())
    assert got["num_images"] == 4 and expected > 1
    assert got["fid"] == pytest.approx(expected, rel=1e-3)

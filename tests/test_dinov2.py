"""FD_DINOv2's feature network: PyTorch's bicubic resize and the DINOv2 ViT/14 port.

* The resize's weight matrices equal what ``torch.nn.functional.interpolate(mode='bicubic')``
  computes in float64 (a delta image per input pixel gives one column), with and without
  antialiasing, shrinking and enlarging, square and not, given sizes or a scale factor; the JAX
  application equals torch's float64 output on images to ~1e-7.
* The features of the golden fixture ``dinov2_tiny`` (facebookresearch/dinov2's
  ``DinoVisionTransformer``, the state dict saved like the released ``.pth``) equal those of EDM2's
  ``DINOv2Detector`` recorded in the fixture (images enlarged to 224 px) and in
  ``tests/data/dinov2_tiny_downsample.npz`` (images shrunk to 224 px, square and not; recorded by
  ``tests/data/record_dinov2.py`` with the original code) to 1e-5 relative.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, fixture_dir, require

from jdiffsample import fid, resize
from jdiffsample.nets import dinov2
from jdiffsample.nets.formats import torchfile

torch = require("torch")

# (in, out): shrinking by 1.3x-4x, enlarging, odd sizes, one pixel, unchanged
SIZES = [(300, 224), (512, 224), (897, 224), (32, 224), (7, 5), (5, 11), (1, 3), (224, 224), (37, 16)]


def _torch_matrix(n_in: int, n_out: int, antialias: bool, scale_factor: float | None = None) -> np.ndarray:
    """``[n_out, n_in]``: torch's float64 resize of each delta image along one axis."""
    eye = torch.eye(n_in, dtype=torch.float64)[None, None]  # [1, 1, n_in (resized), n_in (deltas)]
    if scale_factor is None:
        out = torch.nn.functional.interpolate(eye, size=(n_out, n_in), mode="bicubic", antialias=antialias)
    else:
        out = torch.nn.functional.interpolate(eye, scale_factor=(scale_factor, 1.0), mode="bicubic",
                                              antialias=antialias)
    return out[0, 0].numpy()


@pytest.mark.parametrize("antialias", [True, False])
def test_resize_weights_equal_torch(antialias):
    for n_in, n_out in SIZES:
        np.testing.assert_allclose(resize.bicubic_weights(n_in, n_out, antialias),
                                   _torch_matrix(n_in, n_out, antialias), rtol=0, atol=1e-12,
                                   err_msg=f"{n_in} -> {n_out}")
    # a scale factor, as DINOv2 passes for its positional embeddings: (g + 0.1) / 37
    for grid in (16, 9, 40, 37):
        factor = (grid + 0.1) / 37
        n_out = resize.scaled_size(37, factor)
        assert n_out == _torch_matrix(37, 1, antialias, factor).shape[0] == grid
        np.testing.assert_allclose(resize.bicubic_weights(37, n_out, antialias, scale=1 / factor),
                                   _torch_matrix(37, n_out, antialias, factor), rtol=0, atol=1e-12)
    # the two kernels differ (a = -0.5 vs -0.75, and the widened support when shrinking)
    assert np.abs(resize.bicubic_weights(300, 224, True) - resize.bicubic_weights(300, 224, False)).max() > 1e-3


@pytest.mark.parametrize("shape, size", [((2, 300, 200, 3), (224, 224)), ((1, 48, 64, 2), (224, 100)),
                                         ((1, 517, 229, 1), (224, 224))])
def test_resize_images_equal_torch(shape, size):
    images = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64))
    for antialias in (True, False):
        expected = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=antialias)
        got = np.asarray(resize.resize_bicubic(images, size, antialias))
        err = np.abs(got - expected.numpy().transpose(0, 2, 3, 1)).max() / 255
        assert err < 1e-6, (antialias, err)


@pytest.fixture(scope="module")
def tiny():
    folder = fixture_dir("dinov2_tiny")
    heads = json.loads((folder / "config.json").read_text())["kwargs"]["num_heads"]
    return folder, fid.load_dinov2(folder / "dinov2_tiny_pretrain.pth", batch_size=8, num_heads=heads)


def _relative(got, expected) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_features_equal_edm2_detector(tiny):
    folder, network = tiny
    io = np.load(folder / "io.npz")
    recorded = np.load(ROOT / "tests" / "data" / "dinov2_tiny_downsample.npz")
    cases = [(io[f"images{i}"], io[f"features{i}"]) for i in (0, 1)]  # 32 and 64 px: enlarged
    cases += [(recorded[f"images_{k}"], recorded[f"features_{k}"]) for k in "abc"]  # 256, 300x200, 448x336
    for images, expected in cases:
        got = network(images)
        assert got.shape == expected.shape and got.dtype == np.float64
        assert _relative(got, expected) < 1e-5, (images.shape, _relative(got, expected))
    # floats in [-1, 1] are the same images
    images, expected = cases[0]
    assert _relative(network(images / 127.5 - 1.0), expected) < 1e-5


def test_positional_embeddings_follow_the_scale_factor(tiny):
    """The original interpolates with scale factors (g + 0.1) / 37, not to the size g: the sampling
    positions differ, and torch's interpolate with those factors is what the port computes."""
    folder, _ = tiny
    table = torchfile.load_state_dict(folder / "dinov2_tiny_pretrain.pth")["pos_embed"]
    patch = torch.from_numpy(np.array(table[:, 1:])).reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    factor = 16.1 / 37
    expected = torch.nn.functional.interpolate(patch, scale_factor=(factor, factor), mode="bicubic")
    got = np.asarray(dinov2.interpolate_pos_embed(table, 16, 16))
    np.testing.assert_allclose(got[:, 1:].reshape(16, 16, -1), expected[0].permute(1, 2, 0).numpy(),
                               rtol=0, atol=1e-5 * np.abs(table).max())
    np.testing.assert_array_equal(got[:, :1], table[:, :1])
    by_size = torch.nn.functional.interpolate(patch, size=(16, 16), mode="bicubic")
    assert np.abs(by_size.numpy() - expected.numpy()).max() > 1e-3


def test_shape_from_the_state_dict_and_bad_files(tiny, tmp_path):
    folder, _ = tiny
    sd = torchfile.load_state_dict(folder / "dinov2_tiny_pretrain.pth", copy=True)
    assert dinov2.config_from_state_dict(sd) == dict(embed_dim=64, depth=2, num_heads=1, pos_grid=37, mlp_ratio=4.0)
    # the released ViT-L/14's shapes give 1024 wide, 24 deep, 16 heads
    large = {"patch_embed.proj.weight": np.zeros((1024, 3, 14, 14)), "pos_embed": np.zeros((1, 1370, 1024)),
             "cls_token": np.zeros((1, 1, 1024)), "norm.weight": np.zeros(1024),
             "blocks.0.mlp.fc1.weight": np.zeros((4096, 1024)),
             **{f"blocks.{i}.norm1.weight": np.zeros(1024) for i in range(24)}}
    assert dinov2.config_from_state_dict(large) == dict(embed_dim=1024, depth=24, num_heads=16, pos_grid=37,
                                                        mlp_ratio=4.0)

    def saved(name, state):
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, tmp_path / name)
        return tmp_path / name

    with pytest.raises(ValueError, match=r"does not fit DINOv2.*missing keys \(1: blocks.1.ls2.gamma\)"):
        fid.load_dinov2(saved("missing.pth", {k: v for k, v in sd.items() if k != "blocks.1.ls2.gamma"}))
    with pytest.raises(ValueError, match="register tokens"):
        fid.load_dinov2(saved("reg.pth", {**sd, "register_tokens": np.zeros((1, 4, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"not a DINOv2 ViT/14 state dict.*no patch_embed.proj.weight"):
        fid.load_dinov2(saved("other.pth", {"conv.weight": np.zeros((8, 3, 3, 3), np.float32)}))
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        fid.load_dinov2(tmp_path / "absent.pth")

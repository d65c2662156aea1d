"""Record EDM2's FD_DINOv2 features of the tiny DINOv2 fixture on images that are downsampled.

The golden fixture ``dinov2_tiny`` holds features of 32 and 64 px images (both enlarged to 224 px);
this adds images larger than 224 px (shrunk, where the antialiased kernel widens) and non-square
ones. The original code is imported from checkouts given on the command line (nothing of it is in
this file): facebookresearch/dinov2 builds the network from the fixture's ``config.json`` and state
dict, and NVlabs/edm2's ``calculate_metrics.DINOv2Detector.__call__`` (its default 'torch' resize
mode) computes the features; only the detector's constructor, which downloads the released
network through torch.hub, is bypassed by setting its attributes.

    python tests/data/record_dinov2.py --dinov2-src /path/to/dinov2 --edm2-src /path/to/edm2 \\
        --fixture ../shared/fixtures/dinov2_tiny --out tests/data/dinov2_tiny_downsample.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SIZES = {"a": (256, 256), "b": (300, 200), "c": (448, 336)}  # (height, width); 2 images each


def make_images(height: int, width: int, seed: int, count: int = 2, block: int = 4) -> np.ndarray:
    """Colour waves with sharp-edged boxes, drawn on a grid ``block`` times coarser and enlarged
    (nearest), so that the file stays small."""
    rng = np.random.default_rng(seed)
    height, width = height // block, width // block
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.zeros((count, height, width, 3))
    for n in range(count):
        for c in range(3):
            fy, fx, phase = rng.uniform(1, 12), rng.uniform(1, 12), rng.uniform(0, 6.3)
            out[n, :, :, c] = 127.5 + 100 * np.sin(2 * np.pi * (fy * y + fx * x) + phase)
        for _ in range(4):
            y0, x0 = rng.integers(0, height - 2), rng.integers(0, width - 2)
            out[n, y0:y0 + rng.integers(1, height // 3), x0:x0 + rng.integers(1, width // 3)] = rng.integers(0, 256, 3)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out.repeat(block, axis=1).repeat(block, axis=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dinov2-src", required=True, help="a checkout of facebookresearch/dinov2")
    parser.add_argument("--edm2-src", required=True, help="a checkout of NVlabs/edm2")
    parser.add_argument("--fixture", required=True, help="the golden fixture folder dinov2_tiny")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path[:0] = [args.dinov2_src, args.edm2_src]
    import torch
    import calculate_metrics  # NVlabs/edm2
    from dinov2.models.vision_transformer import DinoVisionTransformer  # facebookresearch/dinov2

    fixture = Path(args.fixture)
    config = json.loads((fixture / "config.json").read_text())
    model = DinoVisionTransformer(**config["kwargs"])
    model.load_state_dict(torch.load(fixture / "dinov2_tiny_pretrain.pth", map_location="cpu"))
    detector = calculate_metrics.DINOv2Detector.__new__(calculate_metrics.DINOv2Detector)
    detector.feature_dim, detector.resize_mode = config["kwargs"]["embed_dim"], "torch"
    detector.model = model.eval().requires_grad_(False)

    def features(images):
        with torch.no_grad():
            return detector(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()

    io = np.load(fixture / "io.npz")
    for i in (0, 1):  # the recording reproduces the fixture's own
        err = np.abs(features(io[f"images{i}"]) - io[f"features{i}"]).max()
        assert err < 1e-5, f"features{i} differ from the fixture's by {err}"
    record = {}
    for k, (name, (h, w)) in enumerate(SIZES.items()):
        images = make_images(h, w, seed=k)
        record[f"images_{name}"], record[f"features_{name}"] = images, features(images)
    record["torch_version"] = np.array(torch.__version__)
    np.savez_compressed(args.out, **record)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in record.items()))


if __name__ == "__main__":
    main()

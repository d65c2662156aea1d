"""One 3x3 convolution, XLA:CPU against PyTorch (oneDNN), by batch size and thread count.

The network forwards of ``forward_vs_torch.py`` spend most of their time in 3x3 convolutions, so
this isolates them: ``lax.conv_general_dilated`` (NHWC, HWIO, 'SAME', float32), compiled by
jax.jit with XLA's default CPU backend (YNNPACK in jaxlib 0.10) and with convolutions given to
Eigen instead (``jdiffsample.xla_options.EIGEN_CONV``, what jdiffsample compiles with), against
``torch.nn.functional.conv2d`` on the same data in NCHW. The three alternate in one process on the
same pinned CPUs; medians of ``--repeats``. Each output is checked against PyTorch's. ::

    python benchmarks/conv_vs_torch.py [--batch 1,4,16] [--threads 2] [--repeats 15]
    taskset -c 0 python benchmarks/conv_vs_torch.py --threads 1

Shapes are the EDM DDPM++ CIFAR network's: 32x32 with 128 channels, 16x16 and 8x8 with 256.
``speed`` = PyTorch ms / XLA ms (>= 1: XLA as fast).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_vs_torch import _pin_threads  # noqa: E402

SHAPES = ((32, 128), (16, 256), (8, 256))  # (height = width, channels in = out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, help="CPUs for both libraries (default: all allowed)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    threads = _pin_threads(args.threads)  # before jax creates its CPU client
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from jdiffsample.xla_options import EIGEN_CONV
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    print(f"jax {jax.__version__}, torch {torch.__version__}; {threads} thread(s) each\n")
    print("| batch | size | channels | XLA default ms | XLA, Eigen conv ms | PyTorch ms | speed | speed, Eigen |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for batch in batches:
        for size, channels in SHAPES:
            x = rng.standard_normal((batch, size, size, channels), np.float32)
            w = (rng.standard_normal((3, 3, channels, channels)) / (3 * channels**0.5)).astype(np.float32)
            lowered = conv.lower(x, w)
            xj, wj = jax.device_put(x), jax.device_put(w)
            runs = {"default": lowered.compile(), "eigen": lowered.compile(compiler_options=EIGEN_CONV)}
            tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
            fns = {kind: (lambda c=c: c(xj, wj).block_until_ready()) for kind, c in runs.items()}
            fns["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, padding=1)
            with torch.inference_mode():
                ref = fns["torch"]().numpy().transpose(0, 2, 3, 1)
                for kind in runs:
                    err = float(np.abs(np.asarray(fns[kind]()) - ref).max() / np.abs(ref).max())
                    if err > 1e-5:
                        raise SystemExit(f"{kind} convolution disagrees with PyTorch: {err:.1e}")
                for fn in fns.values():
                    fn()
                times = {kind: [] for kind in fns}
                for _ in range(args.repeats):
                    for kind, fn in fns.items():
                        start = time.perf_counter()
                        fn()
                        times[kind].append(time.perf_counter() - start)
            ms = {kind: 1e3 * statistics.median(t) for kind, t in times.items()}
            print(f"| {batch} | {size} | {channels} | {ms['default']:.2f} | {ms['eigen']:.2f} | {ms['torch']:.2f} "
                  f"| {ms['torch'] / ms['default']:.2f} | {ms['torch'] / ms['eigen']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

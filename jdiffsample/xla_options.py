"""XLA compile options for programs that run the networks: on the CPU, convolutions from Eigen.

jaxlib 0.10's XLA:CPU hands float32 convolutions to YNNPACK. Measured against PyTorch's oneDNN on
the project's 2-core machine (``benchmarks/conv_vs_torch.py``), YNNPACK's 3x3 convolutions ran at
0.80-0.97x oneDNN's speed on one thread and 0.49-0.70x on two, XLA's Eigen convolutions at
0.97-1.26x and 0.52-0.94x; the convolutional networks' forwards gain 7-28%
(``benchmarks/forward_vs_torch.py``, docs/performance.md). The option
that chooses Eigen is an experimental XLA option, so it is used only on the CPU backend and only
where this jaxlib accepts it (checked once per process by compiling a one-operation program);
``JDIFFSAMPLE_EIGEN_CONV=0`` turns it off. It changes which library computes a convolution, not
the operations: results differ from YNNPACK's by float32 rounding.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

__all__ = ["EIGEN_CONV", "compile_options", "accepted"]

#: YNNPACK keeps matmuls and reductions (its other defaults in jaxlib 0.10); convolutions go to Eigen.
EIGEN_CONV = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def accepted(options: dict) -> bool:
    """Whether XLA:CPU compiles a program with ``options`` (unknown options are errors); checked
    once per process and set of options."""
    return _accepted(tuple(sorted((k, v) for k, v in options.items())))


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple) -> bool:
    zero = jax.device_put(np.float32(0), jax.local_devices(backend="cpu")[0])
    try:
        jax.jit(lambda a: a + 1.0).lower(zero).compile(compiler_options=dict(options))
    except jax.errors.JaxRuntimeError:
        return False
    return True


def compile_options(devices=None) -> dict:
    """Compile options for a program running a network on ``devices`` (default: the default
    backend's): :data:`EIGEN_CONV` on the CPU where XLA accepts it, else none."""
    if os.environ.get("JDIFFSAMPLE_EIGEN_CONV", "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    platforms = {d.platform for d in devices} if devices is not None else {jax.default_backend()}
    if platforms != {"cpu"} or not accepted(EIGEN_CONV):
        return {}
    return dict(EIGEN_CONV)

"""Peak memory of converting a real-sized checkpoint, against the checkpoint's size.

Writes a random state dict of a released architecture with ``torch.save`` (DiT-XL/2, 675M
parameters, float32 as released; EDM2-XXL, 1.5B parameters, float16 as released), then runs
``jdiffsample convert`` on it in a fresh process and reads that process's peak resident memory
(``ru_maxrss``)::

    python benchmarks/convert_memory.py --family dit --workdir /tmp/convert-memory
    python benchmarks/convert_memory.py --family edm2 --workdir /tmp/convert-memory

Needs torch (to write the file) and about 3x the checkpoint size of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CASES = {
    "dit": dict(arch="DiT-XL/2", dtype="float32"),
    "edm2": dict(preset="edm2-img512-xxl", dtype="float16"),
}


def state_dict_shapes(family: str) -> dict:
    """PyTorch name -> shape of every tensor the family's converter expects."""
    import jax
    from flax import traverse_util

    if family == "dit":
        from jdiffsample.nets import dit

        module = dit.build("DiT", dit.arch_kwargs("DiT-XL/2"))
        layout = dit.LAYOUT
        inputs = dit.example_inputs(module)
    else:
        from jdiffsample.nets import edm2
        from jdiffsample.nets.formats import statedict

        module = edm2.build("Precond", edm2.PRESETS["edm2-img512-xxl"])
        layout = statedict.DEFAULT
        inputs = edm2.example_inputs(module)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return {layout.key(p): tuple(layout.shape(p, leaf.shape))
            for p, leaf in traverse_util.flatten_dict(abstract["params"]).items()}


def write_checkpoint(family: str, path: Path) -> int:
    import torch

    dtype = getattr(torch, CASES[family]["dtype"])
    rng = np.random.default_rng(0)
    sd = {k: torch.from_numpy(rng.standard_normal(s, dtype=np.float32)).to(dtype)
          for k, s in state_dict_shapes(family).items()}
    torch.save(sd, path)
    return sum(v.numel() for v in sd.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(CASES), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src, dst = args.workdir / f"{args.family}.pt", args.workdir / f"{args.family}-converted"
    if not src.exists():
        params = write_checkpoint(args.family, src)
        print(f"wrote {src} ({params:,} parameters)", flush=True)
    case = CASES[args.family]
    option = ["--arch", case["arch"]] if "arch" in case else ["--preset", case["preset"]]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jdiffsample.cli", "convert", args.family, str(src), str(dst),
                           *option, "--overwrite"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    seconds = time.perf_counter() - start
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: kilobytes
    size = src.stat().st_size
    print(json.dumps(dict(family=args.family, checkpoint_bytes=size, dtype=case["dtype"], peak_rss_bytes=peak,
                          peak_over_checkpoint=round(peak / size, 2), seconds=round(seconds, 1),
                          converter=proc.stdout.strip())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

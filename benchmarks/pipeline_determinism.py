"""Do the pipeline's images depend on the batch size? And what does a fixed micro-batch cost?

For one network and sampler setting, runs :class:`jdiffsample.pipeline.Runner` over the same
sample indices with several ``batch:micro_batch`` configurations on one device and reports, for
each, the pixels that differ from the first configuration and from the first one with the same
micro-batch, and the images/s (compile excluded,
best of ``--repeats``). Configurations with ``micro_batch == batch`` behave like a pipeline
without micro-batching (the network sees the whole batch), so comparing them shows whether the
device's kernels round differently per batch size; equal ``micro_batch`` values must agree bit
for bit whatever the batch.

    python benchmarks/pipeline_determinism.py --random-cifar            # on a GPU (55.7M params)
    python benchmarks/pipeline_determinism.py --model DIR --num 64 --configs 16:16,64:64,16:8,64:8

``--random-cifar``: EDM's CIFAR-10 DDPM++ architecture with random weights (every layer random,
none zero-initialised), unconditional, saved to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def random_network(path: Path, small: bool) -> Path:
    """Save an EDMPrecond DDPM++ with random weights at ``path``."""
    import jax.numpy as jnp

    from edm_sampling_throughput import network_kwargs
    from jdiffsample import nets
    from jdiffsample.nets import edm

    kwargs = dict(network_kwargs(small), dropout=0.0)
    module = edm.build("EDMPrecond", kwargs)
    res = kwargs["img_resolution"]
    variables = nets.random_variables(module, jnp.zeros((1, res, res, 3)), jnp.ones((1,)))
    nets.save(path, "edm", "EDMPrecond", kwargs, variables)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a checkpoint folder or bundled model name")
    source.add_argument("--random-cifar", action="store_true", help="EDM's CIFAR DDPM++, random weights")
    source.add_argument("--random-small", action="store_true", help="a tiny random DDPM++ (CPU smoke run)")
    parser.add_argument("--solver", default="unipc")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--num", type=int, default=512, help="samples per configuration")
    parser.add_argument("--configs", default="256:256,128:128,64:64,256:64,128:64,64:32,256:32,256:128",
                        help="comma-separated batch:micro_batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    import jax

    from jdiffsample import pipeline

    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(random_network(Path(tmp) / "net", small=args.random_small))
        info = dict(device=str(jax.devices()[0]), jax=jax.__version__, solver=args.solver,
                    nfe=args.nfe, num=args.num, model=args.model or ("random DDPM++ " + (
                        "small" if args.random_small else "CIFAR")))
        print(json.dumps(info), flush=True)
        results, first, same_micro = [], None, {}
        for batch, micro in configs:
            plan = pipeline.plan(model, pipeline.Settings.create(solver=args.solver, nfe=args.nfe, micro_batch=micro),
                                 num=args.num)
            sampler = pipeline.Runner(plan, batch=batch, devices=jax.devices()[:1], num=args.num)
            compile_s = sampler.compile()
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                images, _ = sampler(np.arange(args.num))
                best = min(best, time.perf_counter() - start)
            first = images if first is None else first
            same = same_micro.setdefault(micro, images)  # the first run with this micro-batch
            diff = np.abs(images.astype(np.int16) - first)
            row = dict(batch=sampler.batch, micro_batch=micro, compile_s=round(compile_s, 1),
                       images_per_s=round(args.num / best, 1), pixels=int(diff.size),
                       differ_from_first=int((diff > 0).sum()), max_diff_from_first=int(diff.max()),
                       differ_from_same_micro=int((images != same).sum()))
            results.append(row)
            print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(dict(info, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

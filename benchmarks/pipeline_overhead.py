"""Throughput of ``pipeline.generate`` against a bare jitted solver call, and over 1 vs N devices.

For a converted network (default: the ``edm_ddpmpp_vp_tiny`` fixture, converted into a temporary
folder) and one sampler setting (UniPC, NFE 10, logSNR grid, random class labels, batch 64), each
device count runs in its own process (``--xla_force_host_platform_device_count`` must be set before
JAX starts) and measures, alternating ``--repeats`` times:

* ``bare``: ``jax.jit`` of the solver on the network's denoiser, called on a fixed batch of
  starting noise, labels and per-sample keys, ``block_until_ready`` each call (compile excluded);
* ``pipeline``: the part of ``pipeline.generate`` that it times itself after compiling
  (``pipeline.write_run``): ``--batches`` full batches streamed into a fresh folder, with key
  derivation, label draws, uint8 conversion, device-to-host copies, verified atomic ``.npz``
  writes and the manifest. The runner is compiled once per process (its compile time is reported).

Overhead = bare images/s / pipeline images/s - 1 (medians), on the same devices, by wall time and
by process CPU time (steadier on a shared machine: it counts the work, not the waiting).

    python benchmarks/pipeline_overhead.py [--devices 1 2] [--batch 64] [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "edm_ddpmpp_vp_tiny"
SOLVER, NFE = "unipc", 10


def measure(model: str, batch: int, batches: int, repeats: int, workdir: Path) -> dict:
    """Run in a process whose device count is already fixed; returns the timings."""
    import jax
    import jax.numpy as jnp

    from jdiffsample import nets, pipeline, solvers

    # one micro-batch per device: the network sees the same per-device shape as the bare call
    num = batches * batch
    plan = pipeline.plan(model, pipeline.Settings.create(solver=SOLVER, nfe=NFE,
                                                         micro_batch=batch // jax.local_device_count()), num=num)
    sampler = pipeline.Runner(plan, batch=batch, num=num)
    compile_seconds = sampler.compile()
    stage = plan.stages[0]
    net = nets.load_model(model)
    schedule = net.schedule
    variables = net.variables
    keys = jax.random.split(jax.random.key(0), batch)
    x = jax.random.normal(jax.random.key(1), (batch, *sampler.image_shape))
    x = x * float(schedule.sigma(stage.ts[0]))
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, stage.n_classes)
    ts = jnp.asarray(stage.ts, jnp.float32)

    @jax.jit
    def bare(variables, x, labels, keys):
        denoise = net.with_variables(variables).denoiser(labels)
        return solvers.SOLVERS[SOLVER](denoise, x, ts, schedule, key=keys)

    if len(sampler.devices) > 1:  # the same data-parallel layout as the pipeline
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((len(sampler.devices),), ("batch",), devices=sampler.devices,
                             axis_types=(jax.sharding.AxisType.Auto,))  # compiler-propagated sharding
        x, labels, keys = (jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in (x, labels, keys))
        variables = jax.device_put(variables, NamedSharding(mesh, P()))

    def run_bare():
        for _ in range(batches):
            bare(variables, x, labels, keys).block_until_ready()

    def run_pipeline(folder):
        # exactly what generate() times after compiling: batches streamed into atomic shard files
        pipeline.write_run(sampler, folder, num=num, shard_size=batch, preview=False, log=None)

    run_bare()  # compile and warm up both
    run_pipeline(workdir / "warmup")
    out = dict(devices=len(sampler.devices), compile=compile_seconds, bare=[], pipeline=[],
               bare_cpu=[], pipeline_cpu=[])
    for r in range(repeats):
        for name, fn in (("bare", run_bare), ("pipeline", lambda: run_pipeline(workdir / f"run{r}"))):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            out[name].append(batches * batch / (time.perf_counter() - wall))
            out[name + "_cpu"].append(batches * batch / (time.process_time() - cpu))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="converted checkpoint (default: convert the edm_ddpmpp_vp_tiny fixture)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="forced host device counts")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: measure here
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.worker is not None:
            print(json.dumps(measure(args.model, args.batch, args.batches, args.repeats, tmp)))
            return
        model = args.model
        if model is None:
            from jdiffsample import nets

            model = str(tmp / "model")
            nets.convert("edm", FIXTURE / "state_dict.pt", model, kwargs=FIXTURE / "config.json")
        rows = []
        for n in args.devices:
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", str(n), "--model", model, "--batch", str(args.batch),
                 "--batches", str(args.batches), "--repeats", str(args.repeats)],
                env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(proc.stderr)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"{SOLVER}, NFE {NFE}, batch {args.batch}, {args.batches} batches x {args.repeats} repeats, "
          f"medians; images/s excludes compiling")
    print(f"{'devices':>7} {'bare img/s':>11} {'pipeline img/s':>15} {'overhead':>9} "
          f"{'overhead (CPU time)':>20} {'compile s':>10}")
    for row in rows:
        m = {k: statistics.median(v) for k, v in row.items() if isinstance(v, list)}
        print(f"{row['devices']:>7} {m['bare']:>11.1f} {m['pipeline']:>15.1f} "
              f"{100 * (m['bare'] / m['pipeline'] - 1):>8.1f}% "
              f"{100 * (m['bare_cpu'] / m['pipeline_cpu'] - 1):>19.1f}% {row['compile']:>10.1f}")


if __name__ == "__main__":
    main()

"""XLA compile seconds of a first and a second sampling call that differ in labels, Skip-Tuning scale
and seed, counted with ``jax.monitoring`` (the property ``tests/test_pipeline.py`` asserts)::

    python benchmarks/compile_once.py [--model digits] [--num 32] [--nfe 10]

Prints both figures for ``pipeline.generate`` (UniPC) and for ``jdiffsample.sample`` (SA-Solver,
which also takes a key) on the same model.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np

import jdiffsample
from jdiffsample import nets, pipeline, skip_tuning, timesteps

_seconds: list[float] = []
_counting = [False]
_registered: list[bool] = []


def _listen(event, duration, **kwargs):
    if _counting[0] and event.endswith("backend_compile_duration"):
        _seconds.append(duration)


def compile_seconds(fn) -> float:
    """XLA compile seconds spent while ``fn()`` runs."""
    if not _registered:
        jax.monitoring.register_event_duration_secs_listener(_listen)
        _registered.append(True)
    _seconds.clear()
    _counting[0] = True
    try:
        fn()
    finally:
        _counting[0] = False
    return sum(_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--num", type=int, default=32)
    parser.add_argument("--nfe", type=int, default=10)
    args = parser.parse_args()

    out = tempfile.mkdtemp()
    common = dict(num=args.num, solver="unipc", nfe=args.nfe, log=None)
    first = compile_seconds(lambda: pipeline.generate(args.model, f"{out}/a", seed=1, class_labels=[1, 2],
                                                      skip_tuning=0.9, **common))
    second = compile_seconds(lambda: pipeline.generate(args.model, f"{out}/b", seed=2, class_labels="random",
                                                       skip_tuning=0.7, **common))
    print(f"pipeline.generate: first call {first:.2f} s of compilation, second {second:.3f} s")

    model = nets.load_model(args.model)
    ts = timesteps.logsnr(model.schedule, args.nfe)
    classes = max(model.num_classes, 1)

    def run(offset, rho, seed):
        tuned = model.with_variables(skip_tuning.apply(model.variables, rho_bottom=rho))
        labels = (np.arange(8) + offset) % classes if model.num_classes else None
        x = jax.random.normal(jax.random.key(seed), (8, *model.sample_shape)) * ts[0]
        out = jdiffsample.sample(tuned.denoiser(labels), x, ts, model.schedule, "sa_solver", key=jax.random.key(seed))
        return np.asarray(out)

    first = compile_seconds(lambda: run(0, 0.9, 0))
    second = compile_seconds(lambda: run(3, 0.7, 1))
    print(f"jdiffsample.sample: first call {first:.2f} s of compilation, second {second:.3f} s")


if __name__ == "__main__":
    main()

"""Sampling at scale: many images from a network checkpoint, deterministic, resumable, sharded.

:func:`generate` (and ``jdiffsample sample``, which mirrors it) writes one output folder
(:mod:`~jdiffsample.pipeline.output`): ``manifest.json``, shards ``samples_XXXXXX.npz`` of uint8
NHWC images (``arr_0``, as ADM's evaluator reads them) and labels (``arr_1``), and ``grid.png``.
Pixel values follow EDM: ``clip(floor(127.5 x + 128), 0, 255)`` of the model's [-1, 1] output.

The rooms of this package:

* :mod:`~jdiffsample.pipeline.settings`: what a run is (checked before anything compiles);
* :mod:`~jdiffsample.pipeline.program`: :class:`Sampler`, the compiled per-device program
  (randomness per sample index, bit-exact micro-batches, no recompiles for new labels or seeds);
* :mod:`~jdiffsample.pipeline.output`: manifest, shards, atomic writes, resuming;
* :mod:`~jdiffsample.pipeline.images`: PNG, preview grid, exports;
* :mod:`~jdiffsample.pipeline.progress`: the progress bar.

**Devices and hosts.** Each process runs data-parallel over its local devices (a 1-D mesh over the
batch axis, variables replicated, ``jax.shard_map`` so no device talks to another) and owns the
shards ``s`` with ``s % process_count == process_index``; it writes only those and never waits
for another process's files. Call ``jax.distributed.initialize`` first on several hosts (the
CLI's ``--distributed``). The last batch is padded to the compiled size (one compile per run).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from jdiffsample.pipeline.images import export_npz, export_png, image_grid, write_png
from jdiffsample.pipeline.output import MANIFEST, PREVIEW, load_samples, read_manifest, shard_name
from jdiffsample.pipeline.program import Sampler
from jdiffsample.pipeline.settings import Settings, grid_names

__all__ = ["Sampler", "Settings", "Summary", "generate", "write_run", "load_samples", "read_manifest", "export_png",
           "export_npz", "write_png", "image_grid", "MANIFEST", "PREVIEW", "grid_names", "shard_name"]


@dataclasses.dataclass
class Summary:
    """What one :func:`generate` call did (in this process)."""

    out: str
    num: int                  # images in the whole run (all processes)
    generated: int            # images this call made
    skipped: int              # images of this process's shards found finished
    shards_written: int
    seconds: float            # wall time of this call
    sample_seconds: float     # generation after compiling
    compile_seconds: float    # 0 when nothing was left to do (or the program was compiled before)
    images_per_second: float  # generated / sample_seconds
    devices: int
    process_index: int
    process_count: int
    fingerprint: str


def generate(model, out, *, num: int, shard_size: int = 1000, process_index: int | None = None,
             process_count: int | None = None, preview: bool = True, log=sys.stderr, **sampler_options) -> Summary:
    """Generate ``num`` samples into the folder ``out`` (see the module docstring).

    ``model`` and ``sampler_options`` are those of :class:`Sampler` (solver, nfe, grid, options,
    skip_tuning, guidance, guide, guidance_interval, class_labels, seed, batch, micro_batch, devices,
    dtype), plus:
      num: number of samples, indices ``0 .. num - 1``.
      shard_size: samples per ``.npz`` file; part of the settings (the file layout).
      process_index, process_count: this process's part (default: ``jax.process_index()`` and
        ``jax.process_count()``); it makes the shards ``s`` with ``s % process_count == process_index``.
      preview: write ``grid.png`` (by the process that owns shard 0).
      log: stream for the progress bar and summary (``None``: silent).

    Returns a :class:`Summary`. Raises ``ValueError`` for bad arguments and ``FileExistsError``
    when ``out`` holds samples of other settings; nothing is written before every check passed.
    """
    from jdiffsample.pipeline.settings import check_positive_int

    num = check_positive_int("num", num)
    shard_size = check_positive_int("shard_size", shard_size)
    sampler = Sampler(model, **sampler_options)
    return write_run(sampler, out, num=num, shard_size=shard_size, process_index=process_index,
                     process_count=process_count, preview=preview, log=log)


def write_run(sampler: Sampler, out, *, num: int, shard_size: int = 1000, process_index: int | None = None,
              process_count: int | None = None, preview: bool = True, log=sys.stderr, on_batch=None) -> Summary:
    """:func:`generate` with a ready :class:`Sampler`. ``on_batch(indices, images, labels)`` sees
    every batch as it is collected (the eval suite scores them while they are written)."""
    import jax

    from jdiffsample.pipeline import images as img
    from jdiffsample.pipeline import output
    from jdiffsample.pipeline.progress import Progress, duration

    start = time.perf_counter()
    p_index = jax.process_index() if process_index is None else int(process_index)
    p_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p_index < p_count:
        raise ValueError(f"process_index must lie in [0, {p_count}), got {p_index}")
    if num > 2**31 - 2 * sampler.batch:
        raise ValueError(f"num must be at most 2**31 - 2 batch, got {num}")
    out = Path(out)
    record = dict(sampler.record, num=int(num), shard_size=int(shard_size))
    shards = output.plan(num, shard_size)
    manifest = output.new_manifest(record, str(sampler.model_path), shards)
    for name in ("guide_path", "vae_path", "classifier_path", "upsampler_path"):
        if getattr(sampler, name) is not None:
            manifest[name] = str(getattr(sampler, name))
    output.prepare(out, manifest, log)

    mine = shards[p_index::p_count]
    output.remove_stale(out, mine)
    todo = [s for s in mine if not (out / s["file"]).is_file()]
    skipped = sum(s["stop"] - s["start"] for s in mine if s not in todo)
    total = sum(s["stop"] - s["start"] for s in todo)
    prefix = f"sample [{p_index + 1}/{p_count}]: " if p_count > 1 else "sample: "
    compile_seconds, sample_seconds = 0.0, 0.0
    if total:
        compile_seconds = sampler.compile()
        if log:
            print(f"{prefix}compiled in {compile_seconds:.1f} s for batches of {sampler.batch} on "
                  f"{len(sampler.devices)} {jax.default_backend()} device(s)", file=log, flush=True)
            if jax.default_backend() == "gpu" and "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
                print(f"{prefix}note: XLA picks GPU kernels by timing, so reruns can differ in rare pixels; "
                      f"set XLA_FLAGS=--xla_gpu_deterministic_ops=true (the CLI's default) for bit-exact "
                      f"images", file=log, flush=True)
        t0 = time.perf_counter()
        _run(sampler, out, todo, Progress(total, log, prefix) if log else None, on_batch)
        sample_seconds = time.perf_counter() - t0
    if preview and p_index == 0 and sampler.output_dtype == np.uint8:
        img.write_preview(out, shards)
    summary = Summary(
        out=str(out), num=int(num), generated=total, skipped=skipped, shards_written=len(todo),
        seconds=time.perf_counter() - start, sample_seconds=sample_seconds, compile_seconds=compile_seconds,
        images_per_second=total / sample_seconds if sample_seconds else 0.0, devices=len(sampler.devices),
        process_index=p_index, process_count=p_count, fingerprint=manifest["fingerprint"],
    )
    if log:
        if not summary.generated:
            line = f"{prefix}nothing to do: {summary.skipped} images of this process already in {summary.out}"
        else:
            line = (f"{prefix}{summary.generated} images in {duration(summary.seconds)} "
                    f"({summary.images_per_second:.1f} img/s after a {summary.compile_seconds:.1f} s compile, once; "
                    f"{summary.skipped} found done) -> {summary.out}")
        print(line, file=log, flush=True)
    return summary


def _run(sampler: Sampler, out: Path, todo: list[dict], progress, on_batch) -> None:
    """Stream this process's pending indices through full batches; write each shard when whole.

    On accelerators batch k + 1 is dispatched before batch k is fetched, so the devices keep
    working while the host copies results and writes files. CPU devices would run the two
    batches at once on the same cores (slower), so there each batch is fetched first.
    """
    from jdiffsample.pipeline import output

    indices = np.concatenate([np.arange(s["start"], s["stop"]) for s in todo])
    owner = np.concatenate([np.full(s["stop"] - s["start"], k) for k, s in enumerate(todo)])
    buffers: dict[int, list] = {}  # position in todo -> [images, labels, filled]
    conditional = sampler.n_classes > 0

    def collect(lo, hi, result):
        images, labels = (np.asarray(a)[: hi - lo] for a in result)
        if on_batch is not None:
            on_batch(indices[lo:hi], images, labels if conditional else None)
        for k in np.unique(owner[lo:hi]):
            shard = todo[k]
            rows = np.nonzero(owner[lo:hi] == k)[0]
            pos = indices[lo:hi][rows] - shard["start"]
            n = shard["stop"] - shard["start"]
            buf = buffers.setdefault(k, [np.empty((n, *sampler.image_shape), sampler.output_dtype),
                                         np.empty(n, np.int32), 0])
            buf[0][pos], buf[1][pos] = images[rows], labels[rows]
            buf[2] += len(rows)
            if buf[2] == n:
                output.write_shard(out, shard, buf[0], buf[1] if conditional else None)
                del buffers[k]
        if progress:
            progress.update(hi - lo)

    ahead = 0 if sampler.devices[0].platform == "cpu" else 1
    pending = deque()
    for lo in range(0, len(indices), sampler.batch):
        hi = min(lo + sampler.batch, len(indices))
        pending.append((lo, hi, sampler.dispatch(indices[lo:hi])))
        if len(pending) > ahead:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())

"""A run: plan it, run it over this process's devices, and write its shards, resumably.

:func:`generate` (and ``jdiffsample sample``) writes one output folder
(:mod:`~jdiffsample.pipeline.output`): ``manifest.json``, verified shards ``samples_XXXXXX.npz`` of
uint8 NHWC images (``arr_0``, as ADM's evaluator reads them) and labels (``arr_1``), and ``grid.png``.
Pixel values follow EDM: ``clip(floor(127.5 x + 128), 0, 255)`` of the model's [-1, 1] output.

**Hosts.** Each process owns the shards ``s`` with ``s % process_count == process_index``, writes
only those and never waits for another process's files. Call ``jax.distributed.initialize`` first
on several hosts (the CLI's ``--distributed``). The last batch is padded to the compiled size.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import deque
from pathlib import Path

import jax
import numpy as np

from jdiffsample import grids
from jdiffsample.pipeline import images as img
from jdiffsample.pipeline import output
from jdiffsample.pipeline.plan import plan as make_plan
from jdiffsample.pipeline.progress import Progress, duration
from jdiffsample.pipeline.runner import Runner, check_mesh
from jdiffsample.pipeline.settings import Output, Settings

__all__ = ["Summary", "generate", "run", "write_run", "from_manifest"]


@dataclasses.dataclass
class Summary:
    """What one :func:`generate` call did (in this process)."""

    out: str
    num: int                  # images in the whole run (all processes)
    generated: int            # images this call made
    skipped: int              # images of this process's shards found finished (verified)
    rewritten: int            # shards found damaged and written again
    shards_written: int
    nonfinite: int            # samples whose final state held NaN or inf (their pixels are meaningless)
    seconds: float            # wall time of this call
    sample_seconds: float     # generation after compiling
    compile_seconds: float    # 0 when nothing was left to do (or the program was compiled before)
    images_per_second: float  # generated / sample_seconds
    devices: int
    process_index: int
    process_count: int
    fingerprint: str
    param_bytes_per_device: int
    param_bytes_total: int


STDERR = "stderr"  # the ``log`` default: sys.stderr as it is when the function runs


def _stream(log):
    return sys.stderr if log == STDERR else log


def generate(model, out, *, num: int = 50000, shard_size: int = 1000, batch: int | None = None,
             preview: bool = True, export=None, overwrite: bool = False, devices=None,
             process_index: int | None = None, process_count: int | None = None, log=STDERR,
             **settings) -> Summary:
    """Generate ``num`` samples of ``model`` into the folder ``out``.

    ``model``: a checkpoint folder (``jdiffsample convert``), a bundled model name or a loaded
    :class:`jdiffsample.nets.Model`. ``settings``: the fields of
    :class:`~jdiffsample.pipeline.settings.Settings` (solver, options, nfe, grid, seed, class_labels,
    guidance, ...: ``jdiffsample sample --help`` lists them all). ``shard_size``, ``batch``,
    ``preview``, ``export``, ``overwrite``: those of :class:`~jdiffsample.pipeline.settings.Output`.
    ``devices``: this process's devices to use (default: all); ``process_index``/``process_count``:
    this process's part (default: ``jax.process_index()``/``jax.process_count()``); ``log``: stream
    for the progress bar and summary (None: silent).

    Raises ``ValueError`` for bad arguments and ``FileExistsError`` when ``out`` holds samples of
    other settings; nothing is written before every check passed.
    """
    return run(model, Settings.create(**settings),
               Output(out=out, num=num, shard_size=shard_size, batch=batch, preview=preview, export=export,
                      overwrite=overwrite),
               devices=devices, process_index=process_index, process_count=process_count, log=log)


def _known_grid(out: Path, settings: Settings):
    """The grid an earlier run with these settings found on the model's trajectories, if any."""
    if not isinstance(settings.grid, str) or settings.grid not in grids.NEEDS_MODEL:
        return None
    try:
        old = output.read_manifest(out)["settings"]
    except (ValueError, KeyError):
        return None
    mine = {k: v for k, v in settings.to_json().items() if v not in (None, "default") or k not in _RESOLVED}
    if all(old.get(k) == v for k, v in mine.items() if k in old) and "grid_values" in old:
        return old["grid_values"]
    return None


#: settings whose manifest record holds the value the plan resolved (the default micro-batch, the
#: family's guidance channels)
_RESOLVED = ("micro_batch", "guidance_channels")


def _check_output(out: Path, o: Output, p_count: int) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if o.export is not None:
        if p_count > 1:
            raise ValueError("--export needs every host's shards: export after all hosts finish, by rerunning "
                             "the same command without --distributed")
        img.check_export(out, o.export, o.overwrite)


def run(model, settings: Settings, o: Output, *, devices=None, process_index: int | None = None,
        process_count: int | None = None, log=STDERR, on_batch=None, dry_run: bool = False):
    """:func:`generate` with its settings as values; ``on_batch(indices, images, labels)`` sees every
    batch as it is collected (the eval suite scores them while they are written). With ``dry_run``
    the plan is printed to ``log`` (or returned, when ``log`` is None) and nothing is run or written."""
    if o.out is None:
        raise ValueError("give the output folder (--out DIR)")
    log = _stream(log)
    start = time.perf_counter()
    p_index = jax.process_index() if process_index is None else int(process_index)
    p_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p_index < p_count:
        raise ValueError(f"process_index must lie in [0, {p_count}), got {p_index}")
    check_mesh(len(jax.local_devices() if devices is None else devices), settings.model_parallel)
    out = Path(o.out)
    _check_output(out, o, p_count)
    the_plan = make_plan(model, settings, num=o.num, known_grid=_known_grid(out, settings))
    if dry_run:
        if log is None:
            return the_plan
        print(the_plan.describe(), file=log, flush=True)
        return the_plan
    runner = Runner(the_plan, devices=devices, batch=o.batch, num=o.num)
    if o.num > 2**31 - 2 * runner.batch:
        raise ValueError(f"num must be at most 2**31 - 2 batch, got {o.num}")
    summary = write_run(runner, out, num=o.num, shard_size=o.shard_size, process_index=p_index,
                        process_count=p_count, preview=o.preview, log=log, on_batch=on_batch, started=start)
    if o.export is not None:
        if str(o.export).endswith(".npz"):
            path = img.export_npz(out, o.export, overwrite=o.overwrite)
            message = f"exported {o.num} samples to {path}"
        else:
            count = img.export_png(out, o.export, overwrite=o.overwrite)
            message = f"exported {count} PNG files to {o.export}"
        if log:
            print(f"sample: {message}", file=log, flush=True)
    return summary


def write_run(runner: Runner, out, *, num: int, shard_size: int = 1000, process_index: int | None = None,
              process_count: int | None = None, preview: bool = True, log=STDERR, on_batch=None,
              started: float | None = None) -> Summary:
    """Write ``num`` samples of ``runner``'s plan into ``out``: create or check the manifest, verify the
    shards found there (a damaged one is reported by name and written again), generate the rest."""
    start = time.perf_counter() if started is None else started
    log = _stream(log)
    p_index = jax.process_index() if process_index is None else int(process_index)
    p_count = jax.process_count() if process_count is None else int(process_count)
    out = Path(out)
    record = dict(runner.plan.record, num=int(num), shard_size=int(shard_size))
    shards = output.plan(num, shard_size)
    placement = runner.param_bytes()
    manifest = output.new_manifest(record, runner.plan.paths, shards, placement=dict(
        model_parallel=runner.plan.model_parallel, param_bytes_per_device=placement["per_device"],
        param_bytes_total=placement["total"]))
    output.prepare(out, manifest, log)

    mine = shards[p_index::p_count]
    output.remove_stale(out, mine)
    layout = (tuple(record["output_shape"]), "float32" if runner.plan.output_dtype == np.float32 else "uint8",
              bool(runner.plan.n_classes))
    prefix = f"sample [{p_index + 1}/{p_count}]: " if p_count > 1 else "sample: "
    todo, rewritten = [], 0
    for s in mine:
        if not (out / s["file"]).is_file():
            todo.append(s)
            continue
        try:
            output.verify_shard(out, s, *layout)
        except output.BadShard as err:
            rewritten += 1
            todo.append(s)
            if log:
                print(f"{prefix}{err}: writing it again", file=log, flush=True)
    skipped = sum(s["stop"] - s["start"] for s in mine if s not in todo)
    total = sum(s["stop"] - s["start"] for s in todo)
    compile_seconds, sample_seconds, nonfinite = 0.0, 0.0, 0
    if total:
        compile_seconds = runner.compile()
        if log:
            print(f"{prefix}compiled in {compile_seconds:.1f} s for batches of {runner.batch} on "
                  f"{len(runner.devices)} {jax.default_backend()} device(s)", file=log, flush=True)
            if jax.default_backend() == "gpu" and "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
                print(f"{prefix}note: XLA picks GPU kernels by timing, so reruns can differ in rare pixels; "
                      f"set XLA_FLAGS=--xla_gpu_deterministic_ops=true (the CLI's default) for bit-exact "
                      f"images", file=log, flush=True)
        t0 = time.perf_counter()
        nonfinite = _run(runner, out, todo, Progress(total, log, prefix) if log else None, on_batch)
        sample_seconds = time.perf_counter() - t0
    if preview and p_index == 0 and runner.output_dtype == np.uint8:
        img.write_preview(out, shards, layout)
    summary = Summary(
        out=str(out), num=int(num), generated=total, skipped=skipped, rewritten=rewritten, shards_written=len(todo),
        nonfinite=nonfinite, seconds=time.perf_counter() - start, sample_seconds=sample_seconds,
        compile_seconds=compile_seconds, images_per_second=total / sample_seconds if sample_seconds else 0.0,
        devices=len(runner.devices), process_index=p_index, process_count=p_count,
        fingerprint=manifest["fingerprint"], param_bytes_per_device=placement["per_device"],
        param_bytes_total=placement["total"])
    if log:
        if not summary.generated:
            line = f"{prefix}nothing to do: {summary.skipped} images of this process already in {summary.out}"
        else:
            line = (f"{prefix}{summary.generated} images in {duration(summary.seconds)} "
                    f"({summary.images_per_second:.1f} img/s after a {summary.compile_seconds:.1f} s compile, once; "
                    f"{summary.skipped} found done) -> {summary.out}")
        print(line, file=log, flush=True)
        if nonfinite:
            print(f"{prefix}warning: {nonfinite} sample(s) ended with NaN or inf values (the model or the settings "
                  f"diverged); their pixels are meaningless", file=log, flush=True)
    return summary


def _run(runner: Runner, out: Path, todo: list[dict], progress, on_batch) -> int:
    """Stream this process's pending indices through full batches; write each shard when whole.
    Returns the number of samples whose final state was not finite.

    On accelerators batch k + 1 is dispatched before batch k is fetched, so the devices keep
    working while the host copies results and writes files. CPU devices would run the two
    batches at once on the same cores (slower), so there each batch is fetched first.
    """
    indices = np.concatenate([np.arange(s["start"], s["stop"]) for s in todo])
    owner = np.concatenate([np.full(s["stop"] - s["start"], k) for k, s in enumerate(todo)])
    buffers: dict[int, list] = {}  # position in todo -> [images, labels, filled]
    conditional = runner.plan.n_classes > 0
    nonfinite = 0

    def collect(lo, hi, result):
        nonlocal nonfinite
        images, labels, finite = (np.asarray(a)[: hi - lo] for a in result)
        nonfinite += int((~finite).sum())
        if on_batch is not None:
            on_batch(indices[lo:hi], images, labels if conditional else None)
        for k in np.unique(owner[lo:hi]):
            shard = todo[k]
            rows = np.nonzero(owner[lo:hi] == k)[0]
            pos = indices[lo:hi][rows] - shard["start"]
            n = shard["stop"] - shard["start"]
            buf = buffers.setdefault(k, [np.empty((n, *runner.image_shape), runner.output_dtype),
                                         np.empty(n, np.int32), 0])
            buf[0][pos], buf[1][pos] = images[rows], labels[rows]
            buf[2] += len(rows)
            if buf[2] == n:
                output.write_shard(out, shard, buf[0], buf[1] if conditional else None)
                del buffers[k]
        if progress:
            progress.update(hi - lo)

    ahead = 0 if runner.devices[0].platform == "cpu" else 1
    pending = deque()
    for lo in range(0, len(indices), runner.batch):
        hi = min(lo + runner.batch, len(indices))
        pending.append((lo, hi, runner.dispatch(indices[lo:hi])))
        if len(pending) > ahead:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    return nonfinite


def from_manifest(out, *, model=None, batch: int | None = None, devices=None) -> Runner:
    """A runner with the plan of an output folder's manifest (to regenerate any of its samples):
    the recorded settings, networks (``model`` overrides the recorded folder; its weights must be the
    same) and grid. ``ValueError`` naming what differs when the plan does not reproduce the record."""
    manifest = output.read_manifest(out)
    record, paths = manifest["settings"], manifest.get("paths", {})
    settings = Settings.from_json({**record, **{k: v for k, v in paths.items() if k != "model"}})
    the_plan = make_plan(model or paths.get("model"), settings, num=record["num"],
                         known_grid=record.get("grid_values"))
    mine = dict(the_plan.record, num=record["num"], shard_size=record["shard_size"])
    changed = output.differences(record, mine)
    if changed:
        raise ValueError(f"cannot reproduce {out}: {changed}")
    return Runner(the_plan, devices=devices, batch=batch, num=record["num"])

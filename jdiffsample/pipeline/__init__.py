"""Sampling at scale: many images of a network, deterministic, resumable, sharded over devices and hosts.

The rooms of this package, each importing only those above it in this list:

* :mod:`~jdiffsample.pipeline.settings`: the description of a run, every setting declared once;
* :mod:`~jdiffsample.pipeline.plan`: :func:`plan`, everything decided and computed before compiling;
* :mod:`~jdiffsample.pipeline.runner`: :class:`Runner`, the compiled program over a data x model mesh;
* :mod:`~jdiffsample.pipeline.output`: manifest, verified shards, atomic writes, resuming;
* :mod:`~jdiffsample.pipeline.images`: PNG, preview grid, exports;
* :mod:`~jdiffsample.pipeline.generate`: :func:`generate`, a run into an output folder.

::

    summary = pipeline.generate("digits", "runs/digits", num=1000, solver="unipc", nfe=10)
    plan = pipeline.plan("digits", pipeline.Settings(nfe=10), num=16)
    images, labels = pipeline.Runner(plan)(range(16))
"""

from __future__ import annotations

from jdiffsample.pipeline.generate import Summary, from_manifest, generate, run, write_run
from jdiffsample.pipeline.images import export_npz, export_png, image_grid, write_png
from jdiffsample.pipeline.output import MANIFEST, PREVIEW, load_samples, read_manifest, shard_name
from jdiffsample.pipeline.plan import Plan, plan
from jdiffsample.pipeline.runner import Runner
from jdiffsample.pipeline.settings import Output, Settings

__all__ = ["Settings", "Output", "Plan", "plan", "Runner", "Summary", "generate", "run", "write_run", "from_manifest", "load_samples",
           "read_manifest", "export_png", "export_npz", "write_png", "image_grid", "MANIFEST", "PREVIEW",
           "shard_name"]

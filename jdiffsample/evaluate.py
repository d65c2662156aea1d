"""The evaluation suite behind ``jdiffsample eval``: what each solver, grid and Skip-Tuning value buys.

For a network (the bundled ``digits`` model by default) and every combination of solver, NFE and
time grid, plus Skip-Tuning values on chosen solvers, it samples through the same plan and program
as ``jdiffsample sample`` (the same starting noises, labels cycling over the classes by index, the
same uint8 images) and reports, for the metrics asked for:

* ``fd``: digits FD (:func:`jdiffsample.metrics.digits_fd`) against the real digits (8x8 digits
  networks only),
* ``accuracy``: the digits classifier's accuracy on the requested labels (the same),
* ``error``: RMS pixel distance (images in [-1, 1], 8-bit) to a reference solution from the same
  noise (EDM's Heun on a fine Karras grid with the untuned network): the solver's discretization
  error, resolved down to the 8-bit quantization. For stochastic solvers and Skip-Tuned networks it
  measures a deliberate departure from the ODE solution, not an error.
* ``seconds``: sampling wall time (compilation excluded).
* ``fid`` (with pytorch-fid's InceptionV3 weights) and ``fd_dinov2`` (with DINOv2 ViT-L/14's):
  Frechet distances in their features (:mod:`jdiffsample.fid`) against a reference in any format
  ``jdiffsample fid`` reads (for the digits model, by default, the 1797 real digits).

Solvers are registry names with options (``dpmpp:order=3``). Grids: every method of
:mod:`jdiffsample.grids` (``logsnr``, ``karras``, ``optimized``, ``ays``, ``gits``, ``learned``,
``ld3``, ...): each is the grid ``jdiffsample sample`` makes with the same settings, and each cell
reports what its grid cost to compute (``grid_seconds``, once per solver and NFE).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jdiffsample import fid, metrics, nets, pipeline
from jdiffsample.pipeline import settings
from jdiffsample.solvers import registry

__all__ = ["Cell", "Suite", "write_markdown", "write_csv", "read_csv", "plot", "save_grids", "dequantize"]


def dequantize(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1] (the centre of each 8-bit level)."""
    return (np.asarray(images, np.float32) - 127.5) / 127.5


@dataclasses.dataclass
class Cell:
    """One row of the results."""

    solver: str
    nfe: int
    grid: str
    rho_bottom: float
    fd: float
    accuracy: float
    error: float
    seconds: float
    fid: float = float("nan")
    grid_seconds: float = 0.0  # computing the grid (its model calls for GITS and learned grids), once
    fd_dinov2: float = float("nan")


def _cell_name(solver: str, options: dict, nfe: int, grid: str, rho: float) -> str:
    opts = "".join(f"_{k}{v}" for k, v in sorted(options.items()))
    return f"{solver}{opts}_nfe{nfe}_{grid}" + ("" if rho == 1.0 else f"_rho{rho:g}")


class Suite:
    """Samples, grids and metrics for one network; see the module docstring.

    Every cell is a :class:`jdiffsample.pipeline.Settings` planned and run exactly as ``jdiffsample
    sample`` plans and runs it (its grid included: a learned or GITS grid is the one ``sample`` would
    find with the same settings), with labels cycling 0-9 by index.

    Args:
      model: bundled model name or checkpoint folder (class-conditional or unconditional).
      samples: images per cell; sample i has label i mod the number of classes.
      batch, micro_batch: as for ``jdiffsample sample`` (the images depend on micro_batch only).
      seed: the base seed of every cell.
      ref_steps: Heun steps of the reference (NFE ``2 * ref_steps - 1``, Karras grid to 0).
      learn_batch, learn_iters: warm-up noises and iterations of learned and GITS grids.
      metrics: some of ``digits``, ``fid``, ``fd_dinov2`` (default: ``digits`` for an 8x8 digits network,
        plus the Frechet distances whose weights are given).
      inception, dinov2: the feature networks' weights files (pytorch-fid's InceptionV3, DINOv2's
        released ViT-L/14): add FID and FD_DINOv2 to every cell.
      reference: their reference, in any format ``jdiffsample fid`` reads (default for the digits
        model: the 1797 real digits).
      save_samples: a folder; every cell's images are also written there as a ``jdiffsample
        sample`` output folder (manifest and shards) named after the cell.
      log: called with progress lines.
    """

    def __init__(self, model: str = "digits", samples: int = 1000, batch: int = 512, seed: int = 0,
                 ref_steps: int = 100, learn_batch: int = 64, learn_iters: int = 30, inception=None,
                 reference=None, micro_batch: int = 64, save_samples=None, metrics=None, dinov2=None,
                 log: Callable[[str], None] = print):
        for name, value in (("samples", samples), ("batch", batch), ("ref_steps", ref_steps),
                            ("micro_batch", micro_batch), ("learn_batch", learn_batch), ("learn_iters", learn_iters)):
            settings.check_positive_int(name, value)
        if samples < 2:
            raise ValueError(f"samples (--samples) must be at least 2, got {samples}")
        self.path = nets.resolve(model)
        probe = nets.from_config(nets.read_config(self.path), None)
        digits = probe.num_classes == 10 and tuple(probe.sample_shape) == (8, 8, 1)
        wanted = [m for m in (metrics or ("digits" if digits else None,)) if m]
        if inception is not None and "fid" not in wanted:
            wanted.append("fid")
        if dinov2 is not None and "fd_dinov2" not in wanted:
            wanted.append("fd_dinov2")
        unknown = sorted(set(wanted) - {"digits", *fid.METRICS})
        if unknown or not wanted:
            raise ValueError(f"metrics must be some of digits, {', '.join(fid.METRICS)} (--metric), got "
                             f"{', '.join(unknown) or 'none'}")
        if "digits" in wanted and not digits:
            raise ValueError(f"{self.path}: the digits metrics need an 8x8 single-channel network with 10 classes; "
                             f"give --metric fid or fd_dinov2 with --ref and the feature network's weights")
        self.metrics, self.schedule = tuple(wanted), probe.schedule
        self.num_classes = probe.num_classes
        self.samples, self.batch, self.micro_batch, self.seed = samples, batch, micro_batch, seed
        self.ref_steps, self.learn_batch, self.learn_iters = ref_steps, learn_batch, learn_iters
        self.save_samples = None if save_samples is None else Path(save_samples)
        self.log = log
        self.labels = np.arange(samples) % max(self.num_classes, 1)
        self._grid_costs: dict = {}
        self.grid_log: dict = {}
        self.networks, self.reference_stats = {}, {}
        weights = dict(fid=inception, fd_dinov2=dinov2)
        features = [m for m in self.metrics if m != "digits"]
        if features:
            self._setup_features(features, weights, reference, digits)
        images, seconds, _ = self.sample("heun", {}, 2 * ref_steps - 1, "karras")
        self.log(f"reference: Heun, {ref_steps} steps (NFE {2 * ref_steps - 1}), {seconds:.1f} s")
        self.reference = dequantize(images)

    def _setup_features(self, features, weights, reference, digits: bool) -> None:
        """The feature networks and their reference statistics, checked before any sampling."""
        missing = [m for m in features if weights[m] is None]
        if missing:
            flag = {"fid": "--inception", "fd_dinov2": "--dinov2"}
            raise ValueError(f"{', '.join(missing)} needs its feature network's weights: "
                             f"{', '.join(flag[m] for m in missing)} FILE")
        if reference is None and not digits:
            raise ValueError("Frechet distances need reference statistics: --ref FILE (statistics .npz/.pkl, an ADM "
                             "reference batch, a run folder or a folder of PNGs)")
        self.networks = {m: fid.load_network(m, weights[m]) for m in features}
        start = time.perf_counter()
        if reference is None:  # the 1797 real digits
            real, _ = metrics.real_digits()
            real = np.floor(np.clip(real, -1, 1) * 127.5 + 128.0).clip(0, 255).astype(np.uint8)
            self.reference_stats = fid.image_stats(real, self.networks)
        else:
            ref = fid.load_reference(reference)
            ref.check(features, self.networks)
            self.reference_stats = ref.stats_for(self.networks)
        self.log(f"reference statistics of {', '.join(features)} in {time.perf_counter() - start:.1f} s")

    def distances(self, images) -> dict:
        """``{metric: Frechet distance}`` of uint8 ``images`` against the reference statistics."""
        if not self.networks:
            return {}
        stats = fid.image_stats(images, self.networks)
        return {m: fid.frechet(stats[m], self.reference_stats[m]) for m in self.networks}

    # -- sampling ---------------------------------------------------------------------------

    def settings(self, solver: str, options: dict, nfe: int, grid, rho_bottom: float = 1.0) -> pipeline.Settings:
        """The settings of one cell: what ``jdiffsample sample --class-labels 0,...,9`` would get."""
        labels = tuple(range(self.num_classes)) if self.num_classes else None
        return pipeline.Settings(solver=solver, options=options, nfe=nfe, grid=grid,
                                 skip_tuning=None if rho_bottom == 1.0 else rho_bottom, class_labels=labels,
                                 seed=self.seed, micro_batch=self.micro_batch, learn_iters=self.learn_iters,
                                 learn_batch=self.learn_batch)

    def sample(self, solver: str, options: dict, nfe: int, grid, rho_bottom: float = 1.0,
               name: str | None = None) -> tuple[np.ndarray, float, pipeline.Plan]:
        """All ``samples`` uint8 images of one cell, the wall time of sampling them, and its plan."""
        start = time.perf_counter()
        plan = pipeline.plan(self.path, self.settings(solver, options, nfe, grid, rho_bottom), num=self.samples)
        stage = plan.stages[0]
        key = (grid, solver, tuple(sorted(options.items())), stage.n_steps)
        if key not in self._grid_costs:
            self._grid_costs[key] = time.perf_counter() - start
            if grid not in ("logsnr", "karras", "uniform", "quadratic"):
                self.grid_log[f"{grid}/{registry.get(solver).label(options)}/{stage.n_steps}"] = stage.ts.tolist()
        runner = pipeline.Runner(plan, batch=self.batch, num=self.samples)
        seconds = runner.compile()
        if seconds > 0.05:
            self.log(f"compiled {solver} {options or ''} with {stage.n_steps} steps in {seconds:.1f} s")
        start = time.perf_counter()
        if self.save_samples is None:
            images, _ = runner(np.arange(self.samples))
        else:
            images = np.empty((self.samples, *runner.image_shape), np.uint8)

            def keep(indices, batch_images, labels):
                images[indices] = batch_images

            name = name or _cell_name(solver, options, nfe, stage.grid, rho_bottom)
            pipeline.write_run(runner, self.save_samples / name, num=self.samples, log=None, on_batch=keep)
        return images, time.perf_counter() - start, plan

    # -- cells ------------------------------------------------------------------------------

    def cell(self, spec: str, nfe: int, grid: str, rho_bottom: float = 1.0) -> Cell:
        """Sample and score one configuration; ``spec`` is a solver name with options
        (``'dpmpp:order=3'``)."""
        solver, options = registry.parse_spec(spec)
        label = registry.get(solver).label(options)
        seen = set(self._grid_costs)
        images, seconds, plan = self.sample(solver, options, nfe, grid, rho_bottom,
                                            name=_cell_name(solver, options, nfe, grid, rho_bottom))
        key = (grid, solver, tuple(sorted(options.items())), plan.stages[0].n_steps)
        grid_seconds = self._grid_costs[key] if key not in seen else 0.0
        distances = self.distances(images)
        images = dequantize(images)
        error = float(np.sqrt(np.mean((images - self.reference) ** 2)))
        digits = "digits" in self.metrics
        nan = float("nan")
        return Cell(label, nfe, grid, rho_bottom, metrics.digits_fd(images) if digits else nan,
                    metrics.digits_accuracy(images, self.labels) if digits else nan, error, seconds,
                    distances.get("fid", nan), grid_seconds, distances.get("fd_dinov2", nan))

    def baselines(self) -> dict:
        """Digits FD of the reference samples, and of real digits against themselves at this
        sample count (the floor that sampling noise alone gives); the reference samples' Frechet
        distances."""
        reference = np.floor(np.clip(self.reference, -1, 1) * 127.5 + 128.0).clip(0, 255).astype(np.uint8)
        out = {f"reference_{m}": v for m, v in self.distances(reference).items()}
        if "digits" not in self.metrics:
            return out
        out.update(reference_fd=metrics.digits_fd(self.reference),
                   reference_accuracy=metrics.digits_accuracy(self.reference, self.labels))
        try:
            images, _ = metrics.real_digits()
        except ImportError:  # scikit-learn is optional
            return out
        rng = np.random.default_rng(self.seed)
        idx = rng.choice(len(images), min(self.samples, len(images)), replace=False)
        out["real_subset_fd"] = metrics.digits_fd(images[idx])
        return out


# -- output ---------------------------------------------------------------------------------


def write_csv(cells: list[Cell], path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in dataclasses.fields(Cell)])
        for c in cells:
            writer.writerow(dataclasses.astuple(c))


def read_csv(path) -> list[Cell]:
    """The cells of a ``results.csv`` (e.g. to re-render the tables of an interrupted run)."""
    with open(path, newline="") as f:
        return [Cell(r["solver"], int(r["nfe"]), r["grid"], float(r["rho_bottom"]),
                     float(r["fd"]), float(r["accuracy"]), float(r["error"]), float(r["seconds"]),
                     float(r.get("fid") or "nan"), float(r.get("grid_seconds") or 0.0),
                     float(r.get("fd_dinov2") or "nan"))
                for r in csv.DictReader(f)]


def _pivot(cells: list[Cell], value: Callable[[Cell], str], rows: Callable[[Cell], tuple],
           header: list[str]) -> list[str]:
    nfes = sorted({c.nfe for c in cells})
    table: dict = {}
    for c in cells:
        table.setdefault(rows(c), {})[c.nfe] = value(c)
    lines = ["| " + " | ".join(header + [f"NFE {n}" for n in nfes]) + " |",
             "|" + "---|" * (len(header) + len(nfes))]
    for row, values in table.items():
        lines.append("| " + " | ".join([*map(str, row), *(values.get(n, "") for n in nfes)])
                     + " |")
    return lines


def write_markdown(cells: list[Cell], path, title: str = "", notes: list[str] = ()) -> str:
    """Pivot tables (rows: solver and grid / Skip-Tuning; columns: NFE) of FD, error and time."""
    untuned = [c for c in cells if c.rho_bottom == 1.0]
    tuned_keys = {(c.solver, c.grid) for c in cells if c.rho_bottom != 1.0}
    tuned = [c for c in cells if (c.solver, c.grid) in tuned_keys]
    lines = [f"# {title}" if title else "", *notes, ""]
    digits = any(np.isfinite(c.fd) for c in cells)
    sections = [
        ("Digits FD (lower is better)", lambda c: f"{c.fd:.2f}"),
        ("Classifier accuracy on the requested class", lambda c: f"{c.accuracy:.3f}"),
        ("RMS error against the reference solution (same noise)", lambda c: f"{c.error:.4f}"),
        ("Sampling wall time, seconds (all samples, compilation excluded)",
         lambda c: f"{c.seconds:.2f}"),
        ("Grid method's own cost, seconds (warm-up trajectories, learning; once per solver and NFE)",
         lambda c: f"{c.grid_seconds:.2f}"),
    ]
    if not digits:
        sections = sections[2:]
    if any(np.isfinite(c.fd_dinov2) for c in cells):
        sections.insert(0, ("FD_DINOv2, DINOv2 ViT-L/14 (lower is better)", lambda c: f"{c.fd_dinov2:.2f}"))
    if any(np.isfinite(c.fid) for c in cells):
        sections.insert(0, ("FID, pytorch-fid's InceptionV3 (lower is better)", lambda c: f"{c.fid:.2f}"))
    for name, value in sections:
        lines += [f"## {name}", ""]
        lines += _pivot(untuned, value, lambda c: (c.solver, c.grid), ["solver", "grid"])
        lines.append("")
    if tuned:
        for name, value in [x for x in sections if not x[0].startswith(("Sampling wall", "Grid method"))]:
            lines += [f"## Skip-Tuning: {name}", ""]
            lines += _pivot(sorted(tuned, key=lambda c: (c.solver, c.grid, -c.rho_bottom)), value,
                            lambda c: (c.solver, c.grid, c.rho_bottom),
                            ["solver", "grid", "rho_bottom"])
            lines.append("")
    text = "\n".join(lines).lstrip("\n")
    Path(path).write_text(text)
    return text


def plot(cells: list[Cell], path) -> None:
    """The first quality metric the cells have (digits FD, FID or FD_DINOv2) and the reference error
    vs NFE, one panel pair per grid (needs matplotlib)."""
    try:  # an optional dependency
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install 'jdiffsample[eval]' "
                         "(or pass --no-plot)") from None
    untuned = [c for c in cells if c.rho_bottom == 1.0]
    name, quality = next(((n, f) for n, f in (("digits FD", lambda c: c.fd), ("FID", lambda c: c.fid),
                                                 ("FD_DINOv2", lambda c: c.fd_dinov2))
                          if any(np.isfinite(f(c)) for c in cells)), ("digits FD", lambda c: c.fd))
    grids = list(dict.fromkeys(c.grid for c in untuned))
    nfes = sorted({c.nfe for c in untuned})
    fig, axes = plt.subplots(2, len(grids), figsize=(4 * len(grids), 7), squeeze=False,
                             sharey="row")
    for j, grid in enumerate(grids):
        for solver in dict.fromkeys(c.solver for c in untuned):
            pts = sorted((c.nfe, quality(c), c.error) for c in untuned
                         if c.grid == grid and c.solver == solver)
            if pts:
                nfe, fd, err = zip(*pts)
                axes[0, j].plot(nfe, fd, "o-", label=solver)
                axes[1, j].plot(nfe, err, "o-", label=solver)
        axes[0, j].set_title(f"{grid} grid")
        for ax in axes[:, j]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(nfes, [str(n) for n in nfes])
            ax.minorticks_off()
            ax.set_xlabel("NFE")
    axes[0, 0].set_ylabel(name)
    axes[1, 0].set_ylabel("RMS error vs reference")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grids(grid_log: dict, path) -> None:
    """The optimized and learned grids a run used, as JSON ``{"grid/solver/steps": times}``."""
    Path(path).write_text(json.dumps(grid_log, indent=1))

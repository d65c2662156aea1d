"""The evaluation suite behind ``jdiffsample eval``: what each solver, grid and Skip-Tuning value buys.

For a class-conditional EDM network on 8x8 digits (the bundled ``digits`` model by default) and
every combination of solver, NFE and time grid, plus Skip-Tuning values on chosen solvers, it
samples the same starting noises and labels and reports

* ``fd``: digits FD (:func:`jdiffsample.metrics.digits_fd`) against the real digits,
* ``accuracy``: the digits classifier's accuracy on the requested labels,
* ``error``: RMS pixel distance to a reference solution from the same noise (EDM's Heun on a
  fine Karras grid with the untuned network): the solver's discretization error. For the
  stochastic SA-Solver and for Skip-Tuned networks it measures a deliberate departure from the
  ODE solution, not an error.
* ``seconds``: sampling wall time (compilation excluded).
* ``fid`` (only with ``inception=``): FID with pytorch-fid's InceptionV3 (:mod:`jdiffsample.fid`)
  against reference statistics (default: the 1797 real digits).

Grids: any name in :data:`jdiffsample.timesteps.GRIDS` (``logsnr``, ``karras``, ...),
``optimized`` (:func:`jdiffsample.optimize.optimize_timesteps`, the model-free error bound, at the
solver's order, initialised from logSNR) and ``learned`` (:func:`jdiffsample.optimize.learn_timesteps`
through the solver with this network, against Heun on a fine Karras grid, on its own noises).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jdiffsample.pipeline import resolve_model

__all__ = ["SOLVER_SPECS", "Cell", "resolve_model", "steps_for", "Suite", "write_markdown",
           "write_csv", "read_csv", "plot", "save_grids"]


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """A solver as evaluated: its function name, options, display label and bound order."""

    solver: str
    options: tuple
    label: str
    order: int  # for the optimized grid's error bound
    stochastic: bool = False


SOLVER_SPECS = {
    "unipc": SolverSpec("unipc", (("order", 3),), "UniPC-3", 3),
    "dpmpp": SolverSpec("dpmpp", (("order", 3),), "DPM-Solver++(3M)", 3),
    "sa_solver": SolverSpec("sa_solver", (), "SA-Solver", 3, stochastic=True),
    "heun": SolverSpec("heun", (), "Heun (EDM)", 2),
    "ddim": SolverSpec("ddim", (), "DDIM", 1),
    "euler": SolverSpec("euler", (), "Euler (EDM)", 1),
}


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


def steps_for(solver: str, nfe: int) -> tuple[int, bool]:
    """``(steps, final_zero)`` of a grid that costs ``nfe`` model calls.

    Heun takes 2 calls a step; an odd NFE adds EDM's final Euler step into sigma = 0 (after
    ``steps - 1`` steps down to the grid's last time). Every other solver: one call a step.
    """
    if nfe < 1:
        raise ValueError(f"NFE must be positive, got {nfe}")
    if solver != "heun":
        return nfe, False
    if nfe < 2:
        raise ValueError("Heun needs NFE >= 2")
    return (nfe + 1) // 2, nfe % 2 == 1


class Suite:
    """Samples, grids and metrics for one network; see the module docstring.

    Args:
      model: bundled model name or checkpoint directory (an 8x8 class-conditional EDM network).
      samples: images per cell; labels cycle 0..9.
      batch: images per sampling call.
      seed: the starting noises (and SA-Solver's noise); learned grids use other noises.
      ref_steps: Heun steps of the reference (NFE ``2 * ref_steps - 1``, Karras grid to 0).
      learn_batch, learn_iters: noises and iterations for learned grids.
      inception: pytorch-fid's InceptionV3 weights file: adds FID to every cell (slow on a CPU:
        each image is resized to 299x299).
      fid_reference: FID reference statistics (``.npz`` with ``mu``, ``sigma``); default: the
        Inception statistics of the 1797 real digits.
      log: called with progress lines.
    """

    def __init__(self, model: str = "digits", samples: int = 1000, batch: int = 500,
                 seed: int = 0, ref_steps: int = 100, learn_batch: int = 64,
                 learn_iters: int = 30, inception=None, fid_reference=None,
                 log: Callable[[str], None] = print):
        import jax

        from jdiffsample import nets

        if samples < 2 or batch < 1:
            raise ValueError("samples must be >= 2 and batch >= 1")
        self.path = resolve_model(model)
        self.config = nets.load_config(self.path)
        self.module, self.variables = nets.load(self.path)
        m = self.module
        if getattr(m, "label_dim", 0) != 10 or m.img_resolution != 8 or m.img_channels != 1:
            raise ValueError(f"{self.path}: the digits metrics need an 8x8 single-channel "
                             f"network with 10 classes")
        _, self.schedule = nets.to_denoiser(m, self.variables, self.config,
                                            class_labels=np.zeros(1, np.int32))
        self.samples, self.batch, self.seed = samples, min(batch, samples), seed
        self.ref_steps, self.learn_batch, self.learn_iters = ref_steps, learn_batch, learn_iters
        self.log = log
        self.labels = np.arange(samples) % 10
        shape = (samples, 8, 8, 1)
        key = jax.random.key(seed)
        self.noise = np.asarray(jax.random.normal(key, shape) * self.schedule.t_max, np.float32)
        self.keys = jax.random.split(jax.random.fold_in(key, 1), samples)
        self._compiled: dict = {}
        self._grids: dict = {}
        self.grid_log: dict = {}
        self.inception, self.fid_reference = None, None
        if inception is not None:
            self._setup_fid(inception, fid_reference)
        self.reference = self._reference()

    def _setup_fid(self, weights, reference) -> None:
        from jdiffsample import fid

        self.inception = fid.load_inception(weights)
        if reference is not None:
            self.fid_reference = fid.load_stats(reference)
            return
        from jdiffsample import metrics

        start = time.perf_counter()
        real, _ = metrics.real_digits()
        self.fid_reference = fid.compute_stats(real, self.inception)
        self.log(f"Inception statistics of {len(real)} real digits in "
                 f"{time.perf_counter() - start:.1f} s")

    def fid(self, images) -> float:
        """FID of ``images`` (in [-1, 1]) against the reference statistics; NaN without Inception."""
        if self.inception is None:
            return float("nan")
        from jdiffsample import fid

        return fid.fid(np.clip(images, -1, 1), self.inception, self.fid_reference)

    # -- sampling ---------------------------------------------------------------------------

    def _sampler(self, spec: SolverSpec, n_steps: int):
        """A compiled ``(variables, labels, x, ts, keys) -> x0`` for one solver and grid size."""
        import jax
        import jax.numpy as jnp

        from jdiffsample.solvers import SOLVERS

        cache_key = (spec, n_steps)
        if cache_key not in self._compiled:
            module, schedule, fn = self.module, self.schedule, SOLVERS[spec.solver]
            options = dict(spec.options)

            def run(variables, labels, x, ts, keys):
                def denoise(x, t):
                    sigma = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
                    return module.apply(variables, x, sigma, labels)

                return fn(denoise, x, ts, schedule, key=keys if spec.stochastic else None,
                          **options)

            b = self.batch
            args = (self.variables, jnp.zeros((b, 10)), jnp.zeros((b, 8, 8, 1)),
                    jnp.zeros(n_steps + 1), self.keys[:b])
            start = time.perf_counter()
            self._compiled[cache_key] = jax.jit(run).lower(*args).compile()
            self.log(f"compiled {spec.label} with {n_steps} steps in "
                     f"{time.perf_counter() - start:.1f} s")
        return self._compiled[cache_key]

    def sample(self, spec: SolverSpec, ts, variables=None) -> tuple[np.ndarray, float]:
        """All ``samples`` images for one solver and grid, and the wall time of sampling."""
        import jax
        import jax.numpy as jnp

        run = self._sampler(spec, len(ts) - 1)
        variables = self.variables if variables is None else variables
        onehot = np.eye(10, dtype=np.float32)[self.labels]
        ts = jnp.asarray(ts, jnp.float32)
        out, b, total = [], self.batch, 0.0
        for i in range(0, self.samples, b):
            idx = np.arange(i, i + b) % self.samples  # the last batch wraps around
            start = time.perf_counter()
            x = jax.block_until_ready(run(variables, onehot[idx], jnp.asarray(self.noise[idx]),
                                          ts, self.keys[idx]))
            total += time.perf_counter() - start
            out.append(np.asarray(x)[: min(b, self.samples - i)])
        return np.concatenate(out), total

    def _reference(self) -> np.ndarray:
        from jdiffsample import timesteps

        ts = timesteps.karras(self.schedule, self.ref_steps, final_zero=True)
        images, seconds = self.sample(SOLVER_SPECS["heun"], ts)
        self.log(f"reference: Heun, {self.ref_steps} steps (NFE {2 * self.ref_steps - 1}), "
                 f"{seconds:.1f} s")
        return images

    # -- grids ------------------------------------------------------------------------------

    def grid(self, name: str, spec: SolverSpec, nfe: int) -> np.ndarray:
        """The time grid ``name`` for ``spec`` at ``nfe`` (cached; learned grids are slow)."""
        from jdiffsample import timesteps

        steps, final_zero = steps_for(spec.solver, nfe)
        base = steps - 1 if final_zero else steps
        key = (name, spec.solver, base)
        if key not in self._grids:
            if name in timesteps.GRIDS:
                ts = timesteps.get(name, self.schedule, base)
            elif name == "optimized":
                from jdiffsample import optimize

                ts = optimize.optimize_timesteps(self.schedule, base, order=spec.order).ts
            elif name == "learned":
                ts = self._learn(spec, base)
            else:
                raise ValueError(f"unknown grid {name!r}; choose from optimized, learned, "
                                 f"{', '.join(timesteps.GRIDS)}")
            self._grids[key] = np.asarray(ts, np.float64)
            self.grid_log[f"{name}/{spec.solver}/{base}"] = self._grids[key].tolist()
        ts = self._grids[key]
        return np.append(ts, 0.0) if final_zero else ts

    def _learn(self, spec: SolverSpec, steps: int) -> np.ndarray:
        """A grid learned through ``spec``'s solver (SA-Solver: its ODE variant, tau = 0)."""
        import jax
        import jax.numpy as jnp

        from jdiffsample import optimize, timesteps

        n = self.learn_batch
        key = jax.random.key(self.seed + 1000)
        noise = jax.random.normal(key, (n, 8, 8, 1)) * self.schedule.t_max
        labels = jax.nn.one_hot(jnp.arange(n) % 10, 10)
        variables, module = self.variables, self.module

        def denoise(x, t):
            sigma = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
            return module.apply(variables, x, sigma, labels)

        options = dict(spec.options)
        if spec.stochastic:
            options["tau"] = 0.0
        start = time.perf_counter()
        result = optimize.learn_timesteps(
            denoise, self.schedule, spec.solver, noise, timesteps.logsnr(self.schedule, steps),
            teacher="heun", teacher_steps=self.ref_steps, maxiter=self.learn_iters, **options)
        self.log(f"learned a {steps}-step grid for {spec.label} in "
                 f"{time.perf_counter() - start:.1f} s: mse {result.init_train_error:.3g} -> "
                 f"{result.train_error:.3g}")
        return result.ts

    # -- cells ------------------------------------------------------------------------------

    def cell(self, solver: str, nfe: int, grid: str, rho_bottom: float = 1.0) -> Cell:
        """Sample and score one configuration."""
        from jdiffsample import metrics, skip_tuning

        if solver not in SOLVER_SPECS:
            raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVER_SPECS)}")
        spec = SOLVER_SPECS[solver]
        ts = self.grid(grid, spec, nfe)
        variables = None if rho_bottom == 1.0 else skip_tuning.apply(self.variables,
                                                                     rho_bottom=rho_bottom)
        images, seconds = self.sample(spec, ts, variables)
        error = float(np.sqrt(np.mean((images - self.reference) ** 2)))
        if not np.all(np.isfinite(images)):
            return Cell(spec.label, nfe, grid, rho_bottom, float("nan"), float("nan"), error,
                        seconds)
        return Cell(spec.label, nfe, grid, rho_bottom, metrics.digits_fd(images),
                    metrics.digits_accuracy(images, self.labels), error, seconds, self.fid(images))

    def baselines(self) -> dict:
        """Digits FD of the reference samples, and of real digits against themselves at this
        sample count (the floor that sampling noise alone gives)."""
        from jdiffsample import metrics

        out = dict(reference_fd=metrics.digits_fd(self.reference),
                   reference_accuracy=metrics.digits_accuracy(self.reference, self.labels))
        if self.inception is not None:
            out["reference_fid"] = self.fid(self.reference)
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
                     float(r.get("fid") or "nan"))
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
    sections = [
        ("Digits FD (lower is better)", lambda c: f"{c.fd:.2f}"),
        ("Classifier accuracy on the requested class", lambda c: f"{c.accuracy:.3f}"),
        ("RMS error against the reference solution (same noise)", lambda c: f"{c.error:.4f}"),
        ("Sampling wall time, seconds (all samples, compilation excluded)",
         lambda c: f"{c.seconds:.2f}"),
    ]
    if any(np.isfinite(c.fid) for c in cells):
        sections.insert(1, ("FID, pytorch-fid's InceptionV3 (lower is better)", lambda c: f"{c.fid:.2f}"))
    for name, value in sections:
        lines += [f"## {name}", ""]
        lines += _pivot(untuned, value, lambda c: (c.solver, c.grid), ["solver", "grid"])
        lines.append("")
    if tuned:
        for name, value in [x for x in sections if not x[0].startswith("Sampling wall")]:
            lines += [f"## Skip-Tuning: {name}", ""]
            lines += _pivot(sorted(tuned, key=lambda c: (c.solver, c.grid, -c.rho_bottom)), value,
                            lambda c: (c.solver, c.grid, c.rho_bottom),
                            ["solver", "grid", "rho_bottom"])
            lines.append("")
    text = "\n".join(lines).lstrip("\n")
    Path(path).write_text(text)
    return text


def plot(cells: list[Cell], path) -> None:
    """Digits FD and reference error vs NFE, one panel pair per grid (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install 'jdiffsample[eval]' "
                         "(or pass --no-plot)") from None
    untuned = [c for c in cells if c.rho_bottom == 1.0]
    grids = list(dict.fromkeys(c.grid for c in untuned))
    nfes = sorted({c.nfe for c in untuned})
    fig, axes = plt.subplots(2, len(grids), figsize=(4 * len(grids), 7), squeeze=False,
                             sharey="row")
    for j, grid in enumerate(grids):
        for solver in dict.fromkeys(c.solver for c in untuned):
            pts = sorted((c.nfe, c.fd, c.error) for c in untuned
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
    axes[0, 0].set_ylabel("digits FD")
    axes[1, 0].set_ylabel("RMS error vs reference")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grids(grid_log: dict, path) -> None:
    """The optimized and learned grids a run used, as JSON ``{"grid/solver/steps": times}``."""
    Path(path).write_text(json.dumps(grid_log, indent=1))

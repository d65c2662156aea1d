"""``jdiffsample eval``: sample quality and cost of solvers, NFEs, grids and Skip-Tuning values.

Writes ``results.md`` (pivot tables), ``results.csv`` (one row per cell), ``grids.json`` (the
optimized and learned grids used) and ``quality_vs_nfe.png`` to ``--out``. See
:mod:`jdiffsample.evaluate` for what each number means.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from jdiffsample import evaluate, nets, schedules
from jdiffsample import grids as grid_methods
from jdiffsample.nets.formats.checkpoint import replace_folder
from jdiffsample.solvers import registry


def _list(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"cannot parse {text!r} as a comma-separated list") from None
    return parse


def add_arguments(parser) -> None:
    names = ", ".join(registry.names())
    parser.add_argument("--model", default="digits",
                        help="bundled model name or checkpoint directory (default digits)")
    parser.add_argument("--solvers", type=str, default="unipc,dpmpp:order=3,sa_solver,heun,ddim",
                        help=f"comma-separated solvers, each NAME or NAME:OPTION=VALUE,... (e.g. dpmpp:order=3), "
                             f"from: {names}")
    parser.add_argument("--nfe", type=str, default="5,6,8,10,20", help="comma-separated NFEs")
    parser.add_argument("--grids", type=str, default="logsnr,karras,optimized,learned",
                        help="comma-separated, from jdiffsample.grids: logsnr, karras, uniform, quadratic, "
                             "optimized, ays, gits, learned, ld3")
    parser.add_argument("--skip", type=str, default="0.9,0.8,0.7",
                        help="Skip-Tuning rho_bottom values besides 1.0 (empty: none)")
    parser.add_argument("--skip-solvers", type=str, default=None,
                        help="solvers that get the Skip-Tuning rows (default: all --solvers)")
    parser.add_argument("--skip-grid", default=None,
                        help="grid of the Skip-Tuning rows (default: the first of --grids)")
    parser.add_argument("--samples", type=int, default=1000, help="images per cell (default 1000)")
    parser.add_argument("--batch", type=int, default=512, help="images per sampling call")
    parser.add_argument("--micro-batch", type=int, default=64,
                        help="samples per network call, as for 'jdiffsample sample' (default 64)")
    parser.add_argument("--save-samples", default=None, metavar="DIR",
                        help="also write every cell's images as a 'jdiffsample sample' folder in DIR/<cell>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-steps", type=int, default=100,
                        help="Heun steps of the reference solution (default 100: NFE 199)")
    parser.add_argument("--learned-solvers", type=str, default=None,
                        help="solvers that get the learned and ld3 grids (default: all --solvers); learning "
                             "differentiates through the sampler and costs minutes per cell on a CPU")
    parser.add_argument("--learn-batch", type=int, default=64, help="noises for learned grids")
    parser.add_argument("--learn-iters", type=int, default=30, help="iterations for learned grids")
    parser.add_argument("--metric", default=None, metavar="NAME,...",
                        help="quality metrics: digits (digits FD and accuracy: 8x8 digits networks, the default "
                             "there), fid, fd_dinov2 (Frechet distances in InceptionV3's / DINOv2's features)")
    parser.add_argument("--inception", default=None, metavar="PTH",
                        help="pytorch-fid's InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth): adds FID")
    parser.add_argument("--dinov2", default=None, metavar="PTH",
                        help="DINOv2's released weights (dinov2_vitl14_pretrain.pth): adds FD_DINOv2")
    parser.add_argument("--ref", default=None, metavar="REF",
                        help="reference of the Frechet distances: statistics (.npz of mu/sigma, EDM2's .pkl), an "
                             "ADM reference batch, a run folder or a PNG folder; default for digits: the real digits")
    parser.add_argument("--out", default="eval_results", help="output directory (written whole at the end)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder of an earlier eval")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")


RESULTS = ("results.md", "results.csv", "grids.json", "baselines.json", "quality_vs_nfe.png", "partial_results.csv")


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` is new, empty, or (with --overwrite) an earlier eval's folder; checked before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} holds an earlier evaluation; give --overwrite to replace it whole, "
                                  f"or another folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RESULTS)
        if foreign:
            raise ValueError(f"--out {out} holds files an eval does not write ({', '.join(foreign[:3])}); "
                             f"--overwrite would delete them: choose another folder")
    parent = out.absolute().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write in {parent} (permission denied)")


def run(args) -> int:
    solvers = registry.split_specs(args.solvers)
    nfes = _list(int)(args.nfe)
    grids = _list(str)(args.grids)
    skips = [r for r in _list(float)(args.skip) if r != 1.0]
    skip_solvers = solvers if args.skip_solvers is None else registry.split_specs(args.skip_solvers)
    skip_grid = args.skip_grid or grids[0]
    learned_solvers = solvers if args.learned_solvers is None else registry.split_specs(args.learned_solvers)
    if not (solvers and nfes and grids):
        raise ValueError("--solvers, --nfe and --grids need at least one value each")
    for flag, value in (("--samples", args.samples), ("--batch", args.batch), ("--micro-batch", args.micro_batch),
                        ("--ref-steps", args.ref_steps), ("--learn-batch", args.learn_batch),
                        ("--learn-iters", args.learn_iters), *(("--nfe", n) for n in nfes)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.samples < 2:
        raise ValueError(f"--samples must be at least 2, got {args.samples}")
    bad = [r for r in skips if not r > 0]
    if bad:
        raise ValueError(f"--skip values are Skip-Tuning scales rho_bottom and must be positive, got {bad[0]}")
    unknown = sorted(set(grids) - set(grid_methods.NAMES))
    if unknown:
        raise ValueError(f"unknown grid(s) {', '.join(unknown)}; choose from {', '.join(grid_methods.NAMES)}")
    config = nets.read_config(nets.resolve(args.model))
    schedule = schedules.from_config(config["schedule"])
    if "ays" in grids:
        grid_methods.ays_model(schedule)  # a model whose noise range has a published grid
    for spec in {*solvers, *skip_solvers, *learned_solvers}:
        name, options = registry.parse_spec(spec)  # validates before the slow part
        for nfe in nfes:
            registry.get(name).steps_for_nfe(nfe, zero_end=schedule.zero_end, options=options)
    for flag, path in (("--inception", args.inception), ("--dinov2", args.dinov2)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag}: no file {path}")
    if args.ref is not None and not Path(args.ref).exists():
        raise ValueError(f"--ref: nothing at {args.ref}")
    if args.ref is not None and args.inception is None and args.dinov2 is None:
        raise ValueError("--ref is the reference of Frechet distances: give --inception and/or --dinov2 weights")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.absolute().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        text = _evaluate(args, tmp, solvers, nfes, grids, skips, skip_solvers, skip_grid, learned_solvers)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(text)
    return 0


def _evaluate(args, out: Path, solvers, nfes, grids, skips, skip_solvers, skip_grid, learned_solvers) -> str:
    def log(line):
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    suite = evaluate.Suite(args.model, samples=args.samples, batch=args.batch, seed=args.seed,
                           ref_steps=args.ref_steps, learn_batch=args.learn_batch, learn_iters=args.learn_iters,
                           inception=args.inception, dinov2=args.dinov2, reference=args.ref,
                           micro_batch=args.micro_batch, save_samples=args.save_samples, log=log,
                           metrics=None if args.metric is None else _list(str)(args.metric))
    # grids found on the model's trajectories last: they are by far the slowest cells
    plan = [(s, n, g, 1.0) for s in solvers for g in grids if g not in ("gits", "learned", "ld3") for n in nfes]
    plan += [(s, n, skip_grid, r) for s in skip_solvers for r in skips for n in nfes]
    for slow in ("gits", "learned", "ld3"):
        if slow in grids:
            plan += [(s, n, slow, 1.0) for s in (learned_solvers if slow != "gits" else solvers) for n in nfes]
    cells = []
    for i, (s, n, g, r) in enumerate(plan):
        cell = suite.cell(s, n, g, r)
        cells.append(cell)
        scores = " ".join(f"{name} {value:.3f}" for name, value in (
            ("FD", cell.fd), ("acc", cell.accuracy), ("FID", cell.fid), ("FD_DINOv2", cell.fd_dinov2))
            if np.isfinite(value))
        log(f"{i + 1}/{len(plan)} {cell.solver} NFE {n} {g} rho_bottom {r}: {scores} err {cell.error:.4f} "
            f"({cell.seconds:.2f} s)")
        evaluate.write_csv(cells, out / "results.csv")  # partial results, in the folder that replaces --out
    base = suite.baselines()
    notes = [
        f"Model `{args.model}` ({suite.path.name}), {args.samples} samples per cell (labels "
        f"cycling over the classes), seed {args.seed}; reference: Heun, {args.ref_steps} Karras steps to "
        f"sigma = 0 (NFE {2 * args.ref_steps - 1}), same noises.",
        f"Total wall time of this run: {time.perf_counter() - start:.0f} s.",
    ]
    if "reference_fd" in base:
        notes.insert(1, f"Digits FD of the reference samples: {base['reference_fd']:.3f} (accuracy "
                        f"{base['reference_accuracy']:.3f})" + (
                            f"; of {min(args.samples, 1797)} real digits against all 1797: "
                            f"{base['real_subset_fd']:.3f}." if "real_subset_fd" in base else "."))
    for metric, name in (("fid", "FID"), ("fd_dinov2", "FD_DINOv2")):
        if f"reference_{metric}" in base:
            notes.insert(1, f"{name} of the reference samples: {base[f'reference_{metric}']:.2f}.")
    text = evaluate.write_markdown(cells, out / "results.md", "jdiffsample eval", notes)
    evaluate.save_grids(suite.grid_log, out / "grids.json")
    (out / "baselines.json").write_text(json.dumps(base, indent=1))
    if not args.no_plot:
        evaluate.plot(cells, out / "quality_vs_nfe.png")
    return text

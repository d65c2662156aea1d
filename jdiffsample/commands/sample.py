"""``jdiffsample sample``: many samples from a network into sharded ``.npz`` files, resumably.

    jdiffsample sample --model digits --solver unipc --nfe 10 --num 50000 --batch 256 --out runs/digits

Mirrors :func:`jdiffsample.pipeline.generate` (read :mod:`jdiffsample.pipeline` for the output
layout, determinism and resuming). The solver flags are generated from the solver registry; a flag
is passed only when given, and only to a solver that takes it. Rerunning the same command finishes
an interrupted run; ``--export`` then writes PNG files or one merged ``.npz``. On several hosts add
``--distributed`` (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from jdiffsample.commands import _solver_flags

HELP = "generate samples into sharded .npz files (deterministic, resumable, multi-device and multi-host)"


def add_arguments(parser) -> None:
    from jdiffsample.pipeline.settings import grid_names

    parser.add_argument("--model", required=True,
                        help="checkpoint folder (jdiffsample convert FAMILY SRC DST) or a bundled model name")
    parser.add_argument("--out", required=True, help="output folder (created; rerun to resume)")
    parser.add_argument("--num", type=int, default=50000, help="number of samples (default 50000)")
    parser.add_argument("--solver", default="unipc", help=f"one of: {_solver_flags.solver_help()} (default unipc)")
    parser.add_argument("--nfe", type=int, default=10, help="model calls per sample (default 10)")
    parser.add_argument("--grid", default="logsnr", choices=grid_names(),
                        help="time grid (default logsnr; 'diffusers': a Stable Diffusion folder's scheduler timesteps)")
    parser.add_argument("--skip-tuning", type=float, default=None, metavar="RHO_BOTTOM",
                        help="Skip-Tuning: scale of the deepest skip (rho_top = 1), e.g. 0.8")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--class-labels", default=None, metavar="random|N|N,N,...",
                        help="class-conditional models: random (default), one label, or a list cycled by index")
    parser.add_argument("--guidance", type=float, default=None, metavar="W",
                        help="guidance weight w of D_u + w (D_c - D_u): classifier-free (the model's null label), or "
                             "autoguidance with --guide-model (default: no guidance)")
    parser.add_argument("--guide-model", default=None, metavar="DIR",
                        help="autoguidance: a second network of the same family as the guide")
    parser.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                        help="apply guidance only for noise levels sigma in [LO, HI]")
    parser.add_argument("--guidance-channels", default="default", metavar="all|N",
                        help="guide only the first N channels (default: the model family's; DiT's original "
                             "sampler guides 3 of its 4 latent channels; 'all' for every channel)")
    parser.add_argument("--vae", default=None, metavar="DIR",
                        help="latent models: the converted VAE that decodes the samples (default: the one "
                             "recorded at conversion)")
    parser.add_argument("--latents-only", action="store_true",
                        help="latent models: write the float32 latents instead of decoded images")
    text = parser.add_argument_group("text models (Stable Diffusion)")
    text.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                      help="a prompt (repeat for several: sample i uses prompt i mod P)")
    text.add_argument("--prompt-file", default=None, metavar="FILE", help="prompts, one per line")
    text.add_argument("--negative-prompt", action="append", default=None, metavar="TEXT",
                      help="negative prompt(s) for classifier-free guidance (cycled like the prompts)")
    text.add_argument("--height", type=int, default=None, help="image height in pixels (a multiple of 8)")
    text.add_argument("--width", type=int, default=None, help="image width in pixels (a multiple of 8)")
    text.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                      help="rescale the guided prediction (Lin et al. 2023), e.g. 0.7")
    parser.add_argument("--classifier", default=None, metavar="DIR",
                        help="classifier guidance: a converted noisy-image classifier (jdiffsample convert adm-classifier)")
    parser.add_argument("--classifier-scale", type=float, default=None, metavar="S",
                        help="classifier guidance weight (guided-diffusion's --classifier_scale)")
    parser.add_argument("--upsampler", default=None, metavar="DIR",
                        help="two stages: upsample this model's images with a converted upsampler (adm-superres)")
    parser.add_argument("--upsampler-nfe", type=int, default=None, metavar="N",
                        help="model calls of the upsampler stage (default: --nfe)")
    parser.add_argument("--threshold", default=None, choices=("static", "dynamic"),
                        help="pixel-space VP models: clip the data predictions to [-1, 1] (static) or threshold "
                             "them dynamically (Saharia et al., as DPM-Solver/diffusers define it)")
    parser.add_argument("--threshold-ratio", type=float, default=0.995, help="dynamic thresholding percentile")
    parser.add_argument("--threshold-max", type=float, default=1.0, help="dynamic thresholding maximum value")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the network's compute dtype (default float32)")
    parser.add_argument("--batch", type=int, default=64,
                        help="samples per call over this process's devices (default 64); no effect on images")
    parser.add_argument("--micro-batch", type=int, default=64,
                        help="samples per network call on one device (default 64); the images depend on it, "
                             "not on --batch or the devices; on accelerators use e.g. the per-device batch")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per .npz file (default 1000)")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="afterwards, export all samples: PATH.npz (one file) or a folder of PNGs")
    parser.add_argument("--no-preview", action="store_true", help="do not write grid.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    _solver_flags.add(parser)
    parser.add_argument("--deterministic-gpu", action=argparse.BooleanOptionalAction, default=True,
                        help="GPUs: deterministic XLA kernels (XLA_FLAGS=--xla_gpu_deterministic_ops=true), "
                             "so reruns and other batch sizes give the same images (about 3%% slower); "
                             "default on")

    dist = parser.add_argument_group("several hosts (jax.distributed.initialize)")
    dist.add_argument("--distributed", action="store_true",
                      help="initialize jax.distributed; the flags below are auto-detected on TPU, Slurm, Open MPI")
    dist.add_argument("--coordinator", help="coordinator address host:port (process 0)")
    dist.add_argument("--num-processes", type=int, help="number of processes")
    dist.add_argument("--process-id", type=int, help="this process's index")


def parse_labels(text: str | None):
    """``None``, ``"random"``, ``"7"`` or ``"1,2,3"`` -> None, 'random', 7 or [1, 2, 3]."""
    if text is None or text == "random":
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--class-labels must be 'random', a label or a comma-separated list, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def parse_interval(text: str | None):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance-interval must be LO,HI (two numbers), got {text!r}") from None
    return lo, hi


def read_prompts(prompts, prompt_file):
    """The prompts of ``--prompt`` (repeated) and ``--prompt-file`` (one per line), or None."""
    if prompts is not None and prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return prompts
    try:
        lines = [line.rstrip("\n") for line in open(prompt_file, encoding="utf-8")]
    except OSError as err:
        raise ValueError(f"--prompt-file: cannot read {prompt_file}: {err.strerror}") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"--prompt-file {prompt_file} holds no prompt")
    return lines


def parse_channels(text: str):
    if text == "default":
        return "default"
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--guidance-channels must be 'all' or a number of channels, got {text!r}") from None


def deterministic_gpu_kernels() -> None:
    """Ask XLA for deterministic GPU kernels, unless XLA_FLAGS already says otherwise.

    XLA's GPU autotuner picks among kernels by timing them, so two compilations of the same
    program can round differently (measured on an H200: 1% of the digits model's pixels one level
    apart between two identical runs). Must run before JAX starts its backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def run(args) -> int:
    if args.deterministic_gpu:
        deterministic_gpu_kernels()
    options = _solver_flags.options(args, args.solver)
    labels = parse_labels(args.class_labels)
    interval = parse_interval(args.guidance_interval)
    channels = parse_channels(args.guidance_channels)
    prompts = read_prompts(args.prompt, args.prompt_file)
    if args.distributed and args.export:
        raise ValueError("--export needs every host's shards: export after all hosts finish, by rerunning "
                         "the same command without --distributed")
    if args.distributed:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")

    from jdiffsample import pipeline

    summary = pipeline.generate(
        args.model, args.out, num=args.num, solver=args.solver, nfe=args.nfe, grid=args.grid, options=options,
        skip_tuning=args.skip_tuning, guidance=args.guidance, guide=args.guide_model, guidance_interval=interval,
        class_labels=labels, seed=args.seed, batch=args.batch, micro_batch=args.micro_batch, dtype=args.dtype,
        vae=args.vae, latents_only=args.latents_only, guidance_channels=channels, threshold=args.threshold,
        threshold_ratio=args.threshold_ratio, threshold_max=args.threshold_max, classifier=args.classifier,
        classifier_scale=args.classifier_scale, upsampler=args.upsampler, upsampler_nfe=args.upsampler_nfe,
        prompts=prompts, negative_prompts=args.negative_prompt, height=args.height, width=args.width,
        guidance_rescale=args.guidance_rescale,
        shard_size=args.shard_size, preview=not args.no_preview, log=None if args.quiet else sys.stderr,
    )
    if args.export and summary.process_index == 0:
        if args.export.endswith(".npz"):
            path = pipeline.export_npz(args.out, args.export)
            message = f"exported {args.num} samples to {path}"
        else:
            count = pipeline.export_png(args.out, args.export)
            message = f"exported {count} PNG files to {args.export}"
        if not args.quiet:
            print(f"sample: {message}", file=sys.stderr)
    return 0

"""``jdiffsample fid``: FID and FD_DINOv2 of a set of images against reference statistics.

    jdiffsample fid runs/edm-cifar10 --ref fid-refs/cifar10-32x32.npz --inception pt_inception-2015-12-05-6726825d.pth
    jdiffsample fid out/ --ref img512.pkl --metric fid,fd_dinov2 --dinov2 dinov2_vitl14_pretrain.pth
    jdiffsample fid data/imagenet64-pngs --save-stats my-ref.pkl --metric fid,fd_dinov2   # statistics only

PATH is a ``jdiffsample sample`` run folder, a folder of PNG files (searched recursively) or an
``.npz`` whose ``arr_0`` holds uint8 NHWC images. REF is a statistics file (pytorch-fid's or EDM's
``.npz``, EDM2's ``.pkl``), an ADM reference batch (``.npz``: images and FID statistics), or images
like PATH. The metrics default to those REF has statistics for (FID for images). Prints one line per
metric (``fid 2.34512``), or a JSON object with ``--json``. See :mod:`jdiffsample.fid`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_LONG_RUN = 1000  # images: a progress bar from this many on


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="PATH", help="a run folder, a folder of PNGs, or an .npz with arr_0")
    parser.add_argument("--ref", default=None, metavar="REF",
                        help="reference: statistics (.npz with mu/sigma, EDM2 .pkl), an ADM reference batch, "
                             "or images (run folder, PNG folder, .npz)")
    parser.add_argument("--metric", default=None, metavar="fid,fd_dinov2",
                        help="metrics, comma-separated (default: those REF has statistics for; fid for images)")
    parser.add_argument("--inception", default=None, metavar="FILE",
                        help="pytorch-fid's InceptionV3 weights (default: ./pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--dinov2", default=None, metavar="FILE",
                        help="DINOv2's released weights (default: ./dinov2_vitl14_pretrain.pth)")
    parser.add_argument("--save-stats", default=None, metavar="OUT",
                        help="also write PATH's statistics: .pkl (EDM2's layout, every metric) or .npz (pytorch-fid's, "
                             "one metric); another suffix takes REF's format")
    parser.add_argument("--num", type=int, default=None, metavar="N",
                        help="use the first N images of PATH (default: all)")
    parser.add_argument("--batch", type=int, default=64, metavar="B",
                        help="images per step over all local devices (default 64)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of one line per metric")


def _metrics(text: str | None, default) -> tuple[str, ...]:
    from jdiffsample.fid import METRICS

    if text is None:
        return tuple(default)
    chosen = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise ValueError(f"--metric: unknown metric {', '.join(unknown) or repr(text)} (known: {', '.join(METRICS)})")
    return chosen


def _save_format(out: Path, ref, metrics) -> str:
    """OUT's own suffix, else REF's format (several metrics need EDM2's .pkl)."""
    suffix = out.suffix.lower().lstrip(".")
    if suffix in ("npz", "pkl"):
        return suffix
    return "pkl" if (ref is not None and ref.format == "pkl") or len(metrics) > 1 else "npz"


def run(args) -> int:
    # the feature networks need JAX and Flax: imported here, not when the CLI starts
    from jdiffsample import fid, imagesets
    from jdiffsample.pipeline.progress import Progress

    if args.ref is None and args.save_stats is None:
        raise ValueError("give --ref REF (statistics or images to compare with), or --save-stats OUT for statistics only")
    if args.batch < 1:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    if args.num is not None and args.num < 2:
        raise ValueError(f"--num must be at least 2, got {args.num}")
    ref = fid.load_reference(args.ref) if args.ref is not None else None
    metrics = _metrics(args.metric, ref.metrics if ref is not None else ("fid",))
    if ref is not None:
        ref.check(metrics)
    save_format = _save_format(Path(args.save_stats), ref, metrics) if args.save_stats else None
    if save_format == "npz" and len(metrics) > 1:
        raise ValueError(f"--save-stats {args.save_stats}: an .npz holds one metric's statistics; use a .pkl for "
                         f"{', '.join(metrics)}")
    images = imagesets.open_images(args.path, args.num)
    weights = {"fid": args.inception, "fd_dinov2": args.dinov2}
    networks = {m: fid.load_network(m, weights[m], batch_size=args.batch) for m in metrics}
    if ref is not None:
        ref.check(metrics, networks)

    def progress(image_set, what):
        bar = Progress(image_set.count, sys.stderr, f"fid: {what} ") if image_set.count >= _LONG_RUN else None
        return bar.update if bar else None

    stats = fid.image_stats(images, networks, args.batch, progress(images, "images"))
    if args.save_stats:
        fid.write_stats(args.save_stats, stats, images.count, save_format)
    if ref is None:
        return 0
    computed = ref.images is not None and any(m not in ref.stats for m in metrics)
    ref_stats = ref.stats_for(networks, args.batch, progress(ref.images, "reference") if computed else None)
    values = {m: fid.frechet(stats[m], ref_stats[m]) for m in metrics}
    if args.json:
        print(json.dumps({**values, "num_images": images.count, "path": str(args.path), "ref": str(args.ref),
                          "ref_num_images": ref.images.count if computed else ref.num_images}))
    else:
        for m, value in values.items():
            print(f"{m} {value:.6g}")
    return 0

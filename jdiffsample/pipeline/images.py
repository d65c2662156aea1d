"""Images out: PNG encoding (no dependencies), preview grids, and exports of a finished run.

:func:`export_npz` merges the shards into the single ``.npz`` that ADM's
``evaluations/evaluator.py`` reads; :func:`export_png` writes one PNG per image in the folder
layout of EDM's ``generate.py`` (``000000/000123.png``), which EDM's ``fid.py`` reads.
"""

from __future__ import annotations

import math
import shutil
import struct
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np

from jdiffsample.nets.formats.checkpoint import replace_folder
from jdiffsample.pipeline import output

__all__ = ["png_bytes", "write_png", "image_grid", "write_preview", "check_export", "export_npz", "export_png"]

PREVIEW_COUNT = 64
_PREVIEW_MIN_SIDE = 32  # upscale tiny images in the preview to at least this many pixels


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` as PNG file contents."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"a PNG image must be uint8 [H, W], [H, W, 1] or [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    color = 0 if image.ndim == 2 else 2  # greyscale or RGB, 8 bits per sample
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def write_png(path, image: np.ndarray) -> None:
    """Write a uint8 image (``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``) as a PNG file."""
    Path(path).write_bytes(png_bytes(image))


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 images ``[n, H, W, C]`` into one image, nearly square, with ``pad`` black pixels
    between tiles; images smaller than 32 pixels are enlarged (nearest neighbour)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    scale = max(1, -(-_PREVIEW_MIN_SIDE // max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for k, image in enumerate(images):
        r, q = divmod(k, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = image
    return grid


def write_preview(out: Path, shards: list[dict], layout) -> None:
    """``grid.png`` of the first images, from the leading shards that are finished and verified
    (``layout``: :func:`jdiffsample.pipeline.output.shard_layout`)."""
    parts, count = [], 0
    for shard in shards:
        if count >= PREVIEW_COUNT or not (out / shard["file"]).is_file():
            break
        try:
            parts.append(output.verify_shard(out, shard, *layout)[0])
        except output.BadShard:
            break
        count += len(parts[-1])
    if parts:
        grid = image_grid(np.concatenate(parts)[:PREVIEW_COUNT])
        output.atomic_write(out / output.PREVIEW, lambda f: f.write(png_bytes(grid)))


def check_export(out, path, overwrite: bool) -> None:
    """Refuse an export destination before any work: an existing one without ``overwrite``, a
    folder where a ``.npz`` goes or a file where a PNG folder goes, or a place inside the run."""
    out, path = Path(out).absolute(), Path(path).absolute()
    if path == out or out in path.parents:
        raise ValueError(f"--export {path} lies inside the run folder {out}; export elsewhere")
    npz = path.suffix == ".npz"
    if path.exists():
        if npz and path.is_dir():
            raise ValueError(f"--export {path} is a folder; an export ending in .npz is one file")
        if not npz and not path.is_dir():
            raise ValueError(f"--export {path} is a file; a PNG export is a folder (end the path with .npz for "
                             f"one file)")
        if not overwrite:
            raise FileExistsError(f"--export {path} already exists; give --overwrite to replace it whole")
        if not npz and any(path.iterdir()) and not _is_png_export(path):
            raise ValueError(f"--export {path} holds files other than an earlier PNG export; --overwrite would "
                             f"delete them: choose another folder")


def _is_png_export(folder: Path) -> bool:
    """Whether ``folder`` holds only what :func:`export_png` writes (``NNNNNN/NNNNNN.png``)."""
    for sub in folder.iterdir():
        if not (sub.is_dir() and sub.name.isdigit() and len(sub.name) == 6):
            return False
        if any(not (f.suffix == ".png" and f.stem.isdigit()) for f in sub.iterdir()):
            return False
    return True


def export_npz(out, path, *, overwrite: bool = False) -> Path:
    """Merge the shards of ``out`` into one ``.npz`` (``arr_0`` images, ``arr_1`` labels), the
    input of ADM's evaluator. Every shard is verified first; streams shard by shard (memory: one
    shard); written atomically; an existing ``path`` is replaced only with ``overwrite``."""
    out, path = Path(out), Path(path)
    check_export(out, path, overwrite)
    manifest = output.read_manifest(out)
    shards = output.finished_shards(out)  # verified: each holds exactly its recorded count
    layout = output.shard_layout(manifest)
    shape, dtype, conditional = layout
    num = manifest["settings"]["num"]

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            columns = [("arr_0", 0, np.dtype(dtype), (num, *shape))]
            if conditional:
                columns.append(("arr_1", 1, np.dtype(np.int32), (num,)))
            for name, col, kind, full in columns:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(
                        member, dict(descr=kind.str, fortran_order=False, shape=full))
                    for s in shards:
                        part = output.verify_shard(out, s, *layout)[col]
                        member.write(np.ascontiguousarray(part, kind).tobytes())

    path.parent.mkdir(parents=True, exist_ok=True)
    output.atomic_write(path, write)
    return path


def export_png(out, png_dir, *, overwrite: bool = False) -> int:
    """Write every image of ``out`` as ``png_dir/{i - i % 1000:06d}/{i:06d}.png`` (EDM's layout,
    read by EDM's ``fid.py``), into a folder beside ``png_dir`` that replaces it whole at the end
    (an existing ``png_dir`` only with ``overwrite``). Returns the number of files written."""
    out, png_dir = Path(out), Path(png_dir).absolute()
    check_export(out, png_dir, overwrite)
    manifest = output.read_manifest(out)
    if manifest["settings"].get("latents_only"):
        raise ValueError(f"{out} holds latents, not images: decode them first (rerun without --latents-only)")
    layout = output.shard_layout(manifest)
    shards = output.finished_shards(out)
    png_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_dir.parent / f".{png_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    count = 0
    try:
        for s in shards:
            images, _ = output.verify_shard(out, s, *layout)
            for i, image in zip(range(s["start"], s["stop"]), images):
                sub = tmp / f"{i - i % 1000:06d}"
                sub.mkdir(exist_ok=True)
                write_png(sub / f"{i:06d}.png", image)
                count += 1
        replace_folder(tmp, png_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count

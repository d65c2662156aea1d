"""Images out: PNG encoding (no dependencies), preview grids, and exports of a finished run.

:func:`export_npz` merges the shards into the single ``.npz`` that ADM's
``evaluations/evaluator.py`` reads; :func:`export_png` writes one PNG per image in the folder
layout of EDM's ``generate.py`` (``000000/000123.png``), which EDM's ``fid.py`` reads.
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from jdiffsample.pipeline import output

__all__ = ["png_bytes", "write_png", "image_grid", "write_preview", "export_npz", "export_png"]

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


def write_preview(out: Path, shards: list[dict]) -> None:
    """``grid.png`` of the first images, from the leading shards that are finished."""
    parts, count = [], 0
    for shard in shards:
        if count >= PREVIEW_COUNT or not (out / shard["file"]).is_file():
            break
        parts.append(output.read_shard(out / shard["file"])[0])
        count += len(parts[-1])
    if parts:
        grid = image_grid(np.concatenate(parts)[:PREVIEW_COUNT])
        output.atomic_write(out / output.PREVIEW, lambda f: f.write(png_bytes(grid)))


def export_npz(out, path) -> Path:
    """Merge the shards of ``out`` into one ``.npz`` (``arr_0`` images, ``arr_1`` labels), the
    input of ADM's evaluator. Streams shard by shard (memory: one shard); written atomically."""
    out, path = Path(out), Path(path)
    shards = output.finished_shards(out)
    settings = output.read_manifest(out)["settings"]
    shape = tuple(settings["output_shape"])
    sample_dtype = np.float32 if settings.get("latents_only") else np.uint8
    num = settings["num"]
    conditional = settings["class_labels"] is not None

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            columns = [("arr_0", 0, sample_dtype, (num, *shape))]
            if conditional:
                columns.append(("arr_1", 1, np.int32, (num,)))
            for name, col, dtype, full in columns:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(
                        member, dict(descr=np.dtype(dtype).str, fortran_order=False, shape=full))
                    for s in shards:
                        member.write(np.ascontiguousarray(output.read_shard(out / s["file"])[col], dtype).tobytes())

    path.parent.mkdir(parents=True, exist_ok=True)
    output.atomic_write(path, write)
    return path


def export_png(out, png_dir) -> int:
    """Write every image of ``out`` as ``png_dir/{i - i % 1000:06d}/{i:06d}.png`` (EDM's layout,
    read by EDM's ``fid.py``). Returns the number of files written."""
    out, png_dir = Path(out), Path(png_dir)
    if output.read_manifest(out)["settings"].get("latents_only"):
        raise ValueError(f"{out} holds latents, not images: decode them first (rerun without --latents-only)")
    count = 0
    for s in output.finished_shards(out):
        images, _ = output.read_shard(out / s["file"])
        for i, image in zip(range(s["start"], s["stop"]), images):
            sub = png_dir / f"{i - i % 1000:06d}"
            sub.mkdir(parents=True, exist_ok=True)
            write_png(sub / f"{i:06d}.png", image)
            count += 1
    return count

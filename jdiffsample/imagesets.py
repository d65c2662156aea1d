"""Sets of images to score, read in batches without holding them all: run folders, PNG folders, ``.npz``.

:func:`open_images` takes

* a **run folder** of ``jdiffsample sample`` (``manifest.json`` and shards ``samples_XXXXXX.npz``);
* a **folder of PNG files**, searched recursively (EDM's ``generate.py`` writes ``000000/000123.png``),
  in sorted path order;
* an **``.npz`` file** whose ``arr_0`` is uint8 ``[N, H, W, C]`` (ADM's sample and reference batches,
  ``jdiffsample sample --export PATH.npz``);
* or an array already in memory.

Everything that can be wrong is found when the set is opened, before anything is computed: fewer
than 2 images, images of different sizes or channel counts, PNG files this reader does not decode,
an unfinished run. Images come out as uint8 NHWC with 1 or 3 channels (an alpha channel is dropped,
as PIL's ``convert('RGB')`` does).

PNG files are decoded here, with :mod:`zlib` and JAX (no imaging library): 8-bit greyscale,
grey+alpha, RGB and RGBA, not interlaced (what PIL, EDM, ADM and jdiffsample write). The row filters
are undone for a whole batch of images at once along the images' anti-diagonals (each pixel depends
only on its left, upper and upper-left neighbours): ``H + W`` steps of one compiled loop per batch,
on the default device, not ``H * W`` steps of Python.
"""

from __future__ import annotations

import functools
import struct
import zipfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["ImageSet", "open_images", "read_png", "decode_pngs", "png_info", "run_shards"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_OTHER_IMAGES = (".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def run_shards(folder) -> list[Path]:
    """The shard files of a finished ``jdiffsample sample`` run (the one place that asks the
    pipeline about its output layout)."""
    from jdiffsample.pipeline import output  # start-up time: the pipeline package loads the samplers

    folder = Path(folder)
    return [folder / shard["file"] for shard in output.finished_shards(folder)]


# ---------------------------------------------------------------------------------------------
# PNG


def png_info(path) -> tuple[int, int, int]:
    """``(height, width, channels)`` from a PNG file's header; ``ValueError`` for a PNG this
    module does not decode (palette, 16-bit, interlaced) or a file that is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR" or len(head) < 33:
        raise ValueError(f"{path} is not a PNG file")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if depth != 8 or color not in _CHANNELS or interlace:
        kind = {3: "palette"}.get(color, f"colour type {color}")
        raise ValueError(f"{path}: {depth}-bit {kind}{', interlaced' if interlace else ''} PNG; only 8-bit "
                         f"greyscale, grey+alpha, RGB and RGBA non-interlaced PNGs are read")
    if width < 1 or height < 1:
        raise ValueError(f"{path}: a PNG of {width}x{height} pixels")
    return height, width, _CHANNELS[color]


def _filtered_rows(path, shape) -> np.ndarray:
    """The decompressed image data of a PNG (rows led by their filter byte), ``[H, 1 + W*C]``."""
    data = Path(path).read_bytes()
    pos, idat = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    h, w, c = shape
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise ValueError(f"{path}: corrupt PNG image data ({err})") from None
    if len(raw) != h * (1 + w * c):
        raise ValueError(f"{path}: PNG image data is {len(raw)} bytes, {h}x{w}x{c} needs {h * (1 + w * c)}")
    return np.frombuffer(raw, np.uint8).reshape(h, 1 + w * c)


@functools.partial(jax.jit, static_argnums=1)
def _unfilter_sheared(rows, channels: int):
    """Undo the PNG row filters of a batch ``[B, H, 1 + W*C]`` (uint8) -> ``[B, H, W, C]`` uint8.

    Pixel ``(r, x)`` is its filtered bytes plus a prediction from ``a`` (left), ``b`` (up) and ``c``
    (up-left), chosen by its row's filter byte. On the sheared grid ``s[r + x + 1, r] = pixel[r, x]``
    every anti-diagonal is one slice, and slice ``k`` needs only slices ``k - 1`` (``a``, and ``b``
    one row up) and ``k - 2`` (``c``): ``H + W`` sequential steps, each over a whole batch."""
    n, h, length = rows.shape
    w = (length - 1) // channels
    kinds = rows[:, :, 0][:, :, None]
    filt = rows[:, :, 1:].reshape(n, h, w, channels).astype(jnp.int16)
    r = jnp.arange(h)[None, :]
    x = jnp.arange(h + w)[:, None] - 1 - r  # [D, H]: the column of row r on diagonal slice k
    inside = ((x >= 0) & (x < w)).astype(jnp.int16)[:, None, :, None]
    value = jnp.moveaxis(filt[:, r, jnp.clip(x, 0, w - 1)], 0, 1) * inside  # [D, B, H, C], 0 off the image

    def step(k, s):
        prev = lax.dynamic_index_in_dim(s, k - 1, 0, keepdims=False)  # [B, H + 1, C]: row 0 is the border
        prev2 = lax.dynamic_index_in_dim(s, k - 2, 0, keepdims=False)  # slice 0 is all zeros
        a, b, c = prev[:, 1:], prev[:, :-1], prev2[:, :-1]
        pa, pb, pc = jnp.abs(b - c), jnp.abs(a - c), jnp.abs(a + b - 2 * c)
        paeth = jnp.where((pa <= pb) & (pa <= pc), a, jnp.where(pb <= pc, b, c))
        pred = jnp.select([kinds == 1, kinds == 2, kinds == 3, kinds == 4], [a, b, (a + b) >> 1, paeth], 0)
        new = ((lax.dynamic_index_in_dim(value, k, 0, keepdims=False) + pred) & 255) * inside[k]
        return lax.dynamic_update_index_in_dim(s, jnp.pad(new, ((0, 0), (1, 0), (0, 0))), k, 0)

    s = lax.fori_loop(2, h + w, step, jnp.zeros((h + w, n, h + 1, channels), jnp.int16).at[1].set(
        jnp.pad(value[1], ((0, 0), (1, 0), (0, 0)))))
    cols = jnp.arange(w)[None, :] + jnp.arange(h)[:, None] + 1
    return jnp.moveaxis(s[cols, :, 1 + jnp.arange(h)[:, None]], 2, 0).astype(jnp.uint8)


def _unfilter(rows: np.ndarray, channels: int, where: str) -> np.ndarray:
    """``[B, H, 1 + W*C]`` filtered rows -> uint8 ``[B, H, W, C]``."""
    kinds = rows[:, :, 0]
    if kinds.max(initial=0) > 4:
        raise ValueError(f"{where}: unknown PNG row filter {int(kinds.max())}")
    if not kinds.any():  # no filtering at all (jdiffsample's own PNGs)
        return rows[:, :, 1:].reshape(*rows.shape[:2], -1, channels).copy()
    return np.asarray(_unfilter_sheared(rows, channels))


def decode_pngs(paths, shape) -> np.ndarray:
    """Decode PNG files that all have header shape ``(H, W, C)`` -> uint8 ``[N, H, W, C]`` (with the
    file's own channels: 1, 2, 3 or 4)."""
    paths = list(paths)
    if not paths:
        return np.zeros((0, *shape), np.uint8)
    rows = np.stack([_filtered_rows(p, shape) for p in paths])
    return _unfilter(rows, shape[2], str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}")


def read_png(path) -> np.ndarray:
    """One PNG file -> uint8 ``[H, W, C]`` with its own channels (1 grey, 2 grey+alpha, 3, 4)."""
    return decode_pngs([Path(path)], png_info(path))[0]


def _as_image_channels(images: np.ndarray) -> np.ndarray:
    """Drop an alpha channel (2 -> 1, 4 -> 3), as PIL's ``convert('RGB')`` does."""
    return images[..., :1] if images.shape[-1] == 2 else images[..., :3] if images.shape[-1] == 4 else images


# ---------------------------------------------------------------------------------------------
# .npz members, read a few images at a time


def _read_header(f):
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream ``f``, left at its first byte of data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _npz_header(path, name: str = "arr_0"):
    """``(shape, fortran_order, dtype)`` of member ``name`` of an ``.npz`` file."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            return _read_header(f)
    except KeyError:
        raise ValueError(f"{path} has no array {name!r} (uint8 images [N, H, W, C] expected in arr_0)") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from None


def _npz_batches(path, stop: int, size: int, name: str = "arr_0"):
    """The first ``stop`` images of ``name`` in ``path``, ``size`` at a time (a C-order array)."""
    with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
        shape, _, dtype = _read_header(f)
        item = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for i in range(0, stop, size):
            n = min(size, stop - i)
            data = f.read(n * item)
            if len(data) != n * item:
                raise ValueError(f"{path}: {name} is truncated")
            yield np.frombuffer(data, dtype).reshape(n, *shape[1:])


# ---------------------------------------------------------------------------------------------
# image sets


class ImageSet:
    """uint8 NHWC images to read in batches: ``count``, ``shape`` ``(H, W, C)`` (C = 1 or 3),
    ``batches(size)``. Build with :func:`open_images`."""

    def __init__(self, where: str, kind: str, parts: list, shape: tuple, read):
        self.where, self.kind, self.shape = where, kind, tuple(int(s) for s in shape)
        self._parts, self._read = parts, read  # parts: [(item, count)]; read(item, count, size)
        self.count = sum(n for _, n in parts)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"ImageSet({self.where!r}, {self.kind}, {self.count} x {self.shape})"

    def take(self, n: int) -> ImageSet:
        """The first ``n`` images (all if there are fewer)."""
        parts, left = [], int(n)
        for item, count in self._parts:
            if left <= 0:
                break
            parts.append((item, min(count, left)))
            left -= count
        return ImageSet(self.where, self.kind, parts, self.shape, self._read)

    def batches(self, size: int):
        """Batches of uint8 ``[<= size, H, W, C]``, in order (only the last may be smaller)."""
        pending, have = [], 0
        for item, count in self._parts:
            for chunk in self._read(item, count, size):
                chunk = _as_image_channels(np.asarray(chunk))
                pending.append(chunk)
                have += len(chunk)
                while have >= size:
                    joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                    yield joined[:size]
                    rest = joined[size:]
                    pending, have = ([rest] if len(rest) else []), len(rest)
        if have:
            yield np.concatenate(pending) if len(pending) > 1 else pending[0]

    def array(self) -> np.ndarray:
        """All images in one array."""
        return np.concatenate(list(self.batches(max(self.count, 1)))) if self.count else np.zeros((0, *self.shape), np.uint8)


def _check_images(where: str, shape: tuple, dtype) -> tuple:
    """``(H, W, C)`` of uint8 image arrays ``[N, H, W(, C)]``, C in 1..4 (alpha dropped later)."""
    if np.dtype(dtype) != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 2, 3, 4)):
        raise ValueError(f"{where}: images must be uint8 [N, H, W, C] with 1 or 3 channels, got "
                         f"{np.dtype(dtype)} {tuple(shape)}")
    return tuple(shape[1:]) if len(shape) == 4 else (*shape[1:], 1)


def _npz_reader(item, count, size):
    path, shape = item
    for chunk in _npz_batches(path, count, size):
        yield chunk.reshape(len(chunk), *shape)


def _npz_set(where: str, kind: str, files: list[Path]) -> ImageSet:
    parts, shape = [], None
    for path in files:
        dims, fortran, dtype = _npz_header(path)
        this = _check_images(str(path), dims, dtype)
        if fortran:
            raise ValueError(f"{path}: arr_0 is stored in Fortran order; write it with np.savez (C order)")
        if shape is not None and this != shape:
            raise ValueError(f"{where}: images of different sizes ({shape} in {files[0].name}, {this} in {path.name})")
        shape = this
        parts.append(((path, this), int(dims[0])))
    return ImageSet(where, kind, parts, _shown(shape), _npz_reader)


def _shown(shape) -> tuple:
    """The channels images come out with (alpha dropped)."""
    return (*shape[:2], {2: 1, 4: 3}.get(shape[2], shape[2]))


def _png_set(folder: Path) -> ImageSet:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", *_OTHER_IMAGES) and p.is_file())
    files = [p for p in found if p.suffix.lower() == ".png"]
    others = [p for p in found if p.suffix.lower() != ".png"]
    if others:
        raise ValueError(f"{folder}: {len(others)} {others[0].suffix} image{'s' * (len(others) > 1)} (e.g. "
                         f"{others[0].relative_to(folder)}); only PNG files are read (or pass an .npz with arr_0)")
    if not files:
        raise ValueError(f"{folder} has no PNG files and no manifest.json (neither an image folder nor a run folder)")
    shape = png_info(files[0])
    for path in files[1:]:
        this = png_info(path)
        if this != shape:
            raise ValueError(f"{folder}: images of different sizes or channels ({files[0].relative_to(folder)} is "
                             f"{shape[1]}x{shape[0]}x{shape[2]}, {path.relative_to(folder)} is "
                             f"{this[1]}x{this[0]}x{this[2]}); resize them to one size first")

    def read(chunk_files, count, size):
        for i in range(0, count, size):
            yield decode_pngs(chunk_files[i:min(count, i + size)], shape)

    return ImageSet(str(folder), "png", [(files, len(files))], _shown(shape), read)


def open_images(source, limit: int | None = None, minimum: int = 2) -> ImageSet:
    """An :class:`ImageSet` from a run folder, a PNG folder, an ``.npz`` (``arr_0``) or an array;
    ``limit``: use the first ``limit`` images; at least ``minimum`` images are required."""
    if isinstance(source, np.ndarray):
        shape = _check_images("images", source.shape, source.dtype)
        array = source.reshape(len(source), *shape)
        images = ImageSet("images", "array", [(array, len(array))], _shown(shape),
                          lambda a, count, size: (a[i:min(count, i + size)] for i in range(0, count, size)))
    else:
        path = Path(source)
        if path.is_dir():
            images = (_npz_set(str(path), "run", run_shards(path)) if (path / "manifest.json").is_file()
                      else _png_set(path))
        elif path.is_file():
            if path.suffix.lower() == ".png":
                raise ValueError(f"{path} is one PNG file; give the folder that holds the images")
            images = _npz_set(str(path), "npz", [path])
        else:
            raise FileNotFoundError(f"no images at {path} (a run folder, a folder of PNGs or an .npz with arr_0)")
    if limit is not None:
        if limit > images.count:
            raise ValueError(f"{images.where} has {images.count} images, fewer than the {limit} asked for")
        images = images.take(limit)
    if images.count < minimum:
        raise ValueError(f"{images.where} has {images.count} image{'s' * (images.count != 1)}; statistics need "
                         f"at least {minimum}")
    return images

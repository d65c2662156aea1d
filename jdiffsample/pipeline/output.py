"""The output folder of a run: manifest, shards, atomic writes, resuming, reading back.

::

    out/manifest.json        settings, their fingerprint, the shard list and package versions
    out/samples_000000.npz   images [0, shard_size):  arr_0 uint8 [n, H, W, C], arr_1 int32 labels
    out/samples_000000.json  the shard's record: its count, shape, dtype and the SHA-256 of the .npz
    out/samples_000001.npz   images [shard_size, 2 shard_size), ...
    out/grid.png             a preview of the first images

A shard is a fixed index range, written to a hidden temporary name and renamed when complete, then
its record beside it. A shard counts as finished only when it is verified (:func:`verify_shard`): its
record exists, its bytes hash to the recorded SHA-256, and its arrays have the recorded count,
shape and dtype. A rerun with the same settings skips verified shards and writes the others again
(a sample is a pure function of its index, so the images are the same); a rerun with other settings
into the same folder is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import uuid
import zipfile
from pathlib import Path

import jax
import jaxlib
import numpy as np

from jdiffsample.nets.formats import checkpoint

__all__ = ["MANIFEST", "PREVIEW", "shard_name", "record_name", "plan", "fingerprint", "new_manifest", "prepare",
           "read_manifest", "write_shard", "read_shard", "verify_shard", "remove_stale", "finished_shards",
           "load_samples", "atomic_write", "differences", "BadShard"]

MANIFEST = "manifest.json"
PREVIEW = "grid.png"
FORMAT = "jdiffsample-samples"
FORMAT_VERSION = 4  # 4: the run's plan record (resolved grid, models' digests), verified shards
RANDOMNESS = ("sample i: k_i = fold_in(key(seed), i); noise fold_in(k_i, 0), label fold_in(k_i, 1), "
              "solver noise fold_in(k_i, 2)")
LAYOUT = ("samples_XXXXXX.npz: arr_0 uint8 [n, H, W, C] = clip(floor(127.5 x + 128), 0, 255) (latent models: "
          "of the decoded images; with latents_only the float32 latents), arr_1 int32 class labels "
          "(class-conditional models only)")


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"samples_{index:06d}.npz"


def record_name(shard_file: str) -> str:
    """File name of the record (count, shape, dtype, SHA-256) written beside a shard."""
    return shard_file[: -len(".npz")] + ".json"


class BadShard(ValueError):
    """A shard file that exists but is not what was written (truncated, damaged, unrecorded)."""


def plan(num: int, shard_size: int) -> list[dict]:
    """The shards of a run: ``[{file, start, stop}]``."""
    return [dict(file=shard_name(s), start=start, stop=min(start + shard_size, num))
            for s, start in enumerate(range(0, num, shard_size))]


def fingerprint(settings: dict) -> str:
    """SHA-256 of the settings: equal fingerprints give equal images."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    return dict(checkpoint.versions(), jaxlib=jaxlib.__version__, python=platform.python_version(),
                backend=jax.default_backend())


def new_manifest(settings: dict, paths: dict, shards: list[dict], placement: dict | None = None) -> dict:
    """A run's manifest: its plan record (``settings``: fingerprinted), the networks' folders, the
    shard list and, not fingerprinted, how the weights were placed (``placement``)."""
    return dict(format=FORMAT, format_version=FORMAT_VERSION, fingerprint=fingerprint(settings), settings=settings,
                paths=paths, randomness=RANDOMNESS, layout=LAYOUT, shards=shards, versions=versions(),
                placement=placement or {})


def differences(old: dict, new: dict) -> str:
    """'key: old there, new here' for the first few keys that differ (one line)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key in ("model", "models"):
                parts.append("model: other weights or network config")
            else:
                a, b = (json.dumps(d.get(key)) for d in (old, new))
                short = lambda s: s if len(s) <= 40 else s[:37] + "..."  # noqa: E731
                parts.append(f"{key}: {short(a)} there, {short(b)} here")
    return "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")


def read_manifest(out) -> dict:
    """The parsed ``manifest.json`` of an output folder (``ValueError`` if it has none)."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{out} holds no {MANIFEST}: not a jdiffsample sample folder") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable: {err}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jdiffsample sample manifest")
    return manifest


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a hidden temporary file next to ``path``, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_exclusive(path: Path, data: bytes) -> None:
    """Write ``path`` atomically unless it exists (then leave it): a hard link of a complete
    temporary file, so concurrent processes never overwrite each other's manifest (a rename
    where the file system has no hard links, e.g. gcsfuse)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(out: Path, manifest: dict, log) -> None:
    """Create ``out`` with ``manifest``, or check that it holds the same settings."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not path.is_file():
        if out.is_dir() and any(p.name != MANIFEST and not p.name.startswith(".") for p in out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no {MANIFEST}; use a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        _create_exclusive(path, json.dumps(manifest, indent=1).encode())
    old = read_manifest(out)  # ours, or one another process wrote first
    if old.get("fingerprint") != manifest["fingerprint"]:
        diff = differences(old.get("settings", {}), manifest["settings"])
        raise FileExistsError(f"{out} holds samples made with other settings ({diff}); use another output folder")
    if old.get("versions", {}).get("jax") != manifest["versions"]["jax"] and log:
        print(f"sample: warning: {out} was started with jax {old['versions'].get('jax')}, "
              f"this is jax {manifest['versions']['jax']}", file=log)


def write_shard(out: Path, shard: dict, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Write a shard (atomically), then its record."""
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    atomic_write(out / shard["file"], lambda f: f.write(data))
    record = dict(file=shard["file"], start=shard["start"], stop=shard["stop"], shape=list(images.shape),
                  dtype=images.dtype.name, labels=labels is not None, sha256=hashlib.sha256(data).hexdigest())
    atomic_write(out / record_name(shard["file"]), lambda f: f.write(json.dumps(record).encode()))


def read_shard(path: Path):
    """``(images, labels or None)`` of one shard file."""
    with np.load(path) as data:
        return data["arr_0"], (data["arr_1"] if "arr_1" in data.files else None)


def verify_shard(out: Path, shard: dict, shape, dtype, labels: bool):
    """``(images, labels or None)`` of a finished shard, verified against its record and the run's
    ``shape`` (of one sample), ``dtype`` and whether it has labels; :class:`BadShard` naming what is
    wrong (missing record, other bytes, truncated arrays)."""
    path = out / shard["file"]
    try:
        record = json.loads((out / record_name(shard["file"])).read_text())
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise BadShard(f"{shard['file']}: {Path(err.filename).name} is missing") from None
    except (OSError, ValueError) as err:
        raise BadShard(f"{shard['file']}: its record is unreadable ({err})") from None
    n = shard["stop"] - shard["start"]
    if not isinstance(record, dict) or record.get("sha256") != hashlib.sha256(data).hexdigest():
        raise BadShard(f"{shard['file']}: its bytes differ from the ones written (SHA-256 mismatch)")
    try:
        with np.load(io.BytesIO(data)) as npz:
            images = npz["arr_0"]
            found = npz["arr_1"] if "arr_1" in npz.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise BadShard(f"{shard['file']}: unreadable ({err})") from None
    if images.shape != (n, *shape) or images.dtype != np.dtype(dtype) or (found is not None) != labels or (
            found is not None and found.shape != (n,)):
        raise BadShard(f"{shard['file']}: holds {images.dtype} {images.shape}, the run writes {np.dtype(dtype).name} "
                       f"{(n, *shape)}")
    return images, found


def remove_stale(out: Path, shards: list[dict]) -> None:
    """Delete temporary files left by killed runs for ``shards`` (only this process writes them)."""
    for shard in shards:
        for name in (shard["file"], record_name(shard["file"])):
            for tmp in out.glob(f".{name}.tmp-*"):
                tmp.unlink(missing_ok=True)


def shard_layout(manifest: dict) -> tuple[tuple, str, bool]:
    """``(shape of one sample, dtype, has labels)`` of a run's shards."""
    settings = manifest["settings"]
    dtype = "float32" if settings.get("latents_only") else "uint8"
    return tuple(settings["output_shape"]), dtype, bool(settings.get("n_classes"))


def finished_shards(out) -> list[dict]:
    """The shard list of a finished run, every shard verified (``ValueError`` naming the first missing
    or damaged shard otherwise)."""
    out = Path(out)
    manifest = read_manifest(out)
    shards = manifest["shards"]
    missing = [s["file"] for s in shards if not (out / s["file"]).is_file()]
    if missing:
        raise ValueError(f"{out} is incomplete: {len(missing)} of {len(shards)} shards missing "
                         f"(first: {missing[0]}); rerun the same command to finish it")
    layout = shard_layout(manifest)
    for s in shards:
        try:
            verify_shard(out, s, *layout)
        except BadShard as err:
            raise ValueError(f"{out}: {err}; rerun the same command to write it again") from None
    return shards


def load_samples(out) -> tuple[np.ndarray, np.ndarray | None]:
    """All images (uint8 ``[num, H, W, C]``) and labels (int32 ``[num]`` or None) of a finished run,
    every shard verified."""
    out = Path(out)
    layout = shard_layout(read_manifest(out))
    parts = [verify_shard(out, s, *layout) for s in finished_shards(out)]
    images = np.concatenate([p[0] for p in parts])
    labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return images, labels

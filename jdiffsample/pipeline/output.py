"""The output folder of a run: manifest, shards, atomic writes, resuming, reading back.

::

    out/manifest.json        settings, their fingerprint, the shard list and package versions
    out/samples_000000.npz   images [0, shard_size):  arr_0 uint8 [n, H, W, C], arr_1 int32 labels
    out/samples_000001.npz   images [shard_size, 2 shard_size), ...
    out/grid.png             a preview of the first images

A shard is a fixed index range, written to a hidden temporary name and renamed when complete, so a
file under a final name is always whole. A rerun with the same settings skips finished shards; a
rerun with other settings into the same folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

__all__ = ["MANIFEST", "PREVIEW", "shard_name", "plan", "fingerprint", "new_manifest", "prepare", "read_manifest",
           "write_shard", "read_shard", "remove_stale", "finished_shards", "load_samples", "atomic_write",
           "differences"]

MANIFEST = "manifest.json"
PREVIEW = "grid.png"
FORMAT = "jdiffsample-samples"
FORMAT_VERSION = 3  # 3: labels and seed as program arguments, the solver registry's resolved options
RANDOMNESS = ("sample i: k_i = fold_in(key(seed), i); noise fold_in(k_i, 0), label fold_in(k_i, 1), "
              "solver noise fold_in(k_i, 2)")
LAYOUT = ("samples_XXXXXX.npz: arr_0 uint8 [n, H, W, C] = clip(floor(127.5 x + 128), 0, 255) (latent models: "
          "of the decoded images; with latents_only the float32 latents), arr_1 int32 class labels "
          "(class-conditional models only)")


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"samples_{index:06d}.npz"


def plan(num: int, shard_size: int) -> list[dict]:
    """The shards of a run: ``[{file, start, stop}]``."""
    return [dict(file=shard_name(s), start=start, stop=min(start + shard_size, num))
            for s, start in enumerate(range(0, num, shard_size))]


def fingerprint(settings: dict) -> str:
    """SHA-256 of the settings: equal fingerprints give equal images."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    import platform

    import jax
    import jaxlib

    from jdiffsample.nets import checkpoint

    return dict(checkpoint.versions(), jaxlib=jaxlib.__version__, python=platform.python_version(),
                backend=jax.default_backend())


def new_manifest(settings: dict, model_path: str, shards: list[dict]) -> dict:
    return dict(format=FORMAT, format_version=FORMAT_VERSION, fingerprint=fingerprint(settings), settings=settings,
                model_path=model_path, randomness=RANDOMNESS, layout=LAYOUT, shards=shards, versions=versions())


def differences(old: dict, new: dict) -> str:
    """'key: old there, new here' for the first few keys that differ (one line)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key == "model":
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
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    atomic_write(out / shard["file"], lambda f: np.savez(f, **arrays))


def read_shard(path: Path):
    """``(images, labels or None)`` of one shard file."""
    with np.load(path) as data:
        return data["arr_0"], (data["arr_1"] if "arr_1" in data.files else None)


def remove_stale(out: Path, shards: list[dict]) -> None:
    """Delete temporary files left by killed runs for ``shards`` (only this process writes them)."""
    for shard in shards:
        for tmp in out.glob(f".{shard['file']}.tmp-*"):
            tmp.unlink(missing_ok=True)


def finished_shards(out) -> list[dict]:
    """The shard list of a finished run (``ValueError`` naming what is missing otherwise)."""
    out = Path(out)
    shards = read_manifest(out)["shards"]
    missing = [s["file"] for s in shards if not (out / s["file"]).is_file()]
    if missing:
        raise ValueError(f"{out} is incomplete: {len(missing)} of {len(shards)} shards missing "
                         f"(first: {missing[0]}); rerun the same command to finish it")
    return shards


def load_samples(out) -> tuple[np.ndarray, np.ndarray | None]:
    """All images (uint8 ``[num, H, W, C]``) and labels (int32 ``[num]`` or None) of a finished run."""
    parts = [read_shard(Path(out) / s["file"]) for s in finished_shards(out)]
    images = np.concatenate([p[0] for p in parts])
    labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return images, labels

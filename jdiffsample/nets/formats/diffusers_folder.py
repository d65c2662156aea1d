"""Read one model folder of a diffusers / transformers checkpoint (``vae/``, ``unet/``,
``text_encoder/``): its ``config.json`` and its weights as NumPy arrays, without torch.

Weights files are looked up in this order, the first that exists wins::

    {stem}.safetensors, {stem}.safetensors.index.json (shards), {bin_stem}.bin,
    {bin_stem}.bin.index.json, then the same with the fp16 variant
    ({stem}.fp16.safetensors, {stem}.safetensors.index.fp16.json, ...)

``stem`` is ``diffusion_pytorch_model`` for diffusers models; transformers models use
``model.safetensors`` but ``pytorch_model.bin`` (``stem="model", bin_stem="pytorch_model"``).
Safetensors files are read with ``safetensors.numpy``; ``.bin`` files with
:func:`jdiffsample.nets.formats.torchfile.load_state_dict`, which never executes code from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jdiffsample.nets.formats import torchfile
from jdiffsample.nets.formats.statedict import listing

__all__ = ["read_config", "read_weights", "weights_file"]


def read_config(folder) -> dict[str, Any]:
    """The ``config.json`` of ``folder`` as a dict (``ValueError`` if absent or not a JSON object)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json (is this a model folder such as vae/ or unet/?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a {type(config).__name__}, not a JSON object")
    return config


def _candidates(stem: str, bin_stem: str) -> list[str]:
    names = []
    for variant in ("", ".fp16"):
        for base, ext in ((stem, "safetensors"), (bin_stem, "bin")):
            names += [f"{base}{variant}.{ext}", f"{base}.{ext}.index{variant}.json"]
    return names


def weights_file(folder, stem: str = "diffusion_pytorch_model", bin_stem: str | None = None) -> Path:
    """The weights file (or shard index) :func:`read_weights` reads from ``folder``."""
    names = _candidates(stem, bin_stem or stem)
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise ValueError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(os.fspath(path))
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    return torchfile.load_state_dict(path)


def read_weights(folder, stem: str = "diffusion_pytorch_model",
                 bin_stem: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of the model in ``folder``, ``{name: array}`` in the file's dtype (see the module
    docstring for which file is read). ``ValueError`` when there is none or it cannot be read."""
    path = weights_file(folder, stem, bin_stem)
    if not path.name.endswith(".json"):
        return _read_file(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a shard index with a weight_map ({err!r})") from None
    weights: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path.parent / shard).is_file():
            raise ValueError(f"{path}: shard {shard} is missing")
        weights.update(_read_file(path.parent / shard))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise ValueError(f"{path}: tensors named in the index are not in the shards ({listing(missing)})")
    return weights

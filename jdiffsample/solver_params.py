"""Learned solver parameters as a JSON file, and what they were trained for.

``jdiffsample learn`` writes one (:func:`save`); sampling reads it back with :func:`load_params`,
which refuses a file trained for another solver, NFE, schedule or model, or one that is not such a
file, with one line naming what differs. The file::

    {"format": "jdiffsample-solver-params", "format_version": 1,
     "solver": "amed", "options": {...resolved solver options...}, "base": ["euler", {}],
     "nfe": 5, "n_steps": 3, "schedule": "VE(t_min=0.002, t_max=80.0)", "model": "<sha256>",
     "ts": [...the grid trained on...], "params": {...nested lists...},
     "training": {...loss, teacher, errors, cost...}}

``model`` is :func:`model_digest` of the network's variables (the digest a checkpoint records at
conversion: SHA-256 over every array's path, dtype, shape and CRC-32). The grid is recorded, not
enforced: the parameters are per step and fit any grid of the same length, best the one they were
trained on (a run on another grid warns).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from jdiffsample.nets.formats import checkpoint
from jdiffsample.solvers import registry

__all__ = ["FORMAT", "ParamFile", "model_digest", "schedule_id", "save", "read", "load_params", "checked_params"]

FORMAT = "jdiffsample-solver-params"
VERSION = 1


def model_digest(model) -> str:
    """What identifies a model's weights: a digest string as is, else the digest of its variables
    (a :class:`jdiffsample.nets.Model`), else of the pytree of arrays given (a test model's)."""
    if isinstance(model, str):
        return model
    return checkpoint.digest(checkpoint.checksums(getattr(model, "variables", model)))


def schedule_id(schedule) -> str:
    """The schedule as one line: its class and fields (array fields by a SHA-256 prefix)."""
    fields = []
    for f in dataclasses.fields(schedule):
        value = getattr(schedule, f.name)
        if isinstance(value, np.ndarray):
            value = "sha256:" + hashlib.sha256(np.ascontiguousarray(value, np.float64).tobytes()).hexdigest()[:16]
        fields.append(f"{f.name}={value!r}")
    return f"{type(schedule).__name__}({', '.join(fields)})"


def _to_json(tree):
    if isinstance(tree, dict):
        return {k: _to_json(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64).tolist()


def _from_json(tree):
    if isinstance(tree, dict):
        return {k: _from_json(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


@dataclasses.dataclass(frozen=True)
class ParamFile:
    """A read parameter file: the fields of the module doc, ``params`` as NumPy arrays."""

    path: str
    solver: str
    options: dict
    base: tuple
    nfe: int
    n_steps: int
    schedule: str
    model: str
    ts: np.ndarray
    params: Any
    training: dict


def save(path, learned, *, model, schedule, training: dict | None = None) -> dict:
    """Write ``learned`` (a :class:`jdiffsample.learn_solver.LearnedSolver`) for ``model`` (see
    :func:`model_digest`) and ``schedule`` to ``path`` as JSON; returns the written dict."""
    info = registry.get(learned.solver)
    n_steps = len(learned.ts) - 1
    base, base_options = info.learned.base(learned.options)
    record = dict(
        format=FORMAT, format_version=VERSION, solver=learned.solver, options=dict(learned.options),
        base=[base, dict(base_options)], nfe=info.nfe(n_steps, options=learned.options), n_steps=n_steps,
        evaluations=info.evaluations(n_steps, options=learned.options), schedule=schedule_id(schedule),
        model=model_digest(model), ts=np.asarray(learned.ts, np.float64).tolist(), params=_to_json(learned.params),
        training=dict(
            loss=learned.loss, teacher=learned.teacher, teacher_steps=learned.teacher_steps,
            iterations=learned.iterations, train_error=learned.train_error, holdout_error=learned.holdout_error,
            init_train_error=learned.init_train_error, init_holdout_error=learned.init_holdout_error,
            seconds=learned.seconds, model_calls=learned.model_calls, **(training or {})),
    )
    text = json.dumps(record, indent=1, allow_nan=True)
    Path(path).write_text(text + "\n")
    return record


def read(path) -> ParamFile:
    """Read a parameter file; ``ValueError`` (one line) when it is not one."""
    path = str(path)
    not_one = f"{path} is not a jdiffsample solver-parameter file (the JSON written by `jdiffsample learn`)"
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        if isinstance(err, FileNotFoundError):
            raise ValueError(f"no solver-parameter file at {path}") from None
        raise ValueError(f"{not_one}: {type(err).__name__}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(not_one)
    if record.get("format_version") != VERSION:
        raise ValueError(f"{path}: solver-parameter format version {record.get('format_version')!r}; this "
                         f"jdiffsample reads version {VERSION}")
    try:
        return ParamFile(path=path, solver=record["solver"], options=dict(record["options"]),
                         base=tuple(record["base"]), nfe=int(record["nfe"]), n_steps=int(record["n_steps"]),
                         schedule=record["schedule"], model=record["model"], ts=np.asarray(record["ts"], np.float64),
                         params=_from_json(record["params"]), training=dict(record.get("training", {})))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{not_one}: a field is missing or malformed ({err})") from None


def load_params(path, model, solver: str, nfe: int, schedule, options: dict | None = None):
    """The parameters in ``path`` (a pytree of NumPy arrays) for sampling ``model`` (a Model, a digest,
    or a test model's pytree: :func:`model_digest`) with ``solver`` at ``nfe`` on ``schedule``.

    ``ValueError``, one line, when the file is not a parameter file, or was trained for another
    solver, NFE, schedule or model, or (``options`` given) other solver options; the parameters
    are checked against the solver's ranges. The file's options (``read(path).options``: e.g. AMED's
    ``afs``, EPD's ``points``) are the ones to sample with.
    """
    return checked_params(read(path), model, solver, nfe, schedule, options)


def checked_params(f: ParamFile, model, solver: str, nfe: int, schedule, options: dict | None = None):
    """:func:`load_params` for a file already :func:`read`."""
    path = f.path
    info = registry.get(solver)
    if f.solver != solver:
        raise ValueError(f"{path} holds parameters of solver {f.solver}, not {solver}")
    if f.nfe != nfe:
        raise ValueError(f"{path} was trained for NFE {f.nfe} ({f.n_steps} steps), not {nfe}")
    if f.schedule != schedule_id(schedule):
        raise ValueError(f"{path} was trained on the schedule {f.schedule}, not {schedule_id(schedule)}")
    if f.model != model_digest(model):
        raise ValueError(f"{path} was trained for another model (weights digest {f.model[:12]}..., this model's "
                         f"{model_digest(model)[:12]}...)")
    resolved = info.resolve(f.options)
    if options is not None and info.resolve(options) != resolved:
        differ = sorted(k for k in resolved if info.resolve(options)[k] != resolved[k])
        raise ValueError(f"{path} was trained with {solver} options "
                         f"{', '.join(f'{k}={resolved[k]!r}' for k in differ)}, not "
                         f"{', '.join(f'{k}={info.resolve(options)[k]!r}' for k in differ)}")
    try:
        info.learned.check(f.params, f.n_steps, resolved)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return f.params

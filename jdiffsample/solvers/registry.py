"""The solver registry: everything the rest of the package knows about a solver, declared once.

A solver module registers its function with :func:`register`, next to its definition::

    @register("unipc", label=lambda o: f"UniPC-{o['order']}", order=lambda o: o["order"] + 1,
              options=[Option("order", int, "predictor order", choices=(1, 2, 3)), ...])
    def unipc(denoise, x, ts, schedule, *, order=3, ..., key=None, return_trajectory=False): ...

The defaults of the options are the function's own keyword defaults (written once, in its
signature). Pipeline, eval, the CLI flags and help, ``steps`` and ``optimize`` read only this
registry: :func:`get` returns the :class:`Solver` record, whose methods resolve and check options,
count model calls and map an NFE budget to a grid.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np

__all__ = ["Option", "Learned", "Solver", "register", "get", "names", "flags", "parse_spec", "split_specs"]

_RESERVED = ("denoise", "x", "ts", "schedule", "key", "return_trajectory", "params")
_KINDS = (int, float, bool, str, tuple)


@dataclasses.dataclass(frozen=True)
class Option:
    """A keyword option of a solver.

    ``kind``: int, float, bool, str or tuple (a list of integers). ``choices`` or the closed range
    [``low``, ``high``] restrict the value; ``function_ok`` also admits a function of t (SA-Solver's
    tau). ``flag``: the CLI flag name when it differs from the option's (solvers share a flag when
    they give the same one, e.g. ``--order``). The default is the solver function's own.
    """

    name: str
    kind: type
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    function_ok: bool = False
    flag: str | None = None
    default: Any = None  # filled in from the function signature by register()

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"option {self.name}: kind must be one of {[k.__name__ for k in _KINDS]}")

    @property
    def cli_flag(self) -> str:
        return "--" + (self.flag or self.name).replace("_", "-")

    def allowed(self) -> str:
        """What values are allowed, in words."""
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                tuple: "a list of integers"}[self.kind]
        if self.low is not None and self.high is not None:
            what += f" in [{self.low}, {self.high}]"
        elif self.low is not None:
            what += f" >= {self.low}"
        if self.function_ok:
            what += " or a function of t"
        return what

    def check(self, solver: str, value):
        """``value`` normalized (tuples for lists); ``ValueError`` naming what is allowed."""
        if (self.function_ok and callable(value)) or (value is None and self.default is None):
            return value
        if _is_tracer(value):
            return value
        ok, norm = _coerce(self.kind, value)
        if ok and self.choices is not None:
            ok = norm in self.choices
        if ok and self.low is not None:
            ok = norm >= self.low
        if ok and self.high is not None:
            ok = norm <= self.high
        if not ok:
            raise ValueError(f"option {self.name} of solver {solver} must be {self.allowed()}, got {value!r}")
        return norm


def _is_tracer(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _coerce(kind, value):
    if kind is bool:
        return isinstance(value, (bool, np.bool_)), bool(value) if isinstance(value, (bool, np.bool_)) else value
    if isinstance(value, (bool, np.bool_)):
        return False, value
    if kind is int:
        return isinstance(value, (int, np.integer)), int(value) if isinstance(value, (int, np.integer)) else value
    if kind is float:
        if isinstance(value, (int, float, np.integer, np.floating)) or (
                isinstance(value, np.ndarray) and value.ndim == 0):
            v = float(value)
            return math.isfinite(v) or v == math.inf, v
        return False, value
    if kind is str:
        return isinstance(value, str), value
    if isinstance(value, (list, tuple, np.ndarray)) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in np.asarray(value).reshape(-1).tolist()):
        return True, tuple(int(v) for v in np.asarray(value).reshape(-1).tolist())
    return False, value


def _call(rule, options):
    return rule(options) if callable(rule) else rule


@dataclasses.dataclass(frozen=True)
class Learned:
    """What makes a solver learnable: its learned parameters are ONE pytree of arrays, passed as the
    solver's ``params`` keyword (a traced argument of the compiled program: new values never
    recompile). Every function takes the resolved options; ``n_steps`` is the grid's step count.

    ``init(n_steps, options)``: the untrained parameters (what the solver uses when given none).
    ``neutral(n_steps, options)``: parameters that reduce it exactly to ``base(options)``, a
    ``(solver name, options)`` pair. ``check(params, n_steps, options)``: ``ValueError`` naming what
    is wrong (structure, shapes, a value outside ``ranges``, the ranges in words). ``project(params,
    options)``: the parameters moved into their ranges (applied after each training step).
    ``prepare(params, denoise, x, ts, schedule, options)``: optional data-dependent start for
    training (PAS sets its step lengths from the base solver's trajectory). ``learning_rate``: the
    default Adam step size of :func:`jdiffsample.learn_solver.learn_solver` (a value or a function
    of the options); ``step_sizes(params, options)``: optional multipliers of the optimizer's steps
    per leaf (parameters of a narrow range, like AMED's and EPD's scales, step in proportion to it).
    """

    init: Callable
    neutral: Callable
    base: Callable
    check: Callable
    project: Callable
    ranges: str
    prepare: Callable | None = None
    learning_rate: Any = 1e-2
    step_sizes: Callable | None = None

    def rate(self, options) -> float:
        return float(_call(self.learning_rate, options))


@dataclasses.dataclass(frozen=True)
class Solver:
    """A registered solver. Rules that depend on the options take the resolved option dict."""

    name: str
    fn: Callable
    options: tuple
    label_rule: Any                # str or options -> str
    order_rule: Any                # int or options -> int: nominal (predictor) order, for the optimized grid
    needs_key_rule: Any            # bool or options -> bool
    calls_per_step: int = 1
    final_zero_calls: int | None = None  # calls of a last step into sigma = 0 or a first from alpha = 0, if fewer
    ode_options: tuple = ()        # options that make a stochastic solver deterministic
    doc: str = ""
    learned: Learned | None = None  # learnable solvers: how their parameters are made and checked
    saved_calls_rule: Any = 0      # int or options -> int: calls saved in all (AMED's analytic first step)
    evaluations_rule: Any = None   # int or options -> int: network evaluations per step, parallel ones
    #                                counted apart (EPD); None: calls_per_step
    min_steps_rule: Any = 1        # int or options -> int: fewest steps the method needs
    noise_start: bool = True       # can start at alpha = 0 (t = 1 on a flow schedule)

    @property
    def learnable(self) -> bool:
        return self.learned is not None

    @property
    def option_names(self) -> tuple:
        return tuple(o.name for o in self.options)

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def resolve(self, options: Mapping | None = None) -> dict:
        """All options, defaults filled in, each checked; ``ValueError`` for unknown or bad ones."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            allowed = ", ".join(self.option_names) or "none"
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for solver {self.name} (its options: {allowed})")
        return {o.name: o.check(self.name, options.get(o.name, o.default)) for o in self.options}

    def label(self, options: Mapping | None = None) -> str:
        return _call(self.label_rule, self.resolve(options))

    def order(self, options: Mapping | None = None) -> int:
        return int(_call(self.order_rule, self.resolve(options)))

    def bound_order(self, options: Mapping | None = None) -> int:
        """The order the model-free error bound of the optimized grid is computed for (1-3)."""
        return min(max(self.order(options), 1), 3)

    def needs_key(self, options: Mapping | None = None) -> bool:
        return bool(_call(self.needs_key_rule, self.resolve(options)))

    def deterministic(self, options: Mapping | None = None) -> dict:
        """``options`` with the stochasticity switched off (for learning grids, references)."""
        return self.resolve({**dict(options or {}), **dict(self.ode_options)})

    def nfe(self, n_steps: int, final_zero: bool = False, first_noise: bool = False,
            options: Mapping | None = None) -> int:
        """Model calls for a grid of ``n_steps`` steps (ending at sigma = 0 with ``final_zero``, starting
        at alpha = 0, t = 1 on a flow, with ``first_noise``: steps that may cost fewer calls), in
        sequence: parallel evaluations of one step (EPD's) count once (see :meth:`evaluations`)."""
        ends = int(bool(final_zero)) + int(bool(first_noise))
        if self.final_zero_calls is None or ends == 0:
            return self.calls_per_step * n_steps - self._saved(options)
        ends = min(ends, n_steps)
        return self.calls_per_step * (n_steps - ends) + self.final_zero_calls * ends - self._saved(options)

    def _saved(self, options) -> int:
        return int(_call(self.saved_calls_rule, self.resolve(options))) if self.saved_calls_rule else 0

    def min_steps(self, options: Mapping | None = None) -> int:
        return int(_call(self.min_steps_rule, self.resolve(options)))

    def evaluations(self, n_steps: int, final_zero: bool = False, options: Mapping | None = None) -> int:
        """Network evaluations in all, the parallel ones of a step counted one by one."""
        if self.evaluations_rule is None:
            return self.nfe(n_steps, final_zero, options=options)
        per = int(_call(self.evaluations_rule, self.resolve(options)))
        last = self.final_zero_calls if (final_zero and self.final_zero_calls is not None) else per
        return per * (n_steps - 1) + last - self._saved(options)

    def steps_for_nfe(self, nfe: int, *, zero_end: bool, first_noise: bool = False,
                      options: Mapping | None = None) -> tuple[int, bool]:
        """``(n_steps, final_zero)``: the grid that costs exactly ``nfe`` model calls.

        ``final_zero``: the grid ends with an extra step into sigma = 0 (schedules with
        ``zero_end`` only), which is how an NFE that is not a multiple of the calls per step is
        reached (EDM's Heun with an odd NFE). ``first_noise``: the grid starts at alpha = 0 (t = 1 on
        a flow), whose step may cost fewer calls too. ``ValueError`` when no grid costs ``nfe``.
        """
        if isinstance(nfe, (bool, np.bool_)) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
        per, last = self.calls_per_step, self.final_zero_calls
        found = None
        for final_zero in (False, True) if zero_end else (False,):
            n = 2 if final_zero else 1  # a last step into sigma = 0 follows at least one ordinary step
            while self.nfe(n, final_zero, first_noise, options) < nfe:
                n += 1
            if self.nfe(n, final_zero, first_noise, options) == nfe:
                found = n, final_zero
                break
        if found is None:
            saved = self._saved(options)
            rest = "" if last is None else f" {'+' if last >= saved else '-'} {abs(last - saved)}" * (last != saved)
            hint = (f", or {per} k{rest} (k >= 1) on a schedule that can end at sigma = 0"
                    if last is not None and not zero_end else "")
            spent = f" and saves {saved} in all with these options" if saved else ""
            raise ValueError(f"{self.name} makes {per} model calls per step{spent}: the NFE (--nfe) must be a positive "
                             f"multiple of {per}{f' minus {saved}' if saved else ''}{hint}, got {nfe}")
        fewest = self.min_steps(options)
        if found[0] < fewest:
            raise ValueError(f"{self.name} with these options needs at least {fewest} steps (NFE >= "
                             f"{self.nfe(fewest, False, options=options)}), got NFE {nfe}")
        return found


_REGISTRY: dict[str, Solver] = {}


def register(name: str, fn: Callable | None = None, *, options=(), label=None, order=1, needs_key=False,
             calls_per_step: int = 1, final_zero_calls: int | None = None, ode_options=None,
             learned: Learned | None = None, saved_calls=0, evaluations=None, min_steps=1,
             noise_start: bool = True):
    """Register solver ``fn`` under ``name`` (usable as a decorator when ``fn`` is omitted).

    ``fn(denoise, x, ts, schedule, *, <options>, key=None, return_trajectory=False)`` runs the whole
    trajectory. ``options``: :class:`Option` records for its keyword options (defaults from its
    signature; every keyword but ``key``/``return_trajectory`` must be declared). ``label``,
    ``order`` and ``needs_key``: a value or a function of the resolved options. ``calls_per_step``:
    model calls per step; ``final_zero_calls``: calls of a last step into sigma = 0 (or a first step from
    alpha = 0) when fewer.
    ``ode_options``: options that make a stochastic solver deterministic.

    Learnable solvers (``learned``: a :class:`Learned` record) take their parameters as the keyword
    ``params`` (one pytree; ``None``: the untrained ``learned.init``). ``saved_calls``: model calls
    saved in all (an analytic first step), ``evaluations``: network evaluations per step when some
    run in parallel within a step (``calls_per_step`` then counts them once), ``min_steps``: the
    fewest steps the method needs; each a value or a function of the resolved options.
    ``noise_start=False``: the method cannot start at alpha = 0 (a flow schedule's t = 1).

    Returns ``fn`` wrapped so that its options are checked (``ValueError``) on every call.
    """
    if fn is None:
        return lambda f: register(name, f, options=options, label=label, order=order, needs_key=needs_key,
                                  calls_per_step=calls_per_step, final_zero_calls=final_zero_calls,
                                  ode_options=ode_options, learned=learned, saved_calls=saved_calls,
                                  evaluations=evaluations, min_steps=min_steps, noise_start=noise_start)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a solver name must be an identifier, got {name!r}")
    if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise ValueError(f"calls_per_step must be a positive integer, got {calls_per_step!r}")
    params = inspect.signature(fn).parameters
    missing = [p for p in ("denoise", "x", "ts", "schedule", "key", "return_trajectory") if p not in params]
    if learned is not None and "params" not in params:
        missing.append("params")
    if missing:
        raise ValueError(f"solver {name}: the function must take {', '.join(missing)}")
    declared = {o.name for o in options}
    keywords = [p for p in params if p not in _RESERVED]
    undeclared = sorted(set(keywords) - declared)
    if undeclared or declared - set(keywords):
        raise ValueError(f"solver {name}: options {sorted(declared)} must be exactly the function's keyword "
                         f"options {sorted(keywords)}")
    opts = tuple(dataclasses.replace(o, default=params[o.name].default) for o in options)
    for o in opts:
        if o.default is inspect.Parameter.empty:
            raise ValueError(f"solver {name}: option {o.name} needs a default in the function signature")

    @functools.wraps(fn)
    def checked(denoise, x, ts, schedule, *, key=None, return_trajectory=False, params=None, **kwargs):
        info = _REGISTRY[name]
        options = info.resolve(kwargs)
        if info.learned is None:
            if params is not None:
                raise ValueError(f"solver {name} has no learned parameters (learnable solvers: "
                                 f"{', '.join(n for n, s in _REGISTRY.items() if s.learnable) or 'none'})")
            return fn(denoise, x, ts, schedule, key=key, return_trajectory=return_trajectory, **options)
        return fn(denoise, x, ts, schedule, key=key, return_trajectory=return_trajectory, params=params, **options)

    _REGISTRY[name] = Solver(
        name=name, fn=checked, options=opts, label_rule=name if label is None else label, order_rule=order,
        needs_key_rule=needs_key, calls_per_step=calls_per_step, final_zero_calls=final_zero_calls,
        ode_options=tuple(sorted((ode_options or {}).items())), doc=inspect.getdoc(fn) or "",
        learned=learned, saved_calls_rule=saved_calls, evaluations_rule=evaluations, min_steps_rule=min_steps,
        noise_start=noise_start,
    )
    return checked


def get(name: str) -> Solver:
    """The registered solver ``name``; ``ValueError`` naming the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def flags() -> dict[str, dict[str, Option]]:
    """CLI flag -> {solver: option} over all registered solvers (a flag may serve several)."""
    out: dict[str, dict[str, Option]] = {}
    for solver in _REGISTRY.values():
        for o in solver.options:
            out.setdefault(o.cli_flag, {})[solver.name] = o
    return out


def _parse(kind, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind is tuple:
        try:
            return tuple(int(v) for v in text.replace(";", ",").split(",") if v.strip())
        except ValueError:
            raise ValueError(f"expected integers separated by ';', got {text!r}") from None
    return kind(text)


def parse_spec(text: str) -> tuple[str, dict]:
    """``'dpmpp:order=3,exact=true'`` -> ``('dpmpp', {'order': 3, 'exact': True})``, checked."""
    name, _, rest = text.partition(":")
    info = get(name.strip())
    opts = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"solver option {item!r} in {text!r} must be written NAME=VALUE")
        try:
            option = info.option(key.strip())
        except KeyError:
            raise ValueError(f"unknown option {key.strip()!r} for solver {info.name} "
                             f"(its options: {', '.join(info.option_names) or 'none'})") from None
        try:
            opts[option.name] = _parse(option.kind, value.strip())
        except ValueError as err:
            raise ValueError(f"option {option.name} of solver {info.name}: {err}") from None
    info.resolve(opts)
    return info.name, opts


def split_specs(text: str) -> list[str]:
    """``'unipc,dpmpp:order=3,exact=true,ddim'`` -> ``['unipc', 'dpmpp:order=3,exact=true', 'ddim']``
    (an item with ``=`` but no ``:`` continues the previous solver's options)."""
    specs: list[str] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def unregister(name: str) -> None:
    """Remove a solver (for tests that register toy solvers)."""
    _REGISTRY.pop(name, None)

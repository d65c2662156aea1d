"""Command-line solver options, generated from the solver registry (not a command).

Every option of every registered solver becomes a flag (``--order``, ``--eta``, ...); solvers that
give their option the same flag share it. :func:`options` turns the given flags into the keyword
options of the chosen solver, refusing flags that do not apply to it.
"""

from __future__ import annotations

import argparse

from jdiffsample.solvers import registry

__all__ = ["add", "options", "solver_help"]


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def _dest(flag: str) -> str:
    return "solver_" + flag[2:].replace("-", "_")


def solver_help() -> str:
    return ", ".join(f"{name} ({registry.get(name).label()})" for name in registry.names())


def add(parser) -> None:
    """Add one flag per solver option (shared by the solvers that name it alike)."""
    group = parser.add_argument_group("solver options (each solver's own default unless given)")
    for flag, per_solver in sorted(registry.flags().items()):
        kinds = {o.kind for o in per_solver.values()}
        kind = kinds.pop() if len(kinds) == 1 else str
        text = "; ".join(f"{name}: {o.help} ({o.allowed()}, default {o.default!r})" for name, o in per_solver.items())
        text = text.replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, dest=_dest(flag), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, dest=_dest(flag), type=_int_list if kind is tuple else kind, default=None,
                               metavar=flag[2:].upper().replace("-", "_"), help=text)


def options(args, solver: str) -> dict:
    """The options given on the command line for ``solver``; ``ValueError`` for a flag that does
    not apply to it."""
    registry.get(solver)
    out = {}
    for flag, per_solver in registry.flags().items():
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        if solver not in per_solver:
            raise ValueError(f"{flag} does not apply to solver {solver} (it applies to {', '.join(per_solver)})")
        out[per_solver[solver].name] = value
    return out

"""Command-line flags derived from the run's description (not a command): every field of
:class:`~jdiffsample.pipeline.settings.Settings` and :class:`~jdiffsample.pipeline.settings.Output`
becomes a flag with its declared help (the solvers' options come from the solver registry,
:mod:`jdiffsample.commands._solver_flags`). :func:`values` turns the parsed flags back into those
dataclasses' keyword values, passing on only the flags that were given (a flag's absence means the
declared default).
"""

from __future__ import annotations

import argparse

from jdiffsample.pipeline import settings as st

__all__ = ["add_settings", "values"]


def _dest(field: st.Field) -> str:
    return "setting_" + field.name


def add_settings(parser, cls, *, skip: tuple = ()) -> None:
    """One flag per field of ``cls`` (grouped as declared), with the declared help and default."""
    groups: dict = {}
    for f in st.fields(cls):
        if f.flag is None or f.name in skip:
            continue
        group = groups.get(f.group)
        if group is None:
            group = groups[f.group] = parser.add_argument_group(f.group)
        text = f.describe().replace("%", "%%")
        if isinstance(f.default, bool):
            group.add_argument(f.flag, dest=_dest(f), action=argparse.BooleanOptionalAction, default=None,
                               help=text + f" (default {'on' if f.default else 'off'})")
            continue
        choices = f.allowed()
        if choices is not None:
            text += f"; one of: {', '.join(map(str, choices))}"
        group.add_argument(f.flag, dest=_dest(f), default=None, metavar=f.metavar or f.name.upper(),
                           action="append" if f.repeat else "store", type=_converter(f), help=text)


def _converter(f: st.Field):
    if f.parse is not None:
        return f.parse
    kind = type(f.default) if f.default is not None and not isinstance(f.default, (tuple, str)) else None
    if f.name in ("micro_batch", "height", "width", "upsampler_nfe", "max_sequence_length", "batch"):
        kind = int
    if f.name in ("skip_tuning", "guidance", "guidance_rescale", "true_cfg", "classifier_scale"):
        kind = float
    if kind in (int, float):
        def convert(text):
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                                 f"got {text!r}") from None
        return convert
    return str


def values(args, cls) -> dict:
    """The keyword values of ``cls`` given on the command line."""
    out = {}
    for f in st.fields(cls):
        value = getattr(args, _dest(f), None)
        if value is not None:
            out[f.name] = tuple(value) if f.repeat else value
    return out

"""Argument checks shared by every module: each error names the argument, the value and what is allowed.

Every check takes the argument's ``name`` first and its ``value`` second, returns the value in its canonical type
and raises a ``ValueError`` such as ``iters=0 must be an integer >= 1`` otherwise. A bool is never a number here
(``True`` is not accepted for an integer or a float). ``hint`` (where a check has one) is appended to the message
after a space, e.g. ``opset=11 must be an integer >= 13 (per-channel QuantizeLinear)``.

A command-line flag may be the ``name``: :func:`shown` then writes ``--iters 0`` (as typed) rather than ``iters=0``.

This module sits at the bottom of the data flow, below :mod:`detptq_mini.utils`: it imports the standard library
only, and no other module of the package.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Literal, get_args, get_origin

__all__ = ["check_int", "check_number", "check_bool", "check_choice", "shown"]


def shown(name: str, value) -> str:
    """How an error shows an argument and its value: ``out='x.json'`` for a Python argument, ``--out 'x.json'`` for a
    command-line flag (a ``name`` that starts with ``-``), as the command line is typed."""
    return f"{name} {value!r}" if name.startswith("-") else f"{name}={value!r}"


def _bounded(what: str, low, high, both: str, low_op: str, high_op: str) -> str:
    """``what`` with its bounds: ``what in <both>``, ``what >= low``, ``what <= high`` or ``what`` alone."""
    if low is not None and high is not None:
        return f"{what} in {both}"
    if low is not None:
        return f"{what} {low_op} {low}"
    if high is not None:
        return f"{what} {high_op} {high}"
    return what


def _fail(name: str, value, allowed: str, allow_none: bool, hint: str):
    none = " or None" if allow_none else ""
    raise ValueError(f"{shown(name, value)} must be {allowed}{none}" + (f" {hint}" if hint else ""))


def check_int(name: str, value, low: int | None = None, high: int | None = None, *, allow_none: bool = False,
              hint: str = "") -> int | None:
    """``value`` as a Python int, if it is an integer (a NumPy integer too, not a bool) in ``low..high``.

    Either bound may be None (no bound). Messages: ``must be an integer``, ``an integer >= low``,
    ``an integer <= high`` or ``an integer in low..high``; ``or None`` is added with ``allow_none`` (a None
    value is then returned as it is).
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        _fail(name, value, _bounded("an integer", low, high, f"{low}..{high}", ">=", "<="), allow_none, hint)
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False, *, allow_none: bool = False, hint: str = "") -> float | None:
    """``value`` as a float, if it is a finite real number (not a bool) between ``low`` and ``high``.

    Either bound may be None (no bound); ``low_open``/``high_open`` exclude the bound itself. Messages:
    ``must be a finite number``, ``a finite number > low`` (``>=``, ``<``, ``<=`` likewise) or, with both
    bounds, ``a finite number in [low, high)`` (interval notation); ``or None`` is added with ``allow_none``.
    NaN and infinities are refused.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok:
        try:
            x = float(value)
        except (OverflowError, TypeError, ValueError):  # e.g. an int too large for a float
            ok = False
        else:
            ok = math.isfinite(x)
            ok = ok and (low is None or (x > low if low_open else x >= low))
            ok = ok and (high is None or (x < high if high_open else x <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        low_op, high_op = (">" if low_open else ">="), ("<" if high_open else "<=")
        allowed = _bounded("a finite number", low, high, interval, low_op, high_op)
        _fail(name, value, allowed, allow_none, hint)
    return x


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (``True`` or ``False``; not 0, 1 or a NumPy bool)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a bool (True or False)")
    return value


def _is(value, choice) -> bool:
    """``value`` equals ``choice`` and is of its type (``1`` is not ``True``, ``"1"`` is not ``1``)."""
    if isinstance(value, bool) != isinstance(choice, bool):
        return False
    return isinstance(value, type(choice)) and value == choice


def check_choice(name: str, value, allowed):
    """``value`` if it is one of ``allowed`` (a ``typing.Literal`` or a sequence of choices), of the same type.

    Message: ``name='x' is not allowed; allowed: 'a', 'b'`` (the choices with ``repr``).
    """
    choices = get_args(allowed) if get_origin(allowed) is Literal else tuple(allowed)
    if not any(_is(value, c) for c in choices):
        raise ValueError(f"{shown(name, value)} is not allowed; allowed: {', '.join(repr(c) for c in choices)}")
    return value

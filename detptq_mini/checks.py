"""Argument checks shared by every module: each error names the argument, the value and what is allowed.

Every check takes the argument's ``name`` first and its ``value`` second, returns the value in its canonical type
and raises a ``ValueError`` such as ``iters=0 must be an integer >= 1`` otherwise. A bool is never a number here
(``True`` is not accepted for an integer or a float). ``hint`` (where a check has one) is appended to the message
after a space, e.g. ``opset=11 must be an integer >= 13 (per-channel QuantizeLinear)``.

A command-line flag may be the ``name``: :func:`shown` then writes ``--iters 0`` (as typed) rather than ``iters=0``.

The domain checks (a bit width, a list of p, an axis, a finite tensor, a batch of images) live here too, so that
every module validates its arguments the same way. This module sits at the bottom of the data flow, below
:mod:`detptq_mini.utils`: it imports the standard library and torch, and no other module of the package.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Literal, get_args, get_origin

import torch
from torch import Tensor

__all__ = [
    "check_int", "check_number", "check_bool", "check_choice", "check_bits", "check_ps", "check_axis",
    "check_finite", "check_images", "shown",
]


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


# ------------------------------------------------------------------ domain checks (bits, p, tensors, images)
def check_bits(name: str, bits) -> int:
    """A bit width: an integer in 2..8."""
    return check_int(name, bits, 2, 8)


def check_ps(ps) -> tuple[float, ...]:
    msg = f"ps={ps!r} must be a non-empty sequence of finite numbers > 0"
    if isinstance(ps, Real) and not isinstance(ps, bool):
        ps = (ps,)
    if isinstance(ps, (str, bool)) or not hasattr(ps, "__iter__"):
        raise ValueError(msg)
    try:
        values = [check_number("ps", p, 0, low_open=True) for p in ps]
    except ValueError:
        raise ValueError(msg) from None
    if not values:
        raise ValueError(msg)
    return tuple(dict.fromkeys(values))  # duplicates dropped, order kept


def check_axis(axis, ndim: int) -> int | None:
    axis = check_int("axis", axis, -ndim, ndim - 1, allow_none=True, hint="(None: per tensor)")
    return None if axis is None else axis % ndim


def check_finite(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(x).__name__}"
                         + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; only finite values can be quantized")


def check_images(images, name: str = "images", min_images: int = 1, min_what: str | None = None) -> torch.Tensor:
    """The one validator of an image batch (a calibration set, the images of a check): returns it as a tensor.

    Args:
        images: an ``(N, 3, H, W)`` floating-point tensor, or a data set with ``.images()`` (such as
            :class:`~detptq_mini.data.ShapesDataset`), which is turned into one.
        name: the argument's name in error messages (``"calib"``, ``"images"``).
        min_images: the fewest images allowed (at least 1: an empty set is always an error).
        min_what: what sets ``min_images``, named in the error (e.g. ``"batch_size=32"``).

    Raises:
        ValueError: naming ``name`` and what is allowed, for a value that is not such a tensor, a wrong shape
            (not 4-D, or not 3 channels), a non-float dtype, NaN or inf values, no images, or fewer than
            ``min_images``.
    """
    if hasattr(images, "images") and callable(images.images) and not isinstance(images, torch.Tensor):
        images = images.images()
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be an (N, 3, H, W) float tensor or a data set with .images(), "
                         f"got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} images must be a float tensor in [0, 1] (e.g. uint8 / 255), got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one image is needed")
    if images.shape[0] < min_images:
        why = f" ({min_what})" if min_what else ""
        raise ValueError(f"{name} has {images.shape[0]} images, fewer than the {min_images} needed{why}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} images contain NaN or inf; only finite values are allowed")
    return images

"""The shared argument checks: what each accepts (and returns), what it refuses, and what its message says."""

import math
import re
from fractions import Fraction
from typing import Literal

import numpy as np
import pytest
import torch

from detptq_mini.checks import check_bool, check_choice, check_int, check_number, shown


def _fails(call, *words):
    """``call()`` raises a ValueError whose message contains every one of ``words``; returns the message."""
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ------------------------------------------------------------------ check_int
@pytest.mark.parametrize("value", [0, 1, -3, 7, 10**30, np.int64(5), np.int32(-2), np.uint8(3)])
def test_int_accepts_integers_and_returns_a_python_int(value):
    out = check_int("n", value)
    assert type(out) is int and out == int(value)


def test_int_bounds_are_inclusive():
    assert check_int("bits", 2, 2, 8) == 2 and check_int("bits", 8, 2, 8) == 8
    assert check_int("seed", 0, 0) == 0 and check_int("k", -5, high=-5) == -5


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, 2.5, "3", None, [1], torch.tensor(3),
                                   Fraction(4, 1), math.nan])
def test_int_refuses_bools_and_non_integers(value):
    assert _fails(lambda: check_int("iters", value), f"iters={value!r} must be an integer") \
        == f"iters={value!r} must be an integer"


@pytest.mark.parametrize("value, low, high, allowed", [
    (0, 1, None, "an integer >= 1"),
    (-1, 0, None, "an integer >= 0"),
    (9, 2, 8, "an integer in 2..8"),
    (1, 2, 8, "an integer in 2..8"),
    (np.int64(9), 2, 8, "an integer in 2..8"),
    (4, None, 3, "an integer <= 3"),
])
def test_int_out_of_range_names_argument_value_and_range(value, low, high, allowed):
    msg = _fails(lambda: check_int("w_bits", value, low, high))
    assert msg == f"w_bits={value!r} must be {allowed}"


def test_int_allow_none_and_hint():
    assert check_int("select_images", None, 1, allow_none=True) is None
    assert _fails(lambda: check_int("select_images", None, 1)) == "select_images=None must be an integer >= 1"
    assert _fails(lambda: check_int("select_images", 0, 1, allow_none=True)) \
        == "select_images=0 must be an integer >= 1 or None"
    assert _fails(lambda: check_int("opset", 11, 13, hint="(per-channel QuantizeLinear)")) \
        == "opset=11 must be an integer >= 13 (per-channel QuantizeLinear)"


# ------------------------------------------------------------------ check_number
@pytest.mark.parametrize("value", [0, 2, 2.5, -1e300, np.float32(0.25), np.float64(3.0), np.int64(4), Fraction(1, 4)])
def test_number_accepts_finite_reals_and_returns_a_float(value):
    out = check_number("p", value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(False), "2", None, [1.0], torch.tensor(1.0), 1 + 2j])
def test_number_refuses_bools_and_non_numbers(value):
    assert _fails(lambda: check_number("lam", value, 0)) == f"lam={value!r} must be a finite number >= 0"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), 10**400])
def test_number_refuses_nan_inf_and_overflow(value):
    msg = _fails(lambda: check_number("p", value, 0, low_open=True))
    assert msg == f"p={value!r} must be a finite number > 0"


def test_number_open_and_closed_bounds():
    assert check_number("lam", 0, 0) == 0.0
    _fails(lambda: check_number("p", 0, 0, low_open=True), "p=0 must be a finite number > 0")
    _fails(lambda: check_number("p", 0.0, 0, low_open=True), "p=0.0 must be a finite number > 0")
    assert check_number("quant_prob", 1, 0, 1, low_open=True) == 1.0
    assert _fails(lambda: check_number("quant_prob", 0.0, 0, 1, low_open=True)) \
        == "quant_prob=0.0 must be a finite number in (0, 1]"
    assert _fails(lambda: check_number("quant_prob", 1.5, 0, 1, low_open=True)) \
        == "quant_prob=1.5 must be a finite number in (0, 1]"
    assert check_number("warmup", 0, 0, 1, high_open=True) == 0.0
    assert _fails(lambda: check_number("warmup", 1.0, 0, 1, high_open=True)) \
        == "warmup=1.0 must be a finite number in [0, 1)"
    assert _fails(lambda: check_number("fg_thresh", 0.0, 0, 1, low_open=True, high_open=True)) \
        == "fg_thresh=0.0 must be a finite number in (0, 1)"
    assert _fails(lambda: check_number("x", 3, high=2)) == "x=3 must be a finite number <= 2"
    assert _fails(lambda: check_number("x", 2, high=2, high_open=True)) == "x=2 must be a finite number < 2"


def test_number_allow_none_and_hint():
    assert check_number("lr_v", None, allow_none=True) is None
    assert _fails(lambda: check_number("lr_v", math.nan, allow_none=True)) == "lr_v=nan must be a finite number or None"
    assert _fails(lambda: check_number("lr_v", None)) == "lr_v=None must be a finite number"
    assert _fails(lambda: check_number("beta", -1.0, 0, low_open=True, hint="(the temperature)")) \
        == "beta=-1.0 must be a finite number > 0 (the temperature)"


# ------------------------------------------------------------------ check_bool
def test_bool_accepts_only_bools():
    assert check_bool("separate", True) is True and check_bool("separate", False) is False
    for value in (0, 1, np.bool_(True), "True", None, 1.0, torch.tensor(True)):
        assert _fails(lambda: check_bool("separate", value)) == f"separate={value!r} must be a bool (True or False)"


# ------------------------------------------------------------------ check_choice
Mode = Literal["kl", "l2"]


def test_choice_accepts_members_of_a_literal_or_a_tuple():
    assert check_choice("cls", "kl", Mode) == "kl" and check_choice("cls", "l2", Mode) == "l2"
    assert check_choice("kind", "act", ("weight", "act")) == "act"
    assert check_choice("kind", "act", ["weight", "act"]) == "act"
    assert check_choice("axis", None, (None, 0)) is None and check_choice("axis", 0, (None, 0)) == 0
    assert check_choice("cls", np.str_("kl"), Mode) == "kl"  # a str subclass is a str


@pytest.mark.parametrize("value", ["js", "KL", "", None, 1, ["kl"], ("kl",), np.array(["kl"]), b"kl"])
def test_choice_refuses_others_and_lists_the_allowed_values(value):
    msg = _fails(lambda: check_choice("cls", value, Mode))
    assert msg == f"cls={value!r} is not allowed; allowed: 'kl', 'l2'"


def test_choice_does_not_confuse_bools_numbers_and_strings():
    for value in (True, False, 1.0, "0"):
        _fails(lambda: check_choice("axis", value, (None, 0, 1)), f"axis={value!r}", "allowed: None, 0, 1")
    _fails(lambda: check_choice("flag", 1, (True, False)), "allowed: True, False")
    assert check_choice("flag", True, (True, False)) is True


# ------------------------------------------------------------------ all of them
@pytest.mark.parametrize("call", [
    lambda: check_int("the_arg", "x", 1), lambda: check_number("the_arg", "x"), lambda: check_bool("the_arg", "x"),
    lambda: check_choice("the_arg", "x", ("a",)),
])
def test_every_message_starts_with_name_equals_value(call):
    assert re.match(r"the_arg='x' (must be|is not allowed)", _fails(call))


def test_the_module_imports_no_other_package_module():
    import ast
    import inspect

    import detptq_mini.checks as checks

    tree = ast.parse(inspect.getsource(checks))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("detptq_mini"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("detptq_mini") for a in node.names)


# ------------------------------------------------------------------ shown: Python argument or command-line flag

def test_shown_writes_python_arguments_with_equals_and_flags_as_typed():
    assert shown("out", "x.json") == "out='x.json'"
    assert shown("--out", "x.json") == "--out 'x.json'"
    assert shown("--only", "") == "--only ''"
    assert shown("iters", 0) == "iters=0"


def test_checks_write_a_flag_name_as_typed():
    assert _fails(lambda: check_int("--iters", 0, 1), "--iters 0 must be an integer >= 1") == \
        "--iters 0 must be an integer >= 1"
    _fails(lambda: check_int("iters", 0, 1), "iters=0 must be an integer >= 1")

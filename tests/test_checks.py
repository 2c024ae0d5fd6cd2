"""lightnets.checks: the shared argument checks and their one message format."""

from __future__ import annotations

import math

import pytest

from lightnets.checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive,
    check_shape,
    check_table,
    is_int,
    is_number,
    pair,
)
from lightnets.errors import UserError


def test_bool_is_never_a_count_or_a_number():
    assert is_int(3) and is_int(0) and not is_int(True) and not is_int(3.0)
    assert is_number(2.5) and is_number(2) and not is_number(False) and not is_number("2")
    with pytest.raises(UserError, match=r"layer: groups=True is invalid: expected an int >= 1"):
        check_int(True, "groups", "layer")


@pytest.mark.parametrize(
    "kwargs, value, expected",
    [
        ({}, 0, "an int >= 1"),
        ({"minimum": 0}, -1, "an int >= 0"),
        ({"minimum": 1, "maximum": 8}, 9, r"an int in \[1, 8\]"),
        ({"minimum": None, "maximum": 3}, 4, "an int <= 3"),
        ({"minimum": None}, 2.0, "an int$"),
    ],
)
def test_check_int_names_the_bounds(kwargs, value, expected):
    with pytest.raises(UserError, match=rf"^f: n={value!r} is invalid: expected {expected}"):
        check_int(value, "n", "f", **kwargs)


def test_check_int_returns_the_value():
    assert check_int(5, "n", "f", minimum=1, maximum=5) == 5
    assert check_int(-3, "n", minimum=None) == -3


def test_check_number_bounds_and_finiteness():
    assert check_number(1, "eps", "bn", minimum=0, open_minimum=True) == 1.0
    assert check_number(0.0, "d_max", "brn", minimum=0) == 0.0
    assert check_number(1.0, "p", "drop", maximum=1) == 1.0
    with pytest.raises(UserError, match=r"drop: p=1.0 is invalid: expected a finite number < 1"):
        check_number(1.0, "p", "drop", maximum=1, open_maximum=True)
    with pytest.raises(UserError, match=r"eps=0 is invalid: expected a finite number > 0"):
        check_positive(0, "eps", "bn")
    for bad in (math.inf, math.nan, True, "1"):
        with pytest.raises(UserError):
            check_positive(bad, "x")
    assert isinstance(check_positive(2, "x"), float)


def test_bool_choice_table():
    assert check_bool(False, "affine", "bn") is False
    with pytest.raises(UserError, match="affine=1 is invalid: expected true or false"):
        check_bool(1, "affine", "bn")
    assert check_choice("cov", "impl", "fbn", ("naive", "cov")) == "cov"
    with pytest.raises(UserError, match=r"impl='naiv' .*one of naive, cov.*did you mean 'naive'"):
        check_choice("naiv", "impl", "fbn", ("naive", "cov"))
    assert check_table(None, "norm_kwargs") == {}
    table = {"num_groups": 2}
    assert check_table(table, "norm_kwargs") == table and check_table(table, "x") is not table
    with pytest.raises(UserError, match=r"m: norm_kwargs=32 .*a table \(dict\).*e\.g\. \{a = 1\}"):
        check_table(32, "norm_kwargs", "m", "{a = 1}")


def test_pair_and_shape():
    assert pair(3, "kernel_size") == (3, 3) and pair([1, 2], "stride") == (1, 2)
    for bad in (True, (1,), (1, 2.0), "3", (1, True)):
        with pytest.raises(UserError, match="expected an int or a pair of ints"):
            pair(bad, "kernel_size", "conv")
    assert check_shape([1, 3, 8, 8], "input_size") == (1, 3, 8, 8)
    for bad in ((), (1, 0), "224", (1, 3.0), None):
        with pytest.raises(UserError, match=r"input_size=.* positive ints like \(1, 3, 224, 224\)"):
            check_shape(bad, "input_size", "export")

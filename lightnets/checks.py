"""Argument checks shared by every layer of the package: one idiom, one message format.

Every check takes the value, `what` (the argument's name as the caller spelled it) and `where`
(the layer, model or function that received it) and either returns the value, normalized, or
raises `lightnets.errors.UserError` with one line:

    "<where>: <what>=<value!r> is invalid: expected <what was expected>"

``bool`` is a subclass of ``int`` in Python, so ``True`` passes ``isinstance(x, int)``: a flag
given where a count belongs (``fbn_groups=True``) would silently mean 1. `is_int` and
`is_number` are the one place that says "an int, not a bool"; use them instead of repeating
``isinstance(x, int) and not isinstance(x, bool)``.

This module imports nothing from lightnets but `errors`, so any layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightnets.errors import UserError, did_you_mean

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_positive",
    "check_shape",
    "check_table",
    "invalid",
    "is_int",
    "is_number",
    "pair",
]


def is_int(value: Any) -> bool:
    """An int and not a bool (``True`` is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def invalid(what: str, value: Any, where: str, expected: str) -> UserError:
    """The UserError every check raises: ``<where>: <what>=<value> is invalid: expected ...``."""
    prefix = f"{where}: " if where else ""
    return UserError(f"{prefix}{what}={value!r} is invalid: expected {expected}")


def check_int(
    value: Any, what: str, where: str = "", *, minimum: int | None = 1, maximum: int | None = None
) -> int:
    """`value` if it is an int (not a bool) in [minimum, maximum]; None bounds are open."""
    low_ok = minimum is None or (is_int(value) and value >= minimum)
    high_ok = maximum is None or (is_int(value) and value <= maximum)
    if not (is_int(value) and low_ok and high_ok):
        if minimum is not None and maximum is not None:
            expected = f"an int in [{minimum}, {maximum}]"
        elif minimum is not None:
            expected = f"an int >= {minimum}"
        elif maximum is not None:
            expected = f"an int <= {maximum}"
        else:
            expected = "an int"
        raise invalid(what, value, where, expected)
    return value


def check_number(
    value: Any,
    what: str,
    where: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    open_maximum: bool = False,
) -> float:
    """`value` as a float if it is a finite number (not a bool) within the bounds.

    open_minimum / open_maximum exclude the bound itself (``minimum=0, open_minimum=True``: > 0).
    """
    ok = is_number(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if open_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_maximum else value <= maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if open_minimum else '>='} {minimum:g}")
        if maximum is not None:
            bounds.append(f"{'<' if open_maximum else '<='} {maximum:g}")
        expected = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
        raise invalid(what, value, where, expected)
    return float(value)


def check_positive(value: Any, what: str, where: str = "") -> float:
    """`value` as a float if it is a finite number > 0."""
    return check_number(value, what, where, minimum=0, open_minimum=True)


def check_bool(value: Any, what: str, where: str = "") -> bool:
    """`value` if it is True or False (not 0 / 1, not a string)."""
    if not isinstance(value, bool):
        raise invalid(what, value, where, "true or false")
    return value


def check_choice(value: Any, what: str, where: str, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`; the error lists them and suggests a close one."""
    if not isinstance(value, str) or value not in choices:
        raise invalid(
            what, value, where, f"one of {', '.join(choices)}" + did_you_mean(str(value), choices)
        )
    return value


def check_table(value: Any, what: str, where: str = "", example: str = "") -> dict[str, Any]:
    """`value` as a new dict if it is a mapping (a TOML table), {} for None."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        hint = f", e.g. {example}" if example else ""
        raise invalid(what, value, where, f"a table (dict) of options{hint}")
    return dict(value)


def pair(value: Any, what: str, where: str = "") -> tuple[int, int]:
    """An int or a pair of ints (a kernel size, stride, padding) as a pair (torch's _pair)."""
    if is_int(value):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return (value[0], value[1])
    raise invalid(what, value, where, "an int or a pair of ints")


def check_shape(
    value: Any, what: str, where: str = "", *, example: str = "(1, 3, 224, 224)"
) -> tuple[int, ...]:
    """A non-empty sequence of ints >= 1 (an input size) as a tuple."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    if not (ok and all(is_int(s) and s >= 1 for s in value)):
        raise invalid(what, value, where, f"positive ints like {example}")
    return tuple(value)

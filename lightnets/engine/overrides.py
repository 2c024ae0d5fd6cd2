"""`--set KEY=VALUE`: the repeatable option and the parsing of what users type into it.

Shared by the `lightnets` commands and the experiments (`lightnets repro NAME`), which is why
it lives below both: values are TOML literals ("4" -> 4, "true" -> True, "[1, 2]" -> [1, 2]),
anything that is not one stays the text it is ("bn" -> "bn").
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lightnets.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["add_set_option", "parse_kwargs", "parse_literal"]


def add_set_option(parser: argparse.ArgumentParser, help: str, dest: str = "overrides") -> None:
    """The repeatable `--set KEY=VALUE` option every command with overrides takes."""
    parser.add_argument(
        "--set", dest=dest, action="append", default=[], metavar="KEY=VALUE", help=help
    )


def parse_literal(text: str) -> Any:
    """A TOML literal (int, float, bool, string, array, inline table) or, failing that, the text.

    "4" -> 4, "0.5" -> 0.5, "true" -> True, '"bn"' -> "bn", "bn" -> "bn", "[1, 2]" -> [1, 2].
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_kwargs(items: list[str] | None, what: str = "--set") -> dict[str, Any]:
    """["fbn_groups=4", "cifar_stem=true"] -> {"fbn_groups": 4, "cifar_stem": True}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"{what} {item!r}: expected KEY=VALUE, e.g. fbn_groups=4")
        out[key] = parse_literal(value.strip())
    return out

"""Command-line options the experiments share, and the checks of what users type into them.

Every `lightnets repro NAME` takes `--set`, `--out`, `--overwrite` and `--no-progress`
(`add_run_options`); counts must be >= 1 (`check_counts`), lists are comma-separated
(`int_list`), and values that go into config overrides are TOML literals (`toml_string`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightnets.engine.overrides import add_set_option
from lightnets.errors import UserError

__all__ = ["add_run_options", "check_counts", "int_list", "toml_string"]


def add_run_options(p: argparse.ArgumentParser, set_example: str, default_out: str) -> None:
    """--set, --out, --overwrite and --no-progress, in this order (as --help lists them)."""
    add_set_option(p, f"config override passed to every run, e.g. --set {set_example}")
    p.add_argument("--out", type=Path, help=f"experiment dir (default {default_out})")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing --out dir and start afresh"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or epoch lines")


def check_counts(args: argparse.Namespace, *options: str) -> None:
    """Refuse a count option given below 1, in the order named: '--epochs 0: expected at
    least 1' (an option left out, None, is fine)."""
    for option in options:
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} {value}: expected at least 1")


def int_list(text: str | None, option: str) -> list[int] | None:
    """Comma-separated integers >= 1 from a command-line option (None when not given)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"{option} {text!r}: expected comma-separated integers >= 1, e.g. 1,2,4")
    return list(dict.fromkeys(values))  # keep the order, drop repeats


def toml_string(text: str) -> str:
    """A TOML basic string literal (config overrides are read as TOML values)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

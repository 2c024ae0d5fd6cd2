"""The options every Bop experiment shares (data, seeds, length, overrides, out dir) and what
they imply (`BopSetting`: recipe overrides, the out dir, the settings stored in
experiment.json), with the number formats of the Bop sweeps.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lightnets.errors import UserError
from lightnets.experiments.bop.paper import FULL_MNIST_BN_MOMENTUM, SHOWN
from lightnets.experiments.options import add_run_options, check_counts, toml_string

__all__ = ["BopSetting", "add_common_arguments", "float_list", "sci"]


def add_common_arguments(
    p: argparse.ArgumentParser, name: str, seeds: int, data: tuple[str, ...], epochs: str
) -> None:
    """The options of every Bop experiment (`epochs`: the help of --epochs)."""
    p.add_argument(
        "--data",
        choices=data,
        default=data[0],
        help=f"{data[0]} (default)"
        + ("" if len(data) == 1 else f", or {' / '.join(data[1:])} from --root"),
    )
    p.add_argument(
        "--root", help="data folder for " + " / ".join(d for d in data if d != "mnist5k")
    )
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds (default {seeds})")
    p.add_argument("--epochs", type=int, help=epochs)
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke runs)")
    add_run_options(p, "data.batch_size=32", f"runs/repro/{name}-<data>")


class BopSetting:
    """Validated common options: recipe, overrides, out dir, what goes to settings.

    `overrides` are the experiment's (data, epochs, max steps), then the user's --set, then
    display options; `all(extra)` puts an experiment's own overrides before the user's.
    """

    def __init__(self, args: argparse.Namespace, name: str, recipe: str, epochs: int) -> None:
        check_counts(args, "seeds", "epochs", "max_steps", "retrain_epochs")
        self.name, self.recipe, self.data = name, recipe, args.data
        self.processes = getattr(args, "processes", None)
        overrides: list[str] = []
        if self.data == "mnist5k":
            if args.root is not None:
                raise UserError("--data mnist5k is bundled and reads no files: expected no --root")
            self.root = None
        else:
            if not args.root:
                raise UserError(
                    f"--data {self.data} needs --root PATH (the folder holding its files): "
                    "expected a path"
                    + ("; for a CPU-scale run use --data mnist5k" if self.data == "mnist" else "")
                )
            self.root = str(Path(args.root).expanduser().resolve())
            overrides += [f"data.name={self.data}", f"data.root={toml_string(self.root)}"]
            if self.data == "mnist":  # the recipes' BN momentum is for the 15x shorter subset
                overrides.append(f"model.args.bn_momentum={FULL_MNIST_BN_MOMENTUM}")
        self.epochs = args.epochs or epochs
        overrides.append(f"train.epochs={self.epochs}")
        self.max_steps = args.max_steps
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        self.base = overrides
        self.user = list(args.overrides)
        self.tail = ["train.progress=false"] if args.no_progress else []
        self.overrides = self.all()
        self.seeds = list(range(args.seeds))
        self.out = Path(args.out or Path("runs") / "repro" / f"{name}-{self.data}")
        self.overwrite = args.overwrite
        self.shown = SHOWN[self.data]

    def all(self, extra: list[str] = ()) -> list[str]:
        """The experiment's overrides, `extra`, the user's --set, display options."""
        return [*self.base, *extra, *self.user, *self.tail]

    def settings(self, **more: Any) -> dict[str, Any]:
        """The arguments that define the runs (experiment.json), with the experiment's `more`."""
        return {
            "data": self.data,
            "root": self.root,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "set": self.user,
            **more,
        }

    def shown_overrides(self, extra: list[str] = ()) -> str:
        """The overrides as the notes show them (display options left out)."""
        return " ".join(o for o in self.all(extra) if not o.startswith("train.progress"))

    def length(self) -> str:
        """The runs' length in words: '6 epochs (max 3 steps)'."""
        text = f"{self.epochs} epochs"
        return text + (f" (max {self.max_steps} steps)" if self.max_steps else "")


def float_list(text: str | None, option: str, default: tuple[float, ...]) -> list[float]:
    """Comma-separated numbers >= 0 from an option: `default` when not given, [] for 'none'."""
    if text is None:
        return list(default)
    if text.strip().lower() == "none":
        return []
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"{option} {text!r}: expected comma-separated numbers >= 0, e.g. 1e-3,1e-4")
    return list(dict.fromkeys(values))


def sci(value: float) -> str:
    """1e-06 -> '1e-6', 0.001 -> '1e-3', 0.0 -> '0'."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"

"""The options the weight-mechanism experiments share and what they imply (`WmSetting`: the
recipe of the data, the base overrides, the model widths, the settings stored in
experiment.json), with the override that sets a U-Net's arguments."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lightnets.engine.config import load_config
from lightnets.errors import UserError
from lightnets.experiments.options import add_run_options, check_counts, toml_string
from lightnets.experiments.weight_mechanism.paper import (
    CPU_SEEDS,
    CPU_WIDTHS,
    DATA_CHOICES,
    PAPER_RUNS,
    PAPER_TABLE2,
    PAPER_WIDTHS,
    RECIPES,
    WM_VARIANTS,
)

__all__ = ["WmSetting", "add_common_arguments", "model_args_override", "pick_variants"]


def add_common_arguments(p: argparse.ArgumentParser, name: str, bn_init: bool) -> None:
    """The options of every weight-mechanism experiment (`bn_init`: wm-table's own two)."""
    p.add_argument(
        "--data",
        choices=DATA_CHOICES,
        default="synthetic",
        help="synthetic (generated scenes, CPU minutes; default) or buildings (Massachusetts "
        "tiles under --root, made by `lightnets data tile`; the paper's scale)",
    )
    p.add_argument("--root", help="tile folder for --data buildings ({split}/{images,masks})")
    p.add_argument(
        "--seeds",
        type=int,
        help=f"seeds per variant (default {CPU_SEEDS} on synthetic scenes; {PAPER_RUNS} on "
        "buildings, the paper's runs per model)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="iterations per run (default: the recipe's, 300 synthetic / 180000 buildings)",
    )
    p.add_argument("--lr", type=float, help="base lr (default: the recipe's)")
    p.add_argument(
        "--widths",
        help="model widths per level, the last the bottom (default 8,16,32,64,128 synthetic / "
        "32,64,128,256,512 buildings)",
    )
    if bn_init:
        p.add_argument(
            "--bn-init",
            choices=("normal", "ones"),
            default="normal",
            help="BN weight init: normal = N(0, 1) (Table I, default) or ones (Table II)",
        )
        p.add_argument(
            "--variants",
            help="comma-separated subset of " + ",".join(WM_VARIANTS) + " (default: all six; "
            "with --bn-init ones the four of Table II)",
        )
    add_run_options(p, "data.batch_size=8", f"runs/repro/{name}-<data>...")


def _widths(text: str | None, data: str) -> list[int]:
    if text is None:
        return list(CPU_WIDTHS if data == "synthetic" else PAPER_WIDTHS)
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if len(values) < 2 or any(v < 1 for v in values):
        raise UserError(
            f"--widths {text!r}: expected at least two comma-separated ints >= 1, one per "
            "level, the last the bottom, e.g. 8,16,32,64,128"
        )
    return values


class WmSetting:
    """What the options imply: recipe, base overrides, settings of the experiment."""

    def __init__(self, args: argparse.Namespace, check_root: bool = True) -> None:
        default = PAPER_RUNS if args.data == "buildings" else CPU_SEEDS
        self.seeds = default if args.seeds is None else args.seeds
        check_counts(args, "seeds", "max_steps")
        if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
            raise UserError(f"--lr {args.lr}: expected a positive learning rate")
        self.data = args.data
        self.recipe = RECIPES[self.data]
        overrides = ['data.val_split="test"']
        if self.data == "synthetic":
            if args.root is not None:
                raise UserError(
                    "--data synthetic is generated and reads no files: expected no --root "
                    "(use --data buildings --root TILES for the real tiles)"
                )
            self.root = None
        else:
            if not args.root:
                raise UserError(
                    "--data buildings needs --root TILES: expected the folder written by "
                    "`lightnets data tile` ({split}/{images,masks}); for a CPU-scale run use "
                    "--data synthetic"
                )
            root = Path(args.root).expanduser().resolve()
            if check_root and not root.is_dir():
                raise UserError(f"--root {args.root}: no such directory: expected the tile folder")
            self.root = str(root)
            overrides.append(f"data.root={toml_string(self.root)}")
        self.widths = _widths(args.widths, self.data)
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        if args.lr is not None:
            overrides.append(f"optim.lr={args.lr}")
        self.overrides = overrides
        self.user_overrides = list(args.overrides)
        self.tail = ["train.progress=false"] if args.no_progress else []
        self.max_steps = args.max_steps
        self.lr = args.lr
        self.processes = getattr(args, "processes", None)

    def base(self) -> list[str]:
        return [*self.overrides, *self.user_overrides, *self.tail]

    def settings(self, **more: Any) -> dict[str, Any]:
        return {
            "data": self.data,
            "root": self.root,
            "max_steps": self.max_steps,
            "lr": self.lr,
            "widths": self.widths,
            "set": self.user_overrides,
            **more,
        }

    def note(self, seeds: int) -> str:
        """The 'Setting: ...' note of the results table."""
        cfg = load_config(self.recipe, self.base())
        shown = " ".join(o for o in self.base() if not o.startswith("train.progress"))
        size = cfg.data.args.get("size", 250) if self.data == "synthetic" else "250 (tiles)"
        return (
            f"Setting: recipe `{self.recipe}` with `{shown or '(no overrides)'}`; model widths "
            f"{self.widths}; {cfg.train.max_steps} iterations of batch {cfg.data.batch_size}, "
            f"lr {cfg.optim.lr:g} (poly 0.9), crops {cfg.data.image_size} from scenes of "
            f"{size}; {seeds} seed(s); metrics at the last iteration on the test split."
        )


def model_args_override(widths: list[int], extra: dict[str, Any]) -> str:
    """A TOML inline table of model arguments (replaces the recipe's model.args)."""
    items = {**extra, "widths": widths}
    parts = []
    for key, value in items.items():
        if isinstance(value, str):
            parts.append(f"{key} = {toml_string(value)}")
        elif isinstance(value, list):
            parts.append(f"{key} = [{', '.join(str(v) for v in value)}]")
        else:
            parts.append(f"{key} = {value}")
    return "model.args={" + ", ".join(parts) + "}"


def pick_variants(text: str | None, bn_init: str) -> list[str]:
    if text is None:
        return list(WM_VARIANTS) if bn_init == "normal" else list(PAPER_TABLE2)
    names = [n for n in text.replace(" ", "").split(",") if n]
    bad = [n for n in names if n not in WM_VARIANTS]
    if not names or bad:
        raise UserError(
            f"--variants {text!r}: expected comma-separated names out of {', '.join(WM_VARIANTS)}"
        )
    return list(dict.fromkeys(names))

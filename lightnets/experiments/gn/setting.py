"""The options the GN experiments share and what they imply (`GnSetting`): the recipe of the
data scale, the batch of N images per process and the lr rule, the scaled lr milestones and
median, the norm overrides, and the spec every GN experiment builds (`gn_spec`).

Batch and learning rate. N is always the images per process (`data.batch_per_process`: BN's
statistics are computed over N images, "within each GPU"), and the global batch is N x W for
W processes (`--processes W`; torchrun's). The paper's rule is lr = 0.1 x N x W / 256 (0.1
for 32 images per GPU on 8 GPUs, 0.1 N / 32 for N per GPU): the folder and CIFAR scales use
exactly that (lr_reference_batch 256), so `--processes 8` is the paper's setting and one
process runs with 1/8 of its lr. The CPU scale (mnist5k, one process) uses lr = 0.1 x N x W /
32 instead: the lr one of the paper's 8 workers used for its N images, which makes 4-epoch
runs on 4000 images train at all (the paper's rule would leave 1/8 of it).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lightnets.data.registry import dataset_info
from lightnets.engine.config import load_config
from lightnets.engine.distributed import env_world_size
from lightnets.engine.trainer import build_datasets
from lightnets.errors import UserError
from lightnets.experiments.gn.paper import (
    BRN_LIMITS,
    BRN_RELAX,
    BRN_WARMUP,
    CPU_REFERENCE_BATCH,
    DATASETS,
    MNIST_EPOCHS,
    PAPER_EPOCHS,
    PAPER_REFERENCE_BATCH,
    PAPER_SETTING,
    median_epochs,
    scaled_milestones,
)
from lightnets.experiments.options import add_run_options, check_counts, int_list, toml_string
from lightnets.experiments.plan import PaperSetting
from lightnets.experiments.spec import ExperimentSpec, Variant

__all__ = [
    "GnSetting",
    "add_common_arguments",
    "gn_spec",
    "list_or_default",
    "norm_list",
    "norm_overrides",
]


def add_common_arguments(p: argparse.ArgumentParser, name: str, seeds: int) -> None:
    """The options of every GN experiment."""
    p.add_argument(
        "--data",
        choices=DATASETS,
        default="mnist5k",
        help="mnist5k (bundled, CPU scale; default), cifar10 / cifar100 or folder (ImageNet "
        "layout) under --root, at the paper's scale",
    )
    p.add_argument("--root", help="data folder for cifar10 / cifar100 / folder")
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds per variant (default {seeds})")
    p.add_argument("--epochs", type=int, help="epochs per run (lr milestones scale with it)")
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke runs)")
    p.add_argument(
        "--lr",
        type=float,
        help="base lr: the lr per 256 images of global batch at the paper's scale, per 32 at the "
        "CPU scale (default 0.1; VGG-16 0.01 / 0.02)",
    )
    add_run_options(p, "data.num_workers=4", f"runs/repro/{name}-<data>")


def list_or_default(text: str | None, option: str, default: tuple[int, ...]) -> list[int]:
    """Comma-separated ints >= 1 from an option: `default` when not given, [] for 'none'."""
    if text is not None and text.strip().lower() == "none":
        return []
    return int_list(text, option) or list(default)


def norm_list(text: str | None, default: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    """--norms: comma-separated norm kinds out of `allowed` (`default` when not given)."""
    if text is None:
        return list(default)
    kinds = [k for k in text.replace(" ", "").split(",") if k]
    bad = [k for k in kinds if k not in allowed]
    if not kinds or bad:
        raise UserError(
            f"--norms {text!r}: expected comma-separated kinds out of {', '.join(allowed)}"
        )
    return list(dict.fromkeys(kinds))


class GnSetting:
    """What the data choice implies: recipe, base overrides, epochs, batch and lr rule."""

    def __init__(self, args: argparse.Namespace, family: str) -> None:
        check_counts(args, "seeds", "epochs", "max_steps")
        if args.lr is not None and not args.lr > 0:
            raise UserError(f"--lr {args.lr}: expected a positive learning rate")
        self.data = args.data
        self.small = self.data == "mnist5k"
        self.processes = getattr(args, "processes", None)
        overrides: list[str] = []
        if self.small:
            if args.root is not None:
                raise UserError("--data mnist5k is bundled and reads no files: expected no --root")
            self.root = None
            self.recipe = "gn_mnist"
            self.reference_batch = CPU_REFERENCE_BATCH
            default_epochs = MNIST_EPOCHS[family]
        else:
            if not args.root:
                raise UserError(
                    f"--data {self.data} needs --root PATH: expected the data folder; for a "
                    "CPU-scale run use --data mnist5k"
                )
            self.root = str(Path(args.root).expanduser().resolve())
            if self.data == "folder":
                self.recipe = "resnet50_gn_imagenet"
            else:
                self.recipe = "resnet_gn_cifar"
                overrides += [f"data.name={self.data}"]
            overrides.append(f"data.root={toml_string(self.root)}")
            self.reference_batch = PAPER_REFERENCE_BATCH
            default_epochs = PAPER_EPOCHS
        # N images per process whatever the recipe says (its batch_size is not used)
        overrides += ["data.batch_size=none", f"optim.lr_reference_batch={self.reference_batch}"]
        self.epochs = args.epochs or default_epochs
        self.median_epochs = median_epochs(self.epochs)
        # 1 epoch: no decay inside the run, but multistep needs a milestone (one at the end)
        marks = scaled_milestones(self.epochs) or [self.epochs]
        milestones = ", ".join(str(m) for m in marks)
        overrides += [f"train.epochs={self.epochs}", f"schedule.milestones=[{milestones}]"]
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        if args.lr is not None:
            overrides.append(f"optim.lr={args.lr}")
        self.overrides = overrides
        self.user_overrides = list(args.overrides)
        self.no_progress = args.no_progress
        self.max_steps = args.max_steps
        shown = {"mnist5k": "MNIST-5k", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
        self.shown_data = shown.get(self.data, "image folder")
        self.paper_label = "paper (ImageNet)" if self.data != "folder" else "paper"
        val = "val" if self.data == "folder" else "test"
        self.plan_metric = (
            f"median top-1 error (%) of the last {self.median_epochs} epoch"
            f"{'s' if self.median_epochs > 1 else ''} on the {val} split"
        )

    def batch(self, n: int) -> str:
        """The override making N images per process."""
        return f"data.batch_per_process={n}"

    def all_overrides(self, extra: list[str] = ()) -> list[str]:
        """Base, then experiment-specific, then the user's --set, then display options."""
        tail = ["train.progress=false"] if self.no_progress else []
        return [*self.overrides, *extra, *self.user_overrides, *tail]

    def settings(self, **more: Any) -> dict[str, Any]:
        return {
            "data": self.data,
            "root": self.root,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "set": self.user_overrides,
            **more,
        }

    def train_size(self, overrides: list[str], read: bool) -> int | None:
        """Images in one training epoch: known for the bundled and CIFAR data; otherwise
        counted from the data when `read` (a plan reads nothing: None)."""
        config = load_config(self.recipe, overrides)
        known = dataset_info(config.data.name).get("train_size")
        if known is not None and config.data.train_split == "train":
            return int(known)
        if not read:
            return None
        train, _ = build_datasets(config)
        return len(train)

    def steps(self, size: int | None, batch: int) -> int | None:
        """Optimizer steps of a run with `batch` images per process (None: size unknown)."""
        if size is None:
            return None
        world = self.processes or env_world_size()
        total = self.epochs * (math.ceil(size / world) // batch)  # each process's share
        return min(total, self.max_steps) if self.max_steps else total

    def rule(self, base_lr: float) -> str:
        """The learning-rate rule in words, for the notes."""
        return (
            f"lr = {base_lr:g} x N x W / {self.reference_batch} for N images on each of W "
            "processes"
            + (
                " (the paper's rule)"
                if self.reference_batch == PAPER_REFERENCE_BATCH
                else " (the lr of one of the paper's 8 workers, reached with one process)"
            )
        )


def norm_overrides(kind: str, steps: int | None = None) -> list[str]:
    """Config overrides selecting norm `kind` (with the paper's GN / BRN options). BRN's
    warm-up is in steps: with `steps` None (a plan, on data whose size is only known by
    reading it) the plan says how the run will set it."""
    if kind == "gn":
        kwargs = "{num_groups = 32}"
    elif kind == "brn":
        if steps is None:
            later = " of the run's steps, counted from the training set when the run starts"
            warmup, relax = f'"{BRN_WARMUP:.0%}{later}"', f'"{BRN_RELAX:.0%}{later}"'
        else:
            warmup, relax = str(int(BRN_WARMUP * steps)), str(int(BRN_RELAX * steps))
        kwargs = (
            f"{{r_max = {BRN_LIMITS['r_max']}, d_max = {BRN_LIMITS['d_max']}, "
            f"warmup_steps = {warmup}, relax_steps = {relax}}}"
        )
    else:
        kwargs = "{}"
    return [f'model.args.norm="{kind}"', f"model.args.norm_kwargs={kwargs}"]


def _note(setting: GnSetting, recipe_overrides: list[str], seeds: int, what: str) -> list[str]:
    shown = " ".join(o for o in recipe_overrides if not o.startswith("train.progress"))
    notes = [
        f"Setting: recipe `{setting.recipe}` on {setting.shown_data} with overrides `{shown}`; "
        f"{setting.epochs} epochs"
        + (f" (max {setting.max_steps} steps)" if setting.max_steps else "")
        + f", {seeds} seed(s). {what}",
    ]
    if setting.data != "folder":
        notes.append(
            "The paper's column is ResNet-50 (Fig. 6: VGG-16) top-1 validation error on "
            "ImageNet, for reference only: at this scale only the direction of differences "
            "between variants is comparable."
        )
    return notes


def gn_spec(
    args: argparse.Namespace,
    setting: GnSetting,
    name: str,
    title: str,
    variants: list[Variant],
    base: list[str],
    what: str,
    paper_setting: PaperSetting = PAPER_SETTING,
    **settings: Any,
) -> ExperimentSpec:
    """The ExperimentSpec shared by the GN experiments: errors, paper column, notes, out dir,
    the median of the last epochs as the headline, the plan's metric and paper setting."""
    return ExperimentSpec(
        experiment=name,
        title=f"{title} — {setting.shown_data}",
        out=Path(args.out or Path("runs") / "repro" / f"{name}-{setting.data}"),
        recipe=setting.recipe,
        variants=variants,
        seeds=list(range(args.seeds)),
        settings=setting.settings(**settings),
        base_overrides=base,
        metric="val_acc1",
        metric_label="top-1 error (%) on the validation split",
        paper_label=setting.paper_label,
        notes=_note(setting, base, args.seeds, what),
        overwrite=args.overwrite,
        as_error=True,
        paper_setting=paper_setting,
        plan_metric=setting.plan_metric,
        processes=setting.processes,
        median_of_last=setting.median_epochs,
    )

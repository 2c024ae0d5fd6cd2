"""Group Normalization experiments (Wu & He, Sec. 4.1): `lightnets repro gn-batch-size`,
`gn-groups` and `gn-feature-dist`.

- gn-batch-size (Table 2, Figs. 1 and 5): BN, GN, BRN, LN and IN at 32, 16, 8, 4 and 2 images
  per worker, lr = base x N / 32 (linear scaling rule), equal epochs. Outputs the long table
  (results.md), a norm x batch-size pivot like Table 2 (table2.md) and error vs. batch size
  like Fig. 1 (fig1.png).
- gn-groups (Table 3): GN with G in 64..1 groups, and with 64..1 channels per group (G varies
  per layer), at 32 images per worker.
- gn-feature-dist (Fig. 6): VGG-16 with no norm / BN / GN; the 1, 20, 80, 99 percentiles of
  the last conv's responses (before norm and ReLU) on a fixed probe batch, recorded during
  training and plotted (fig6.png), with the validation errors.

Data: the bundled MNIST subset by default (`--data mnist5k`, a CPU runs each in minutes):
`resnet_mini` (ResNet for 28x28, every norm width a multiple of 64) with recipe `gn_mnist`,
or VGG-16 at a quarter of the width. Real scale: `--data cifar10|cifar100 --root PATH` (recipe
`resnet_gn_cifar`, ResNet-18) or `--data folder --root PATH` (ImageNet layout, recipe
`resnet50_gn_imagenet`: the paper's own setting). The lr decays at 30/60/90% of training as
the paper's epochs 30/60/90 of 100. The paper's numbers are ResNet-50 (VGG-16) ImageNet
validation errors; at another scale they are shown for reference only.

Batch and learning rate. N is always the images per process (`data.batch_per_process`: BN's
statistics are computed over N images, "within each GPU"), and the global batch is N x W for
W processes (`--processes W`; torchrun's). The paper's rule is lr = 0.1 x N x W / 256 (0.1
for 32 images per GPU on 8 GPUs, 0.1 N / 32 for N per GPU): the folder and CIFAR scales use
exactly that (lr_reference_batch 256), so `--processes 8` is the paper's setting and one
process runs with 1/8 of its lr. The CPU scale (mnist5k, one process) uses lr = 0.1 x N x W /
32 instead: the lr one of the paper's 8 workers used for its N images, which makes 4-epoch
runs on 4000 images train at all (the paper's rule would leave 1/8 of it).

Reported: the paper's statistic, the median top-1 error of the final 5 epochs (of 100), and
the last and best epoch's. Runs of fewer epochs take the median over the same share of
training, the last round(5% of the epochs) epochs and at least one (the final epoch's error at
the CPU scale's 4 epochs).

The numbers in the paper's tables were lost from the text we have (only the captions
survived); they are taken from the published tables and agree with every value the text
quotes (BN 34.7 vs GN 24.1 at 2 images, BN 27.3 / BRN 26.3 / GN 24.2 at 4, LN 25.3, IN 28.4,
2 channels per group 25.6, VGG-16 GN 0.4 better than BN).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lightnets.data.registry import dataset_info
from lightnets.engine.callbacks import Callback
from lightnets.engine.distributed import env_world_size
from lightnets.engine.overrides import add_set_option
from lightnets.errors import UserError
from lightnets.experiments import register_experiment
from lightnets.experiments.base import (
    int_list,
    is_main_process,
    mean_std,
    plan_spec,
    save_figure,
    toml_string,
    write_text,
)
from lightnets.experiments.plan import PaperSetting

# ResNet-50, ImageNet val top-1 error (%), 32 images/GPU unless a batch column says otherwise.
#: Table 2 (and Table 1 for LN / IN at 32, the text for BRN at 4): [norm][images per worker].
PAPER_TABLE2: dict[str, dict[int, float]] = {
    "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
    "brn": {4: 26.3},
    "ln": {32: 25.3},
    "in": {32: 28.4},
}
#: Table 3, top: a given number of groups (G = 1 is LN).
PAPER_TABLE3_GROUPS: dict[int, float] = {
    64: 24.6, 32: 24.1, 16: 24.6, 8: 24.4, 4: 24.6, 2: 24.7, 1: 25.3
}  # fmt: skip
#: Table 3, bottom: a given number of channels per group (1 is IN).
PAPER_TABLE3_CPG: dict[int, float] = {
    64: 24.4, 32: 24.5, 16: 24.2, 8: 24.3, 4: 24.8, 2: 25.6, 1: 28.4
}  # fmt: skip
#: Fig. 6 (right): VGG-16, 32 images/GPU.
PAPER_FIG6: dict[str, float] = {"none": 29.2, "bn": 28.0, "gn": 27.6}

NORM_LABELS = {"bn": "BN", "gn": "GN", "brn": "BRN", "ln": "LN", "in": "IN", "none": "no norm"}
DATASETS = ("mnist5k", "cifar10", "cifar100", "folder")
DEFAULT_NORMS = ("bn", "gn", "brn", "ln", "in")
DEFAULT_BATCHES = (32, 16, 8, 4, 2)
DEFAULT_GROUPS = (64, 32, 16, 8, 4, 2, 1)
DEFAULT_CPG = (64, 32, 16, 8, 4, 2, 1)
#: BRN limits the paper chose for ResNet-50 (Sec. 4.1), and the warm-up of r/d as fractions of
#: all training steps (Ioffe: BN for the first ~3%, relaxed to the limits over the next ~20%).
BRN_LIMITS = {"r_max": 1.5, "d_max": 0.5}
BRN_WARMUP, BRN_RELAX = 0.05, 0.25
#: The paper decays lr x0.1 at epochs 30, 60, 90 of 100.
LR_DECAY_FRACTIONS = (0.3, 0.6, 0.9)
MNIST_EPOCHS = {"resnet": 4, "vgg": 4}
#: VGG-16's lr at the CPU scale, at 32 images (0.1 without a norm diverges there).
VGG_LR = 0.02
#: VGG-16's lr per 256 images at the paper's scale (the paper gives none; torchvision's VGG
#: recipe trains VGG-16 on ImageNet with 0.01 at a batch of 256).
VGG_LR_PAPER_SCALE = 0.01
PAPER_EPOCHS = 100
#: The paper's workers and images per worker (§4.1: 8 GPUs, 32 images per GPU).
PAPER_PROCESSES = 8
PAPER_BATCH = 32
#: lr = optim.lr x global batch / this: 256 at the paper's scale (0.1 per 256 images); the CPU
#: scale's 32 is the lr one of the paper's workers used for its images (see the module doc)
PAPER_REFERENCE_BATCH = 256
CPU_REFERENCE_BATCH = 32
#: the paper's statistic: the median error of the final 5 of its 100 epochs
PAPER_MEDIAN_EPOCHS = 5

#: §4.1's ImageNet augmentation as we can run it: the random-resized crop of [58] (done by
#: the folder dataset per image while loading), horizontal flip, per-channel normalization.
PAPER_AUGMENT = [
    {
        "random_resized_crop": {
            "size": [224, 224],
            "scale": [0.08, 1.0],
            "ratio": [3 / 4, 4 / 3],
            "when": "per image while loading",
        }
    },
    {"hflip": {"p": 0.5}},
    "normalize",
]
#: The paper's setting of the ResNet-50 runs (Sec. 4.1); variants add norm and batch.
PAPER_SETTING = PaperSetting(
    source="GN §4.1",
    model="resnet50",
    model_args={"zero_init_last": True},  # variants add their norm
    dataset="folder",
    processes=PAPER_PROCESSES,
    batch_per_process=PAPER_BATCH,
    global_batch=PAPER_PROCESSES * PAPER_BATCH,
    lr=0.1,
    weight_decay=1e-4,  # "for all weight layers, including gamma and beta"
    epochs=PAPER_EPOCHS,
    schedule={"name": "multistep", "unit": "epoch", "milestones": [30, 60, 90], "gamma": 0.1},
    augment=PAPER_AUGMENT,
    metric="median top-1 error (%) of the last 5 epochs on the val split",
    # "Other implementation details follow [17]" (fb.resnet.torch): SGD with Nesterov momentum
    config={
        "optim.name": "sgd",
        "optim.momentum": 0.9,
        "optim.nesterov": True,
        "train.sync_bn": False,
    },
    notes=(
        "no colour jitter or PCA lighting noise: the paper's augmentation is [58]'s as "
        "implemented by fb.resnet.torch, of which we have the random-resized crop and the flip",
        "reading: Nesterov momentum, from 'other implementation details follow [17]' "
        "(fb.resnet.torch's SGD); the paper says only momentum",
    ),
)


def median_epochs(epochs: int) -> int:
    """Epochs the reported median is taken over: the paper's last 5 of 100, the same share
    of a run of `epochs` (at least 1)."""
    return max(1, round(epochs * PAPER_MEDIAN_EPOCHS / PAPER_EPOCHS))


def scaled_milestones(epochs: int) -> list[int]:
    """Epochs after which lr / 10: the paper's 30/60/90 of 100 scaled to `epochs` (< epochs).

    Rounded up, so a short run keeps the largest lr for at least 30% of its epochs (4 -> 2, 3).
    """
    marks = {math.ceil(epochs * f - 1e-9) for f in LR_DECAY_FRACTIONS}
    return sorted(m for m in marks if 0 < m < epochs)


# ----------------------------------------------------------------------------- options
def _add_common(p: argparse.ArgumentParser, name: str, seeds: int) -> None:
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
    add_set_option(p, "config override passed to every run, e.g. --set data.num_workers=4")
    p.add_argument("--out", type=Path, help=f"experiment dir (default runs/repro/{name}-<data>)")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing --out dir and start afresh"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or epoch lines")


def add_batch_size_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro gn-batch-size`."""
    _add_common(p, "gn-batch-size", seeds=2)
    p.add_argument("--norms", help="norm kinds, comma-separated (default bn,gn,brn,ln,in)")
    p.add_argument("--batch-sizes", help="images per worker, comma-separated (default 32,16,8,4,2)")


def add_groups_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro gn-groups`."""
    _add_common(p, "gn-groups", seeds=2)
    p.add_argument("--groups", help="numbers of groups G (default 64,32,16,8,4,2,1; none: skip)")
    p.add_argument(
        "--channels-per-group",
        help="channels per group (default 64,32,16,8,4,2,1; none: skip)",
    )


def add_feature_dist_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro gn-feature-dist`."""
    _add_common(p, "gn-feature-dist", seeds=1)
    p.add_argument("--norms", help="norm kinds (default none,bn,gn)")
    p.add_argument(
        "--probe-images", type=int, default=256, help="training images in the probe batch"
    )
    p.add_argument(
        "--records", type=int, default=60, help="percentile records per run (default 60)"
    )


def _list_or_default(text: str | None, option: str, default: tuple[int, ...]) -> list[int]:
    if text is not None and text.strip().lower() == "none":
        return []
    return int_list(text, option) or list(default)


def _norm_list(text: str | None, default: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    if text is None:
        return list(default)
    kinds = [k for k in text.replace(" ", "").split(",") if k]
    bad = [k for k in kinds if k not in allowed]
    if not kinds or bad:
        raise UserError(
            f"--norms {text!r}: expected comma-separated kinds out of {', '.join(allowed)}"
        )
    return list(dict.fromkeys(kinds))


class _Setting:
    """What the data choice implies: recipe, base overrides, epochs, batch and lr rule."""

    def __init__(self, args: argparse.Namespace, family: str) -> None:
        if args.seeds < 1:
            raise UserError(f"--seeds {args.seeds}: expected at least 1")
        for option in ("epochs", "max_steps"):
            value = getattr(args, option)
            if value is not None and value < 1:
                raise UserError(f"--{option.replace('_', '-')} {value}: expected at least 1")
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
        from lightnets.engine.config import load_config
        from lightnets.engine.trainer import build_datasets

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


def _norm_overrides(kind: str, steps: int | None = None) -> list[str]:
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


def _paper_norm(kind: str) -> dict[str, Any]:
    """The paper's model arguments for norm `kind` (BRN: its r_max / d_max, Sec. 4.1)."""
    if kind == "gn":
        return {"norm": "gn", "norm_kwargs": {"num_groups": 32}}
    if kind == "brn":
        return {
            "norm": "brn",
            "norm_kwargs.r_max": BRN_LIMITS["r_max"],
            "norm_kwargs.d_max": BRN_LIMITS["d_max"],
        }
    return {"norm": kind, "norm_kwargs": {}}


BRN_NOTE = (
    f"not stated in the paper: Batch Renorm's r/d warm-up; ours is plain BN for the first "
    f"{BRN_WARMUP:.0%} of the steps, then r_max / d_max relaxed to their limits over the next "
    f"{BRN_RELAX:.0%} (Ioffe's schedule, in steps)"
)


def _note(setting: _Setting, recipe_overrides: list[str], seeds: int, what: str) -> list[str]:
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


def _gn_spec(
    args: argparse.Namespace,
    setting: _Setting,
    name: str,
    title: str,
    variants: list,
    base: list[str],
    what: str,
    paper_setting: PaperSetting = PAPER_SETTING,
    **settings: Any,
):
    """The ExperimentSpec shared by the GN experiments: errors, paper column, notes, out dir,
    the median of the last epochs as the headline, the plan's metric and paper setting."""
    from lightnets.experiments.base import ExperimentSpec

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


# ----------------------------------------------------------------------------- gn-batch-size
def batch_size_spec(args: argparse.Namespace, read_data: bool = True):
    """The runner's ExperimentSpec for parsed `gn-batch-size` arguments (validates them).
    `read_data=False` (a plan): BRN's warm-up steps are left out where the size of the
    training set is not known without reading it."""
    from lightnets.experiments.base import Variant

    setting = _Setting(args, "resnet")
    norms = _norm_list(args.norms, DEFAULT_NORMS, ("bn", "gn", "brn", "ln", "in", "none"))
    batches = _list_or_default(args.batch_sizes, "--batch-sizes", DEFAULT_BATCHES)
    if not batches:
        raise UserError("--batch-sizes none: expected at least one batch size")
    base = setting.all_overrides()
    size = setting.train_size(base, read_data) if "brn" in norms else None
    variants = []
    for kind in norms:
        for n in batches:
            workers = PAPER_PROCESSES
            paper = {
                "model_args": _paper_norm(kind),
                "batch_per_process": n,
                "global_batch": n * workers,
                "lr": 0.1 * n * workers / PAPER_REFERENCE_BATCH,
            }
            if kind == "brn":
                paper["notes"] = (BRN_NOTE,)
            variants.append(
                Variant(
                    name=f"{kind}-b{n}",
                    label=f"{NORM_LABELS[kind]}, {n}/worker",
                    overrides=[*_norm_overrides(kind, setting.steps(size, n)), setting.batch(n)],
                    paper=PAPER_TABLE2.get(kind, {}).get(n),
                    baseline=f"bn-b{n}" if "bn" in norms and kind != "bn" else None,
                    paper_setting=paper,
                )
            )
    lr = args.lr or 0.1
    return _gn_spec(
        args,
        setting,
        "gn-batch-size",
        "gn-batch-size (Table 2): validation error vs images per worker",
        variants,
        base,
        f"{setting.rule(lr)}; BRN with "
        f"r_max {BRN_LIMITS['r_max']}, d_max {BRN_LIMITS['d_max']}, plain BN for the first "
        f"{BRN_WARMUP:.0%} of the steps, limits relaxed over the next {BRN_RELAX:.0%}. "
        "Δ columns: this norm minus BN at the same batch size.",
        norms=norms,
        batch_sizes=batches,
        lr=args.lr,
    )


def _cell(summary, paper: float | None) -> str:
    ours = "—" if not summary.n else mean_std(summary)
    return ours + ("" if paper is None else f" ({paper:.1f})")


def batch_size_table(results) -> str:
    """Table 2 as a pivot: one row per norm, one column per batch size; paper in parentheses."""
    spec = results.spec
    norms = list(dict.fromkeys(v.variant.name.split("-b")[0] for v in results.variants))
    batches = list(dict.fromkeys(int(v.variant.name.split("-b")[1]) for v in results.variants))
    head = ["norm"] + [f"{n} img/worker" for n in batches]
    k = spec.median_of_last or 1
    what = f"median of the last {k} epochs" if k > 1 else "the final epoch's"
    lines = [
        f"## gn-batch-size: top-1 error (%), ours ({what}, mean ± std over seeds) and "
        f"({spec.paper_label}: median of the last 5 epochs)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for kind in norms:
        cells = [NORM_LABELS[kind]]
        for n in batches:
            vr = results.by_name(f"{kind}-b{n}")
            cells.append(_cell(vr.headline, vr.variant.paper) if vr else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if "bn" in norms and "gn" in norms:
        cells = ["BN − GN"]
        for n in batches:
            bn, gn = results.by_name(f"bn-b{n}"), results.by_name(f"gn-b{n}")
            ours = bn.headline.mean - gn.headline.mean if bn.headline.n and gn.headline.n else None
            pb, pg = PAPER_TABLE2["bn"].get(n), PAPER_TABLE2["gn"].get(n)
            text = "—" if ours is None else f"{ours:+.2f}"
            if pb is not None and pg is not None:
                text += f" ({pb - pg:+.1f})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_batch_size(results, path: Path) -> None:
    """Fig. 1: error vs images per worker, ours (left, mean ± std) and the paper's (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    norms = list(dict.fromkeys(v.variant.name.split("-b")[0] for v in results.variants))
    batches = sorted({int(v.variant.name.split("-b")[1]) for v in results.variants}, reverse=True)
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ours_ax, paper_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for kind in norms:
        xs, ys, es = [], [], []
        for n in batches:
            vr = results.by_name(f"{kind}-b{n}")
            if vr is not None and vr.headline.n:
                xs.append(n), ys.append(vr.headline.mean), es.append(vr.headline.std)
        if xs:
            ours_ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=NORM_LABELS[kind])
        paper = PAPER_TABLE2.get(kind, {})
        px = [n for n in batches if n in paper]
        if px:
            style = "o-" if len(px) > 1 else "o"
            paper_ax.plot(px, [paper[n] for n in px], style, label=NORM_LABELS[kind])
    for ax, title in (
        (ours_ax, f"ours: {results.spec.title.split('— ')[-1]}"),
        (paper_ax, f"{results.spec.paper_label}: ResNet-50"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(n) for n in batches])
        ax.invert_xaxis()
        ax.set_xlabel("images per worker")
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@register_experiment(
    "gn-batch-size",
    "GN paper Table 2 / Fig. 1: BN, GN, BRN, LN, IN at 32..2 images per worker",
    add_arguments=add_batch_size_arguments,
    plan=lambda args: plan_spec(batch_size_spec(args, read_data=False)),
)
def gn_batch_size(args: argparse.Namespace) -> int:
    """Run gn-batch-size; writes results.*, table2.md and fig1.png to the out dir."""
    from lightnets.experiments.base import run_experiment

    results = run_experiment(batch_size_spec(args))
    if not is_main_process():
        return 0
    table = batch_size_table(results)
    write_text(results.spec.out / "table2.md", table + "\n")
    plot_batch_size(results, results.spec.out / "fig1.png")
    print()
    print(table)
    print(f"pivot: {results.spec.out}/table2.md, plot: {results.spec.out}/fig1.png")
    return 0


# ----------------------------------------------------------------------------- gn-groups
def groups_spec(args: argparse.Namespace):
    """The runner's ExperimentSpec for parsed `gn-groups` arguments (validates them)."""
    from lightnets.experiments.base import Variant

    setting = _Setting(args, "resnet")
    groups = _list_or_default(args.groups, "--groups", DEFAULT_GROUPS)
    cpg = _list_or_default(args.channels_per_group, "--channels-per-group", DEFAULT_CPG)
    if not groups and not cpg:
        raise UserError("--groups none and --channels-per-group none: expected some variants")
    variants = []
    batch = [setting.batch(PAPER_BATCH)]  # Table 3: 32 images per GPU
    for g in groups:
        variants.append(
            Variant(
                name=f"G{g}",
                label=f"G = {g}" + (" (LN)" if g == 1 else ""),
                overrides=[
                    'model.args.norm="gn"',
                    f"model.args.norm_kwargs={{num_groups = {g}}}",
                    *batch,
                ],
                paper=PAPER_TABLE3_GROUPS.get(g),
                baseline="G32" if 32 in groups else None,
                paper_setting={"model_args": {"norm": "gn", "norm_kwargs": {"num_groups": g}}},
            )
        )
    for c in cpg:
        variants.append(
            Variant(
                name=f"cpg{c}",
                label=f"{c} channels/group" + (" (IN)" if c == 1 else ""),
                overrides=[
                    'model.args.norm="gn"',
                    f"model.args.norm_kwargs={{channels_per_group = {c}}}",
                    *batch,
                ],
                paper=PAPER_TABLE3_CPG.get(c),
                baseline="G32" if 32 in groups else None,
                paper_setting={
                    "model_args": {"norm": "gn", "norm_kwargs": {"channels_per_group": c}}
                },
            )
        )
    return _gn_spec(
        args,
        setting,
        "gn-groups",
        "gn-groups (Table 3): GN group division",
        variants,
        setting.all_overrides(),
        f"32 images per worker, {setting.rule(args.lr or 0.1)}. Δ columns: the variant "
        "minus G = 32 (the paper's default).",
        groups=groups,
        channels_per_group=cpg,
        lr=args.lr,
    )


@register_experiment(
    "gn-groups",
    "GN paper Table 3: number of groups G and channels per group",
    add_arguments=add_groups_arguments,
    plan=lambda args: plan_spec(groups_spec(args)),
)
def gn_groups(args: argparse.Namespace) -> int:
    """Run gn-groups; writes results.* to the out dir."""
    from lightnets.experiments.base import run_experiment

    run_experiment(groups_spec(args))
    return 0


# ----------------------------------------------------------------------------- gn-feature-dist
PERCENTILES = (1, 20, 80, 99)
PERCENTILE_FILE = "feature_percentiles.json"


class FeaturePercentiles(Callback):
    """Callback: percentiles of the last Conv2d's output on a fixed probe batch, every k steps.

    The probe runs in eval mode under no_grad (so BN's running statistics and the training RNG
    are untouched) and the records live in the checkpoint (a resumed run continues them
    exactly); each epoch end also writes them to `feature_percentiles.json` in the run dir.
    """

    def __init__(self, probe, every: int) -> None:
        self.probe = probe
        self.every = max(1, int(every))
        self.records: list[dict[str, Any]] = []

    def _last_conv(self, model):
        from torch import nn

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise UserError("gn-feature-dist needs a model with a Conv2d: found none")
        return convs[-1]

    def record(self, trainer) -> None:
        import torch

        model = trainer.model
        captured: list[torch.Tensor] = []
        # a copy: the next layer may be an in-place ReLU (VGG without norm), which would
        # otherwise clip the captured responses to >= 0
        handle = self._last_conv(model).register_forward_hook(
            lambda module, inputs, output: captured.append(output.detach().float().clone())
        )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                x = self.probe.to(next(model.parameters()).device)
                model(trainer.eval_augment(x) if trainer.eval_augment is not None else x)
        finally:
            handle.remove()
            model.train(was_training)
        values = captured[0].flatten()
        q = torch.tensor([p / 100 for p in PERCENTILES], dtype=values.dtype)
        pct = torch.quantile(values, q).tolist()
        self.records.append({"step": trainer.step, **dict(zip(map(str, PERCENTILES), pct))})

    def on_train_start(self, trainer) -> None:
        if not self.records:
            self.record(trainer)

    def on_step_end(self, trainer, info: dict[str, Any]) -> None:
        if trainer.step % self.every == 0:
            self.record(trainer)

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        text = json.dumps({"percentiles": list(PERCENTILES), "records": self.records})
        write_text(Path(trainer.run_dir) / PERCENTILE_FILE, text + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))


def _probe_batch(setting: _Setting, overrides: list[str], n: int):
    """The first `n` training images (un-augmented), the same for every variant and seed."""
    import torch

    from lightnets.engine.config import load_config
    from lightnets.engine.trainer import build_datasets

    train, _ = build_datasets(load_config(setting.recipe, overrides))
    n = min(n, len(train))
    return torch.stack([train[i][0] for i in range(n)])


class _ProbeCallbacks:
    """spec.callbacks of gn-feature-dist: one FeaturePercentiles per run, all sharing one
    probe batch, which is read from the data on the first call (so building the spec, and
    planning it, reads no data)."""

    def __init__(self, setting: _Setting, overrides: list[str], images: int, records: int):
        self.setting, self.overrides = setting, overrides
        self.images, self.records = images, records
        self.probe = None
        self.every: int | None = None

    def __call__(self, variant: str, seed: int) -> list[Callback]:
        from lightnets.engine.config import load_config

        if self.probe is None:
            self.probe = _probe_batch(self.setting, self.overrides, self.images)
            config = load_config(self.setting.recipe, self.overrides)
            size = self.setting.train_size(self.overrides, read=True)
            steps = self.setting.steps(size, config.data.per_process_batch(1))
            self.every = max(1, steps // self.records)
        return [FeaturePercentiles(self.probe, self.every)]


def feature_dist_spec(args: argparse.Namespace):
    """The runner's ExperimentSpec for parsed `gn-feature-dist` arguments (validates them)."""
    from lightnets.experiments.base import Variant

    setting = _Setting(args, "vgg")
    norms = _norm_list(args.norms, ("none", "bn", "gn"), ("none", "bn", "gn", "ln", "in", "brn"))
    if args.probe_images < 1 or args.records < 1:
        raise UserError("--probe-images and --records: expected at least 1")
    # VGG has no residual blocks: its args replace the recipe's ResNet ones.
    if setting.small:
        # VGG-16 at a quarter width (16..128 channels); G = 8 keeps the paper's 2..16 channels
        # per group (G = 32 over 64..512 channels).
        model = ['model.name="vgg16"', "model.args={width = 0.25, cifar_stem = true}"]
        gn_groups_n = 8
        lr = VGG_LR
    else:
        stem = "false" if setting.data == "folder" else "true"
        model = ['model.name="vgg16"', f"model.args={{cifar_stem = {stem}}}"]
        gn_groups_n = 32
        lr = VGG_LR_PAPER_SCALE
    lr_override = [] if args.lr is not None else [f"optim.lr={lr}"]
    variants = []
    for kind in norms:
        kw = f"{{num_groups = {gn_groups_n}}}" if kind == "gn" else "{}"
        variants.append(
            Variant(
                name=kind,
                label=NORM_LABELS[kind],
                overrides=[
                    f'model.args.norm="{kind}"',
                    f"model.args.norm_kwargs={kw}",
                    setting.batch(PAPER_BATCH),
                ],
                paper=PAPER_FIG6.get(kind),
                baseline="bn" if "bn" in norms and kind != "bn" else None,
                paper_setting={
                    "model_args": _paper_norm(kind),
                    "notes": (BRN_NOTE,) if kind == "brn" else (),
                },
            )
        )
    all_base = setting.all_overrides([*model, *lr_override])
    paper = PAPER_SETTING.updated(
        model="vgg16",
        model_args={"zero_init_last": None},  # VGG has no residual blocks
        lr=None,  # not given for VGG-16
        notes=(
            f"not stated in the paper: VGG-16's learning rate; ours is {lr:g} per "
            f"{setting.reference_batch} images"
            + (
                " (torchvision's ImageNet recipe for VGG-16)"
                if setting.reference_batch == PAPER_REFERENCE_BATCH
                else ""
            ),
        ),
    )
    spec = _gn_spec(
        args,
        setting,
        "gn-feature-dist",
        "gn-feature-dist (Fig. 6): VGG-16 without norm / with BN / with GN",
        variants,
        all_base,
        f"Percentiles {', '.join(map(str, PERCENTILES))} of the last conv's output (before "
        f"norm and ReLU) on the first {args.probe_images} training images (fewer if the "
        f"training set is smaller), {args.records} records per run; "
        f"{setting.rule(args.lr or lr)}.",
        paper_setting=paper,
        norms=norms,
        lr=args.lr,
        probe_images=args.probe_images,
        records=args.records,
    )
    spec.callbacks = _ProbeCallbacks(
        setting, [*all_base, setting.batch(PAPER_BATCH)], args.probe_images, args.records
    )
    return spec


def plot_feature_dist(results, path: Path) -> None:
    """Fig. 6: one panel per variant, the percentile curves of seed 0 over training steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = [vr for vr in results.variants if vr.runs]
    fig = Figure(figsize=(4.0 * max(1, len(variants)), 3.8))
    FigureCanvasAgg(fig)
    for i, vr in enumerate(variants, start=1):
        ax = fig.add_subplot(1, len(variants), i)
        path_json = Path(vr.runs[0].run_dir) / PERCENTILE_FILE
        if path_json.is_file():
            records = json.loads(path_json.read_text())["records"]
            steps = [r["step"] for r in records]
            for p in PERCENTILES:
                ax.plot(steps, [r[str(p)] for r in records], label=f"{p}th")
        error = f"{vr.headline.mean:.2f}%" if vr.headline.n else "n/a"
        paper = vr.variant.paper
        ax.set_title(
            f"{vr.variant.label}: error {error}"
            + ("" if paper is None else f" (paper {paper:.1f}%)"),
            fontsize=9,
        )
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if i == 1:
            ax.set_ylabel("last conv response (before norm, ReLU)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@register_experiment(
    "gn-feature-dist",
    "GN paper Fig. 6: VGG-16 feature percentiles over training, no norm / BN / GN",
    add_arguments=add_feature_dist_arguments,
    plan=lambda args: plan_spec(feature_dist_spec(args)),
)
def gn_feature_dist(args: argparse.Namespace) -> int:
    """Run gn-feature-dist; writes results.* and fig6.png to the out dir."""
    from lightnets.experiments.base import run_experiment

    results = run_experiment(feature_dist_spec(args))
    if not is_main_process():
        return 0
    plot_feature_dist(results, results.spec.out / "fig6.png")
    print(f"plot: {results.spec.out}/fig6.png")
    return 0

"""FBN experiments of the Finet paper (Luo et al.), Sec. 5.3: `lightnets repro fbn-cifar`.

Three studies, each a list of variants run for N seeds by the shared runner:

- Table 5 (default): Finet (large with Squeeze-Excite, CIFAR stem) with BN (G=1) vs FBN with
  G groups (`--groups`, default 1,2,4,8; the paper also has 6), with and without the affine
  transform of the normalization (`--affine both|yes|no`).
- Table 6 (`--channels-per-group 20,50,100`): FBN with a fixed number of input channels per
  group (G = floor(C_in / c) per layer), affine on.
- Table 7 (`--model resnet18|resnet50`): ResNet with FBN in every conv after the stem,
  G in 1,2,4 (G=1 is plain BN), batch 64 (recipe `resnet_fbn_cifar`).

Data: CIFAR-10/100 from `--root` with the paper's recipe (200 epochs, lr 0.1 /10 at 100 and
150, batch 128, zero-padding to 36x36 + random 32x32 crop + flip), or the bundled 5000-image
MNIST subset (`--data mnist5k`) at a small scale a CPU can run: finet_small_se (in_chans=1,
CIFAR stem), 10 epochs of the 4000 training images with the two lr decays moved
proportionally (after epochs 5 and 8), pad-2 random crop + normalize (no flip: digits are not
mirror-symmetric). The paper has no MNIST numbers; its CIFAR-10 column is shown for reference
only and labelled "paper (CIFAR-10)".

The model: §5.3 "Large Finet is evaluated in this section" and gives, for these runs, "For
Squeeze-Excite module, we set the number of hidden unit to 200". We read that the CIFAR
models of Tables 5 and 6 have the SE module (a hidden size is only set for a module that is
there), so the default is finet_large_se; `--model finet_large` runs them without it. The
plan (`--dry-run`) lists this reading among the deviations.

`--epochs E` scales the lr milestones to E * 100/200 and E * 150/200 (rounded), keeping the
paper's schedule shape. A variant whose model cannot be built (e.g. more groups than a layer
has input channels) is reported as "n/a (reason)"; G that does not divide a layer's input
channels gives groups whose sizes differ by one (`lightnets.nn.fbn`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lightnets.errors import UserError
from lightnets.experiments import register_experiment
from lightnets.experiments.options import add_run_options, check_counts, int_list, toml_string
from lightnets.experiments.plan import PaperSetting
from lightnets.experiments.runner import run_experiment
from lightnets.experiments.spec import ExperimentSpec, Variant

# The paper's numbers, copied verbatim (top-1 accuracy in %, test set).
#: Table 5: Finet (large) on CIFAR-10/100, [dataset][affine][G].
PAPER_TABLE5: dict[str, dict[bool, dict[int, float]]] = {
    "cifar10": {
        True: {1: 92.584, 2: 93.082, 4: 93.532, 6: 93.286, 8: 93.674},
        False: {1: 91.958, 2: 93.162, 4: 92.478, 6: 92.564, 8: 93.430},
    },
    "cifar100": {
        True: {1: 75.624, 2: 76.752, 4: 76.856, 6: 76.716, 8: 77.202},
        False: {1: 74.216, 2: 74.382, 4: 74.486, 6: 74.772, 8: 74.734},
    },
}
#: Table 6: Finet (large) with C/G input channels per group, [dataset][C/G].
PAPER_TABLE6: dict[str, dict[int, float]] = {
    "cifar10": {20: 93.470, 50: 93.606, 100: 93.122},
    "cifar100": {20: 76.926, 50: 76.850, 100: 75.674},
}
#: Table 7: ResNet with FBN, [dataset][model][G] (ResNet50 G=4 was not run: "-").
PAPER_TABLE7: dict[str, dict[str, dict[int, float]]] = {
    "cifar10": {
        "resnet18": {1: 94.512, 2: 95.012, 4: 94.962},
        "resnet50": {1: 94.644, 2: 95.040},
    },
    "cifar100": {
        "resnet18": {1: 76.866, 2: 77.754, 4: 77.726},
        "resnet50": {1: 77.796, 2: 78.122},
    },
}

DATASETS = ("cifar10", "cifar100", "mnist5k")
FINET_MODELS = ("finet_small", "finet_large", "finet_small_se", "finet_large_se")
RESNET_MODELS = ("resnet18", "resnet50")
#: The paper's CIFAR schedule (Sec. 5.3): 200 epochs, lr x0.1 at epochs 100 and 150.
PAPER_EPOCHS = 200
PAPER_MILESTONES = (100, 150)
#: The small-scale MNIST setting: epochs of the bundled 4000-image training split.
MNIST_EPOCHS = 10
DEFAULT_GROUPS = (1, 2, 4, 8)
DEFAULT_RESNET_GROUPS = (1, 2, 4)
#: §5.3's augmentation: zero-padding to 36x36 (2 px a side), random 32x32 crop, flip.
PAPER_PADDING = 2
PAPER_AUGMENT = [
    {"pad_crop": {"padding": PAPER_PADDING, "fill": 0.0}},
    {"hflip": {"p": 0.5}},
    "normalize",
]
#: What the runs report (the paper: "the accuracies (%)" on the 10,000 test images).
PLAN_METRIC = "top-1 accuracy (%) on the test split after the last epoch"
#: The paper's setting of the CIFAR runs (§5.3); variants add their model arguments.
PAPER_SETTING = PaperSetting(
    source="Finet §5.3",
    model="finet_large_se",
    model_args={"cifar_stem": True},
    processes=1,  # "All models are trained on one TITAN Xp GPU"
    batch_per_process=128,
    global_batch=128,
    lr=0.1,
    weight_decay=5e-4,
    epochs=PAPER_EPOCHS,
    schedule={"name": "multistep", "unit": "epoch", "milestones": [100, 150], "gamma": 0.1},
    augment=PAPER_AUGMENT,
    config={"optim.name": "sgd", "optim.momentum": 0.9, "optim.nesterov": False},
    notes=(
        "reading: §5.3 sets the Squeeze-Excite hidden size (200) for these runs, so its Finet "
        "has SE (finet_large_se); the paper does not say so in words",
        "not stated in the paper: dropout on CIFAR; the model keeps its 0.2 before the two "
        "fully connected layers (the paper's ImageNet setting, §5.1)",
        "not stated in the paper: whether its accuracy is the last epoch's or the best; ours "
        "is the last epoch's (the best epoch's is reported beside it)",
    ),
)
#: Table 7: ResNet on CIFAR, batch 64 ("training ResNet with FBN consumes a lot of GPU
#: memories"), the rest as Finet's; none of the Finet notes applies.
PAPER_SETTING_RESNET = dataclasses.replace(
    PAPER_SETTING,
    model_args={},
    batch_per_process=64,
    global_batch=64,
    notes=(
        "reading: FBN in every conv after the stem (the paper says 'ResNet with FBN'; G=1 is "
        "plain BN)",
        "reading: the CIFAR stem (3x3 conv, stride 1, no max-pool); the paper does not say "
        "how its ResNets were adapted to 32x32 images",
        "not stated in the paper: whether its accuracy is the last epoch's or the best; ours "
        "is the last epoch's (the best epoch's is reported beside it)",
    ),
)


def scaled_milestones(epochs: int) -> list[int]:
    """The paper's lr milestones (100, 150 of 200 epochs) moved proportionally to `epochs`."""
    return sorted({max(1, int(epochs * m / PAPER_EPOCHS + 0.5)) for m in PAPER_MILESTONES})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro fbn-cifar`."""
    p.add_argument(
        "--data",
        choices=DATASETS,
        default="cifar10",
        help="cifar10 / cifar100 (files under --root, the paper's recipe) or mnist5k (bundled, "
        "small CPU-scale setting); default cifar10",
    )
    p.add_argument(
        "--root", help="CIFAR folder (holding cifar-10-batches-bin/-py or cifar-100-binary/-python)"
    )
    p.add_argument(
        "--groups",
        help="FBN groups G to compare, comma-separated (default 1,2,4,8; with a ResNet 1,2,4); "
        "G=1 is BN",
    )
    p.add_argument(
        "--affine",
        choices=("both", "yes", "no"),
        help="Table 5: with and/or without the affine transform (default both)",
    )
    p.add_argument(
        "--channels-per-group",
        metavar="C,...",
        help="Table 6 study: input channels per FBN group, e.g. 20,50,100 (affine on)",
    )
    p.add_argument(
        "--model",
        choices=FINET_MODELS + RESNET_MODELS,
        help="default finet_large_se (mnist5k: finet_small_se; §5.3 sets the SE hidden size "
        "for these runs); resnet18/resnet50 switch to the Table 7 study (recipe "
        "resnet_fbn_cifar)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument(
        "--epochs",
        type=int,
        help="epochs per run (default 200; mnist5k 10); the lr milestones scale with it",
    )
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke runs)")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    add_run_options(p, "data.num_workers=4", "runs/repro/fbn-cifar-<data>[-cpg|-<resnet>]")


def _affine_values(text: str | None) -> list[bool]:
    return {"both": [True, False], "yes": [True], "no": [False], None: [True, False]}[text]


def build_variants(
    study: str,
    paper_data: str,
    *,
    groups: list[int] | None = None,
    affine: str | None = None,
    channels_per_group: list[int] | None = None,
    model: str | None = None,
) -> list[Variant]:
    """The variants of one study ("table5", "table6" or "table7") with the paper's numbers.

    `paper_data` names the paper column used (cifar10 or cifar100).
    """
    variants = []
    if study == "table5":
        table = PAPER_TABLE5[paper_data]
        groups = groups or list(DEFAULT_GROUPS)
        for aff in _affine_values(affine):
            suffix, words = ("affine", "affine") if aff else ("noaffine", "no affine")
            for g in groups:
                kind = "BN (G=1)" if g == 1 else f"FBN G={g}"
                variants.append(
                    Variant(
                        name=f"G{g}-{suffix}",
                        label=f"{kind}, {words}",
                        overrides=[
                            f"model.args.fbn_groups={g}",
                            f"model.args.affine={'true' if aff else 'false'}",
                        ],
                        paper=table[aff].get(g),
                        baseline=f"G1-{suffix}" if 1 in groups else None,
                        paper_setting={"model_args": {"fbn_groups": g, "affine": aff}},
                    )
                )
    elif study == "table6":
        table6 = PAPER_TABLE6[paper_data]
        for c in channels_per_group or [20, 50, 100]:
            variants.append(
                Variant(
                    name=f"cpg{c}",
                    label=f"FBN C/G={c}, affine",
                    overrides=[
                        "model.args.fbn_groups=1",
                        f"model.args.fbn_channels_per_group={c}",
                        "model.args.affine=true",
                    ],
                    paper=table6.get(c),
                    paper_setting={"model_args": {"fbn_channels_per_group": c, "affine": True}},
                )
            )
    elif study == "table7":
        if model not in RESNET_MODELS:
            raise UserError(f"Table 7 needs --model resnet18 or resnet50, got {model!r}")
        table7 = PAPER_TABLE7[paper_data][model]
        groups = groups or list(DEFAULT_RESNET_GROUPS)
        pretty = {"resnet18": "ResNet18", "resnet50": "ResNet50"}[model]
        for g in groups:
            norm, kind = ("bn", "BN (G=1)") if g == 1 else ("fbn", f"FBN G={g}")
            overrides = [f"model.args.norm={norm}", f"model.args.fbn_groups={g}"]
            variants.append(
                Variant(
                    name=f"{model}-G{g}",
                    label=f"{pretty} {kind}",
                    overrides=overrides,
                    paper=table7.get(g),
                    baseline=f"{model}-G1" if 1 in groups else None,
                    paper_setting={
                        "model": model,
                        "model_args": {"norm": norm, "fbn_groups": g},
                    },
                )
            )
    else:
        raise ValueError(f"unknown study {study!r}")
    return variants


def build_spec(args: argparse.Namespace) -> ExperimentSpec:
    """The runner's ExperimentSpec for parsed `fbn-cifar` arguments (validates them)."""
    groups = int_list(args.groups, "--groups")
    cpg = int_list(args.channels_per_group, "--channels-per-group")
    model = args.model
    if model in RESNET_MODELS:
        study = "table7"
        if cpg is not None:
            raise UserError(
                "--channels-per-group is the Table 6 study of Finet: expected it without "
                f"--model {model} (ResNet FBN takes a fixed G)"
            )
        if args.affine not in (None, "yes"):
            raise UserError(
                f"--affine {args.affine}: the ResNet study (Table 7) keeps the affine transform: "
                "expected no --affine (or --affine yes)"
            )
    elif cpg is not None:
        study = "table6"
        if groups is not None:
            raise UserError(
                "--groups and --channels-per-group choose different studies (Tables 5 and 6): "
                "expected one of them"
            )
        if args.affine not in (None, "yes"):
            raise UserError(
                f"--affine {args.affine}: the Table 6 study keeps the affine transform: expected "
                "no --affine (or --affine yes)"
            )
    else:
        study = "table5"
    check_counts(args, "seeds", "epochs", "max_steps", "batch_size")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr {args.lr}: expected a positive learning rate")

    data = args.data
    small = data == "mnist5k"
    if model is None:
        model = "finet_small_se" if small else "finet_large_se"
    recipe = "resnet_fbn_cifar" if study == "table7" else "finet_cifar"
    overrides = [f"model.name={model}", f"data.name={data}"]
    root = None
    if small:
        if args.root is not None:
            raise UserError("--data mnist5k is bundled and reads no files: expected no --root")
        overrides += [
            "data.root=none",
            "model.args.in_chans=1",
            # the paper's 2-pixel padding; no flip: digits are not mirror-symmetric
            f'data.augment=[{{pad_crop = {{padding = {PAPER_PADDING}}}}}, "normalize"]',
        ]
    else:
        if not args.root:
            raise UserError(
                f"--data {data} needs --root PATH (the folder holding the {data} files, e.g. "
                "cifar-10-batches-bin): expected a path; for a CPU-scale run use --data mnist5k"
            )
        root = str(Path(args.root).expanduser().resolve())
        overrides.append(f"data.root={toml_string(root)}")
    epochs = args.epochs or (MNIST_EPOCHS if small else PAPER_EPOCHS)
    if epochs != PAPER_EPOCHS:
        milestones = ", ".join(str(m) for m in scaled_milestones(epochs))
        overrides += [f"train.epochs={epochs}", f"schedule.milestones=[{milestones}]"]
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.lr is not None:
        overrides.append(f"optim.lr={args.lr}")
    overrides += list(args.overrides)
    if args.no_progress:
        overrides.append("train.progress=false")

    paper_data = "cifar10" if small else data
    variants = build_variants(
        study, paper_data, groups=groups, affine=args.affine, channels_per_group=cpg, model=model
    )
    suffix = {"table5": "", "table6": "-cpg", "table7": f"-{model}"}[study]
    out = args.out or Path("runs") / "repro" / f"fbn-cifar-{data}{suffix}"
    settings: dict[str, Any] = {
        "study": study,
        "data": data,
        "root": root,
        "model": model,
        "groups": groups,
        "affine": args.affine,
        "channels_per_group": cpg,
        "epochs": epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "set": list(args.overrides),
    }
    table = {"table5": "Table 5", "table6": "Table 6", "table7": "Table 7"}[study]
    # the paper's model of each table: Finet-large for 5 and 6, the ResNet asked for in 7
    paper_model = "Finet-large (SE)"
    if study == "table7":
        paper_model = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}[model]
    what = {
        "table5": "BN (G=1) vs FBN with G groups, with / without affine",
        "table6": "FBN with C/G input channels per group",
        "table7": "ResNet with BN (G=1) vs FBN",
    }[study]
    shown_data = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist5k": "MNIST-5k"}[data]
    notes = [
        f"Setting: {model} on {shown_data}, recipe `{recipe}` with overrides "
        f"`{' '.join(o for o in overrides if not o.startswith('train.progress'))}`; "
        f"{epochs} epochs"
        + (f" (max {args.max_steps} steps)" if args.max_steps else "")
        + f", {args.seeds} seed(s).",
    ]
    if small:
        notes.append(
            "The paper has no MNIST results: the column 'paper (CIFAR-10)' is the paper's "
            f"CIFAR-10 number ({table}, {paper_model}, 200 epochs) for reference only; the "
            "absolute numbers are not comparable, only the direction of the BN/FBN differences."
        )
    else:
        notes.append(
            f"Paper: Luo et al., Finet, {table} ({shown_data}); the paper reports one number "
            "per setting with no seeds or spread."
        )
    paper = PAPER_SETTING_RESNET if study == "table7" else PAPER_SETTING
    return ExperimentSpec(
        experiment="fbn-cifar",
        title=f"fbn-cifar ({table}): {what} — {model} on {shown_data}",
        out=Path(out),
        recipe=recipe,
        variants=variants,
        seeds=list(range(args.seeds)),
        settings=settings,
        base_overrides=overrides,
        metric="val_acc1",
        metric_label="top-1 accuracy (%) on the test split",
        paper_label="paper (CIFAR-10)" if small else "paper",
        notes=notes,
        overwrite=args.overwrite,
        paper_setting=paper.updated(dataset=paper_data),
        plan_metric=PLAN_METRIC,
        processes=args.processes,
    )


@register_experiment(
    "fbn-cifar",
    "Finet Sec. 5.3: BN vs FBN on CIFAR (Tables 5-7), or small-scale on the bundled MNIST",
    add_arguments=add_arguments,
    plan=lambda args: build_spec(args).plan(),
)
def fbn_cifar(args: argparse.Namespace) -> int:
    """Run the fbn-cifar experiment; returns 0 (results are written to the out dir)."""
    run_experiment(build_spec(args))
    return 0

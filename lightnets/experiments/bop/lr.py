"""bop-lr ([Re] Sec. 3.1.2, Fig. 1): the five initialization / optimizer / learning-rate
configurations of latent-weight training, with accuracy curves (fig1.png)."""

from __future__ import annotations

import argparse

from lightnets.experiments import register_experiment
from lightnets.experiments.bop.curves import plot_curves_by_variant
from lightnets.experiments.bop.paper import (
    LR_BASELINES,
    LR_CONFIGS,
    LR_PAPER,
    MNIST5K_LR_EPOCHS,
    MNIST_DATA,
    PAPER_LR_EPOCHS,
    PAPER_MNIST,
)
from lightnets.experiments.bop.setting import BopSetting, add_common_arguments
from lightnets.experiments.outdir import is_main_process
from lightnets.experiments.runner import run_experiment
from lightnets.experiments.spec import ExperimentSpec, Variant

__all__ = ["add_lr_arguments", "bop_lr", "lr_spec"]


def add_lr_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro bop-lr`."""
    add_common_arguments(
        p,
        "bop-lr",
        2,
        MNIST_DATA,
        f"epochs per run (default {MNIST5K_LR_EPOCHS}; the paper's {PAPER_LR_EPOCHS} on "
        "--data mnist)",
    )


def lr_spec(args: argparse.Namespace) -> ExperimentSpec:
    """The runner's ExperimentSpec for parsed `bop-lr` arguments (validates them)."""
    default = MNIST5K_LR_EPOCHS if args.data == "mnist5k" else PAPER_LR_EPOCHS
    setting = BopSetting(args, "bop-lr", "bnn_mnist", default)
    base = setting.all(["optim.momentum=0.0"])  # Keras' SGD: no momentum
    variants = [
        Variant(
            name,
            label,
            overrides,
            baseline=LR_BASELINES.get(name),
            paper_setting=LR_PAPER[name],
        )
        for name, label, overrides in LR_CONFIGS
    ]
    notes = [
        f"Setting: recipe `bnn_mnist` (latent weights clipped to [-1, 1] after every step, "
        f"batch 64, as Sec. 3.1.1) on {setting.shown} with overrides "
        f"`{setting.shown_overrides(['optim.momentum=0.0'])}`; {setting.length()}, "
        f"{len(setting.seeds)} seed(s). SGD without momentum (Keras' default); Glorot is "
        "Glorot uniform; uniform is U(-0.05, 0.05) (Keras' RandomUniform).",
        "The paper (Fig. 1, 100 epochs on MNIST) shows curves, no numbers. It expects 2 ≈ 3 "
        "(Theorem 1: lr x 100 = initialization / 100), 1 ≈ 4 (the initialization's magnitude "
        "does not change the gradient), 1 worse than 2 and 3, and 5 best. Δ columns: 3 − 2 "
        "and 4 − 1 (both expected near 0). Curves: fig1.png.",
        "The clip at ±1 is part of the paper's training process but is not scaled with the "
        "initialization, so 2 and 3 are equal only while 2's weights stay inside ±1.",
    ]
    if setting.data == "mnist5k":
        notes.append(
            f"Scaled down: {setting.epochs} epochs of 62 steps on the bundled subset, against "
            "the paper's 100 epochs of 938 steps; the curves show the start of training. "
            "BatchNorm momentum 0.15 (Keras' 0.01 scaled to the shorter epochs)."
        )
    return ExperimentSpec(
        experiment="bop-lr",
        title=f"bop-lr ([Re] Fig. 1): initialization, optimizer and lr of latent weights — "
        f"{setting.shown}",
        out=setting.out,
        recipe="bnn_mnist",
        variants=variants,
        seeds=setting.seeds,
        settings=setting.settings(),
        base_overrides=base,
        metric="val_acc1",
        metric_label="top-1 accuracy (%) on the test split",
        paper_label="paper",
        notes=notes,
        overwrite=setting.overwrite,
        paper_setting=PAPER_MNIST.updated(
            source="[Re] §3.1.2",
            epochs=PAPER_LR_EPOCHS,
            metric=None,
            notes=("the paper shows accuracy curves (Fig. 1), no numbers",),
        ),
        plan_metric="top-1 accuracy (%) on the test split per epoch (curves) and after the last",
        processes=setting.processes,
    )


@register_experiment(
    "bop-lr",
    "[Re] Bop Fig. 1: latent-weight BNN with 5 initialization / optimizer / lr configurations",
    add_arguments=add_lr_arguments,
    plan=lambda args: lr_spec(args).plan(),
)
def bop_lr(args: argparse.Namespace) -> int:
    """Run bop-lr; writes results.* and fig1.png to the out dir."""
    results = run_experiment(lr_spec(args))
    if not is_main_process():
        return 0
    plot_curves_by_variant(
        results,
        results.spec.out / "fig1.png",
        [("val_acc1", "test accuracy (%)"), ("train_acc1", "training accuracy (%)")],
        "bop-lr: mean over seeds (cf. [Re] Fig. 1)",
    )
    print(f"plot: {results.spec.out}/fig1.png")
    return 0

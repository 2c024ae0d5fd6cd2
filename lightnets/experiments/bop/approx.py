"""bop-approx ([Re] Sec. 3.1.1, Table 1): train `bnn_mnist` with latent weights and Adam, then
evaluate it with binary weights, with its real latent weights (the kernel quantizer switched
off, activations still the sign), and with real weights after retraining only the BatchNorm
layers (binary layers frozen, real latent weights in use). Writes results.* and table1.md
(mean and variance over seeds, as the paper's Table 1, beside the paper's).

Two phases per seed (`<out>/seed<k>/train`, `<out>/seed<k>/retrain`), each one `run_one` of
the shared runner; the second trains the model the first left, changed in place, so the
experiment runs in one process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from lightnets.engine.checkpoint import load_checkpoint_model
from lightnets.engine.config import Config, load_config
from lightnets.engine.distributed import env_world_size
from lightnets.engine.logging import read_rows
from lightnets.errors import UserError
from lightnets.experiments import register_experiment
from lightnets.experiments.bop.evaluation import eval_accuracy
from lightnets.experiments.bop.paper import (
    MNIST_DATA,
    PAPER_APPROX_EPOCHS,
    PAPER_APPROX_RUNS,
    PAPER_MNIST,
    PAPER_TABLE1,
)
from lightnets.experiments.bop.setting import BopSetting, add_common_arguments
from lightnets.experiments.outdir import prepare_out_dir, write_text
from lightnets.experiments.plan import PLAN_FILE, plan_line, plan_text, print_plan
from lightnets.experiments.report import format_table, write_results
from lightnets.experiments.results import (
    ExperimentResults,
    RunResult,
    best_of,
    variant_result,
)
from lightnets.experiments.runner import DatasetCache, check_processes, run_one
from lightnets.experiments.spec import ExperimentSpec, Variant
from lightnets.nn.binary import is_binary_layer

__all__ = [
    "add_approx_arguments",
    "approx_plan",
    "approx_spec",
    "approx_table1",
    "bop_approx",
    "freeze_binary_layers_",
    "run_approx",
    "use_real_weights_",
]


def add_approx_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro bop-approx`."""
    add_common_arguments(
        p,
        "bop-approx",
        2,
        MNIST_DATA,
        f"epochs of latent-weight training (default {PAPER_APPROX_EPOCHS}, the paper's)",
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        help=f"epochs of BatchNorm retraining (default {PAPER_APPROX_EPOCHS}, the paper's)",
    )


def use_real_weights_(model: nn.Module) -> int:
    """Switch every binary layer to its real latent weight (kernel quantizer off; the input
    quantizer, i.e. the sign activation, stays). Returns how many layers changed."""
    layers = [m for m in model.modules() if is_binary_layer(m)]
    for m in layers:
        if m.mode != "latent":
            raise UserError(
                f"{type(m).__name__} is in mode={m.mode!r}: the real-weight evaluation needs "
                "latent weights (mode='latent')"
            )
        m.kernel_quantizer = None
    return len(layers)


def freeze_binary_layers_(model: nn.Module) -> None:
    """No gradient for the weights (and biases) of binary layers: only the rest trains."""
    for m in model.modules():
        if is_binary_layer(m):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def _phase2_model(phase1_dir: Path) -> nn.Module:
    """The phase-1 model (its last weights) with real weights in use and binary layers frozen."""
    model, _ = load_checkpoint_model(phase1_dir / "last.pt")
    use_real_weights_(model)
    freeze_binary_layers_(model)
    return model


def approx_spec(args: argparse.Namespace) -> tuple[ExperimentSpec, list[str]]:
    """The (unrun) spec of bop-approx and the overrides of its second phase (validates them)."""
    setting = BopSetting(args, "bop-approx", "bnn_mnist", PAPER_APPROX_EPOCHS)
    retrain = args.retrain_epochs or PAPER_APPROX_EPOCHS
    phase2_overrides = setting.all([f"train.epochs={retrain}"])
    # every config now: a bad --set fails before any training
    for seed in setting.seeds:
        load_config(setting.recipe, [*setting.overrides, f"train.seed={seed}"])
        load_config(setting.recipe, [*phase2_overrides, f"train.seed={seed}"])
    variants = [
        Variant("binary", "Binary (binary weights)", paper=PAPER_TABLE1["binary"][0] * 100),
        Variant("real", "Real (latent weights)", paper=PAPER_TABLE1["real"][0] * 100),
        Variant(
            "real-retrained",
            "Real retrained (BN retrained)",
            paper=PAPER_TABLE1["real-retrained"][0] * 100,
        ),
    ]
    notes = [
        f"Setting: recipe `{setting.recipe}` (latent weights clipped to [-1, 1], Adam lr 1e-3, "
        f"batch 64) on {setting.shown} with overrides `{setting.shown_overrides()}`; "
        f"{setting.length()} of latent-weight training, then {retrain} epochs retraining only "
        f"BatchNorm (binary layers frozen, real latent weights in use); {len(setting.seeds)} "
        "seed(s). Accuracy on the test split with the last epoch's weights.",
        "Binary: the trained net as is. Real: the same net with each binary layer's kernel "
        "quantizer switched off (real latent weights; the sign activations stay). Real "
        "retrained: Real after the BatchNorm retraining.",
        "Paper: [Re] Table 1, MNIST (60000 training images), mean of 10 random "
        "initializations, given there as fractions (shown here in %); see table1.md for the "
        "variances.",
    ]
    if setting.data == "mnist5k":
        notes.append(
            "The bundled subset has 4000 training images (62 steps per epoch instead of 938), "
            "so the same epochs train about 15x fewer steps than the paper's; the recipe's "
            "BatchNorm momentum is Keras' 0.01 scaled to match (0.15)."
        )
    spec = ExperimentSpec(
        experiment="bop-approx",
        title=f"bop-approx ([Re] Table 1): binary vs real latent weights — {setting.shown}",
        out=setting.out,
        recipe=setting.recipe,
        variants=variants,
        seeds=setting.seeds,
        settings=setting.settings(retrain_epochs=retrain),
        base_overrides=setting.overrides,
        metric="val_acc1",
        metric_label="top-1 accuracy (%) on the test split",
        paper_label="paper",
        notes=notes,
        overwrite=setting.overwrite,
        paper_setting=PAPER_MNIST.updated(runs=PAPER_APPROX_RUNS),
        plan_metric=PAPER_MNIST.metric,
        processes=setting.processes,
    )
    return spec, phase2_overrides


def approx_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The plan of bop-approx: per seed, the latent-weight training and the BN retraining."""
    spec, phase2_overrides = approx_spec(args)
    train = PAPER_MNIST.updated(runs=PAPER_APPROX_RUNS)
    retrain = train.updated(
        notes=(
            "retraining: only BatchNorm trains, the binary layers frozen with their real "
            "latent weights in use (Sec. 4.1.1)",
        )
    )
    lines = []
    for seed in spec.seeds:
        for phase, overrides, paper in (
            ("train", spec.base_overrides, train),
            ("retrain", phase2_overrides, retrain),
        ):
            config = load_config(spec.recipe, [*overrides, f"train.seed={seed}"])
            lines.append(
                plan_line(
                    f"seed{seed}/{phase}",
                    config,
                    spec.planned_processes(),
                    spec.plan_metric,
                    paper,
                    runs=len(spec.seeds),
                )
            )
    return lines


def _approx_seed(
    config1: Config,
    config2: Config,
    seed_dir: Path,
    datasets: DatasetCache,
    tag: str,
) -> dict[str, RunResult]:
    """One seed of bop-approx: train, evaluate binary / real, retrain BN, evaluate."""
    seed = config1.train.seed
    dir1, dir2 = seed_dir / "train", seed_dir / "retrain"
    run1 = run_one(
        config1, dir1, variant="binary", seed=seed, tag=f"{tag} train", datasets=datasets
    )
    if not run1.ok:
        return {
            name: RunResult(name, seed, str(seed_dir), "failed", reason=run1.reason)
            for name in ("binary", "real", "real-retrained")
        }
    test_set: Dataset = datasets.get(config1)[1]
    # Binary and Real: the phase-1 net, evaluated as it is and with its latent weights
    model, _ = load_checkpoint_model(dir1 / "last.pt")
    binary_acc = eval_accuracy(model, config1, test_set)
    use_real_weights_(model)
    real_acc = eval_accuracy(model, config1, test_set)
    # Real retrained: only BN trains, on the real weights (a finished run's are loaded into it)
    model2 = _phase2_model(dir1)
    run2 = run_one(
        config2,
        dir2,
        variant="real-retrained",
        seed=seed,
        tag=f"{tag} retrain BN",
        datasets=datasets,
        model=model2,
    )
    retrained_acc = None if run2.status == "failed" else eval_accuracy(model2, config2, test_set)
    print(
        f"{tag}: binary {binary_acc:.2f}%, real {real_acc:.2f}%, real retrained "
        + ("failed" if retrained_acc is None else f"{retrained_acc:.2f}%"),
        flush=True,
    )
    common = dict(seed=seed, epoch=run1.epoch, step=run1.step)
    trained = run2.status in ("trained", "resumed")
    return {
        "binary": RunResult(
            "binary",
            run_dir=str(dir1),
            status=run1.status,
            final=binary_acc,
            best=best_of(dir1, "val_acc1", None),
            seconds=run1.seconds,
            **common,
        ),
        "real": RunResult("real", run_dir=str(dir1), status=run1.status, final=real_acc, **common),
        "real-retrained": RunResult(
            "real-retrained",
            seed,
            str(dir2),
            run2.status if retrained_acc is not None else "failed",
            final=retrained_acc,
            best=best_of(dir2, "val_acc1", None) if read_rows(dir2) else None,
            epoch=run2.epoch if trained else None,  # as results.json has always recorded it
            reason=run2.reason,
        ),
    }


def run_approx(
    spec: ExperimentSpec, phase2_overrides: list[str], plan: list[dict[str, Any]] | None = None
) -> ExperimentResults:
    """Run bop-approx: per seed, train, evaluate binary / real, retrain BN, evaluate."""
    start = time.perf_counter()
    prepare_out_dir(spec.out, spec.experiment, spec.settings, spec.overwrite, spec.seeds)
    if plan is not None:
        write_text(spec.out / PLAN_FILE, plan_text(plan))
    print(f"bop-approx: {len(spec.seeds)} seeds x 2 phases into {spec.out}", flush=True)
    runs: dict[str, list[RunResult]] = {v.name: [] for v in spec.variants}
    datasets = DatasetCache()
    for k, seed in enumerate(spec.seeds, start=1):
        config1 = load_config(spec.recipe, [*spec.base_overrides, f"train.seed={seed}"])
        config2 = load_config(spec.recipe, [*phase2_overrides, f"train.seed={seed}"])
        tag = f"[{k}/{len(spec.seeds)}] seed{seed}"
        seed_runs = _approx_seed(config1, config2, spec.out / f"seed{seed}", datasets, tag)
        for name, run in seed_runs.items():
            runs[name].append(run)
    variants = [variant_result(v, runs[v.name], None) for v in spec.variants]
    results = ExperimentResults(spec, variants, time.perf_counter() - start)
    write_results(results)
    table1 = approx_table1(results)
    write_text(spec.out / "table1.md", table1 + "\n")
    print()
    print(format_table(results))
    print()
    print(table1)
    print(f"results: {spec.out}/results.md, results.json, results.csv, results.png, table1.md")
    return results


def approx_table1(results: ExperimentResults) -> str:
    """Table 1 as the paper prints it: mean and variance of the accuracy (fractions)."""
    lines = [
        "## bop-approx: [Re] Table 1 — accuracy as a fraction, mean and variance over seeds",
        "",
        "| model | ours mean | ours variance | seeds | paper mean | paper variance |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"binary": "Binary", "real": "Real", "real-retrained": "Real Retrained"}
    for vr in results.variants:
        s = vr.final
        values = [v / 100 for v in s.values]
        mean = sum(values) / len(values) if values else None
        var = (
            sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            if len(values) > 1
            else (0.0 if values else None)
        )
        pm, pv = PAPER_TABLE1[vr.variant.name]
        lines.append(
            f"| {labels[vr.variant.name]} | {'—' if mean is None else f'{mean:.4f}'} | "
            f"{'—' if var is None else f'{var:.2e}'} | {s.n} | {pm:.4f} | {pv:.2e} |"
        )
    lines += [
        "",
        "ours: variance with ddof=1 (0 for one seed); paper: 10 random initializations "
        "(the paper does not say which variance).",
    ]
    return "\n".join(lines)


@register_experiment(
    "bop-approx",
    "[Re] Bop Table 1: latent-weight BNN on MNIST with binary / real / BN-retrained real weights",
    add_arguments=add_approx_arguments,
    plan=approx_plan,
)
def bop_approx(args: argparse.Namespace) -> int:
    """Run bop-approx; writes results.*, table1.md to the out dir."""
    spec, phase2 = approx_spec(args)
    if env_world_size() > 1:
        raise UserError(
            f"bop-approx runs in one process (its second phase evaluates and retrains the "
            f"first's model in place), not {env_world_size()}: expected it without torchrun"
        )
    check_processes(spec)
    plan = approx_plan(args)
    print_plan(plan)
    run_approx(spec, phase2, plan)
    return 0

"""gn-feature-dist (GN paper Fig. 6): VGG-16 with no norm / BN / GN; the 1, 20, 80, 99
percentiles of the last conv's responses (before norm and ReLU) on a fixed probe batch,
recorded during training by a callback and plotted (fig6.png), with the validation errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightnets.engine.callbacks import Callback
from lightnets.engine.config import load_config
from lightnets.engine.trainer import build_datasets
from lightnets.errors import UserError
from lightnets.experiments import register_experiment
from lightnets.experiments.gn.paper import (
    BRN_NOTE,
    NORM_LABELS,
    PAPER_BATCH,
    PAPER_FIG6,
    PAPER_REFERENCE_BATCH,
    PAPER_SETTING,
    VGG_LR,
    VGG_LR_PAPER_SCALE,
    paper_norm,
)
from lightnets.experiments.gn.setting import GnSetting, add_common_arguments, gn_spec, norm_list
from lightnets.experiments.outdir import is_main_process, write_text
from lightnets.experiments.report import new_figure, save_figure
from lightnets.experiments.results import ExperimentResults
from lightnets.experiments.runner import run_experiment
from lightnets.experiments.spec import ExperimentSpec, Variant

__all__ = [
    "PERCENTILES",
    "PERCENTILE_FILE",
    "FeaturePercentiles",
    "add_feature_dist_arguments",
    "feature_dist_spec",
    "gn_feature_dist",
    "plot_feature_dist",
]

PERCENTILES = (1, 20, 80, 99)
PERCENTILE_FILE = "feature_percentiles.json"


def add_feature_dist_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lightnets repro gn-feature-dist`."""
    add_common_arguments(p, "gn-feature-dist", seeds=1)
    p.add_argument("--norms", help="norm kinds (default none,bn,gn)")
    p.add_argument(
        "--probe-images", type=int, default=256, help="training images in the probe batch"
    )
    p.add_argument(
        "--records", type=int, default=60, help="percentile records per run (default 60)"
    )


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

    def _last_conv(self, model: nn.Module) -> nn.Conv2d:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise UserError("gn-feature-dist needs a model with a Conv2d: found none")
        return convs[-1]

    def record(self, trainer) -> None:
        """Append the percentiles of the last conv's output on the probe batch, now."""
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


def _probe_batch(setting: GnSetting, overrides: list[str], n: int) -> torch.Tensor:
    """The first `n` training images (un-augmented), the same for every variant and seed."""
    train, _ = build_datasets(load_config(setting.recipe, overrides))
    n = min(n, len(train))
    return torch.stack([train[i][0] for i in range(n)])


class _ProbeCallbacks:
    """spec.callbacks of gn-feature-dist: one FeaturePercentiles per run, all sharing one
    probe batch, which is read from the data on the first call (so building the spec, and
    planning it, reads no data)."""

    def __init__(self, setting: GnSetting, overrides: list[str], images: int, records: int):
        self.setting, self.overrides = setting, overrides
        self.images, self.records = images, records
        self.probe = None
        self.every: int | None = None

    def __call__(self, variant: str, seed: int) -> list[Callback]:
        if self.probe is None:
            self.probe = _probe_batch(self.setting, self.overrides, self.images)
            config = load_config(self.setting.recipe, self.overrides)
            size = self.setting.train_size(self.overrides, read=True)
            steps = self.setting.steps(size, config.data.per_process_batch(1))
            self.every = max(1, steps // self.records)
        return [FeaturePercentiles(self.probe, self.every)]


def feature_dist_spec(args: argparse.Namespace) -> ExperimentSpec:
    """The runner's ExperimentSpec for parsed `gn-feature-dist` arguments (validates them)."""
    setting = GnSetting(args, "vgg")
    norms = norm_list(args.norms, ("none", "bn", "gn"), ("none", "bn", "gn", "ln", "in", "brn"))
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
                    "model_args": paper_norm(kind),
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
    spec = gn_spec(
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


def plot_feature_dist(results: ExperimentResults, path: Path) -> None:
    """Fig. 6: one panel per variant, the percentile curves of seed 0 over training steps."""
    variants = [vr for vr in results.variants if vr.runs]
    fig = new_figure((4.0 * max(1, len(variants)), 3.8))
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
    plan=lambda args: feature_dist_spec(args).plan(),
)
def gn_feature_dist(args: argparse.Namespace) -> int:
    """Run gn-feature-dist; writes results.* and fig6.png to the out dir."""
    results = run_experiment(feature_dist_spec(args))
    if not is_main_process():
        return 0
    plot_feature_dist(results, results.spec.out / "fig6.png")
    print(f"plot: {results.spec.out}/fig6.png")
    return 0

"""wm-param-stats (Fig. 5 / Fig. 7): the same runs as wm-table (the same out dir: finished runs
are read back, missing ones trained), then per layer, in model order, the mean and variance of
every conv weight, BN weight and bias (BN biases and conv biases) of the final models, averaged
over the seeds: `param_stats.json` and `fig5.png` / `fig7.png`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightnets.engine.checkpoint import load_checkpoint_model
from lightnets.experiments import register_experiment
from lightnets.experiments.outdir import is_main_process, write_text
from lightnets.experiments.report import new_figure, save_figure
from lightnets.experiments.results import ExperimentResults
from lightnets.experiments.weight_mechanism.table import add_table_arguments, run_table, table_spec
from lightnets.optim import is_norm_layer

__all__ = ["STAT_KINDS", "layer_stats", "param_stats", "plot_param_stats", "wm_param_stats"]

STAT_KINDS = (("conv_weight", "conv weight"), ("bn_weight", "BN weight"), ("bias", "bias"))


def layer_stats(model: nn.Module) -> dict[str, dict[str, list]]:
    """Per layer in model order: mean and variance (population) of conv weights, norm weights
    and biases (norm biases and conv biases, in the order they appear); a norm layer is what
    the optimizer's weight-decay groups call one (`lightnets.optim.is_norm_layer`)."""
    out = {k: {"layers": [], "mean": [], "var": []} for k, _ in STAT_KINDS}

    def add(kind: str, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().double().flatten()
        out[kind]["layers"].append(name)
        out[kind]["mean"].append(float(t.mean()))
        out[kind]["var"].append(float(t.var(unbiased=False)))

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            add("conv_weight", name, m.weight)
            if m.bias is not None:
                add("bias", name, m.bias)
        elif is_norm_layer(m):
            if isinstance(getattr(m, "weight", None), nn.Parameter):
                add("bn_weight", name, m.weight)
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                add("bias", name, m.bias)
    return out


def _run_stats(run_dir: str | Path) -> dict[str, dict[str, list]] | None:
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        return None
    model, _ = load_checkpoint_model(path)
    return layer_stats(model)


def param_stats(results: ExperimentResults) -> dict[str, Any]:
    """{variant: {kind: {layers, mean, var, seeds}}}: per-layer stats averaged over seeds."""
    out: dict[str, Any] = {}
    for vr in results.variants:
        per = [s for s in (_run_stats(r.run_dir) for r in vr.runs if r.ok) if s is not None]
        if not per:
            continue
        entry = {}
        for kind, _ in STAT_KINDS:
            layers = per[0][kind]["layers"]
            n = len(per)
            entry[kind] = {
                "layers": layers,
                "mean": [sum(s[kind]["mean"][i] for s in per) / n for i in range(len(layers))],
                "var": [sum(s[kind]["var"][i] for s in per) / n for i in range(len(layers))],
                "seeds": n,
            }
        out[vr.variant.name] = {"label": vr.variant.label, **entry}
    return out


def plot_param_stats(stats: dict[str, Any], path: Path, title: str) -> None:
    """Fig. 5 / 7: rows conv weight, BN weight, bias; columns mean, variance; one line per
    variant (line styles as the paper's: solid, dash-dot, dashed, dotted)."""
    fig = new_figure((11, 9))
    styles = ["-", "-.", "--", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    for row, (kind, label) in enumerate(STAT_KINDS):
        for col, stat in enumerate(("mean", "var")):
            ax = fig.add_subplot(3, 2, 2 * row + col + 1)
            for i, entry in enumerate(stats.values()):
                values = entry[kind][stat]
                ax.plot(
                    range(len(values)),
                    values,
                    linestyle=styles[i % len(styles)],
                    label=entry["label"],
                    linewidth=1.0,
                )
            ax.set_title(f"{label}: {'mean' if stat == 'mean' else 'variance'}", fontsize=9)
            ax.set_xlabel("layer (model order)", fontsize=8)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


@register_experiment(
    "wm-param-stats",
    "Weight mechanism Fig. 5/7: per-layer mean / variance of conv weights, BN weights, biases",
    add_arguments=add_table_arguments,
    plan=lambda args: table_spec(args, "wm-param-stats", check_root=False).plan(),
)
def wm_param_stats(args: argparse.Namespace) -> int:
    """wm-table's runs (same out dir; trains what is missing), then param_stats.json and
    fig5.png (fig7.png with --bn-init ones)."""
    results = run_table(args, "wm-param-stats")
    if not is_main_process():
        return 0
    stats = param_stats(results)
    out = results.spec.out
    write_text(out / "param_stats.json", json.dumps(stats, indent=1) + "\n")
    fig = "fig5.png" if args.bn_init == "normal" else "fig7.png"
    init = "N(0, 1)" if args.bn_init == "normal" else "1"
    plot_param_stats(
        stats,
        out / fig,
        f"Per-layer parameter statistics after training, mean over "
        f"{len(results.spec.seeds)} seed(s), W_BN init {init}",
    )
    print(f"parameter statistics: {out}/param_stats.json, plot: {out}/{fig}")
    return 0
